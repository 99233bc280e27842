"""The start and the end of every train run and Tune experiment, in the order they happen.

    with tracked_run(cfg, "train") as run:       # checks, data, an MLflow run
        ... train, write the run's outputs ...
        finish_run(run, best_checkpoint, summary, audit_outs)   # audit, gate, registry

train.py and tune.py differ only in what happens between the two: one Ray Train run, or a
Tune experiment of many.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from cifar_ray import storage, tracking
from cifar_ray.config import Config
from cifar_ray.data import DataInfo
from cifar_ray.run_folder import log_audit_to_tensorboard, write_summary


@dataclass
class Run:
    """A run under way: its config, its MLflow run, and its data read and split once."""

    cfg: Config
    tracking_uri: str
    run_id: str
    train: object  # Ray Datasets of decoded images
    val: object
    holdout: object  # held out for the registry's evaluation set (eval_set.py)
    info: DataInfo


@contextmanager
def tracked_run(cfg: Config, kind: str) -> Iterator[Run]:
    """Check that the run's results can be saved and tracked (before any work, not after an
    hour of it), read and split the data, and open the run's MLflow run for the block:
    FINISHED when the block ends, FAILED when it raises. `cfg` is resolved (run_folder.resolve_run)."""
    import ray.data

    from cifar_ray.data import load_training_data

    # Epoch lines and Tune's trial table say more than a progress bar per dataset.
    ray.data.DataContext.get_current().enable_progress_bars = False
    storage.check_writable(cfg.run.storage_path)
    uri = tracking.tracking_uri(cfg)
    tracking.check_reachable(uri)
    train, val, holdout, info = load_training_data(cfg.data, seed=cfg.train.seed)
    print(f"data: {info.num_train} training / {info.num_val} validation images from {info.source}; "
          f"{info.num_holdout} held out for the registry's evaluation set", flush=True)
    run_id = tracking.start_run(uri, cfg, kind=kind)
    print(f"tracking: MLflow run {run_id} in {uri}" + (" (one child run per trial)" if kind == "tune" else ""),
          flush=True)
    with tracking.run_status(uri, run_id):
        tracking.log_data_info(uri, run_id, info)
        yield Run(cfg, uri, run_id, train, val, holdout, info)


def finish_run(run: Run, checkpoint: str, summary: dict, audit_outs: tuple[str, ...]) -> dict:
    """The end of a run, once training chose its best `checkpoint` and wrote `summary`:

    1. the gate's evaluation set: --eval-data, the champion's, or the run's holdout;
    2. one model pass over the validation split and the evaluation set: the validation
       split fits the checkpoint's temperature (calibration.py) and is audited (metrics,
       figures, MODEL_CARD.md into each folder of `audit_outs`, the checkpoint's among them,
       so the model carries its audit); the evaluation set is scored for the gate;
    3. registration: the checkpoint becomes a version, and the gate decides on champion;
    4. summary.json gets the calibration and the registry's outcome; the audit goes to
       TensorBoard, and the run folder's files to the MLflow run.

    A registry that cannot be reached costs no work: the audit is still written, the
    checkpoints stay, and the error, also recorded in summary.json, says how to register
    later. Returns `summary`.
    """
    from cifar_ray.eval_set import audit_and_score, choose_eval_set
    from cifar_ray.evaluate import evaluate_datasets
    from cifar_ray.model_registry import Registry
    from cifar_ray.registration import register, registration_failed

    cfg, uri, run_dir = run.cfg, run.tracking_uri, summary["run_dir"]
    audit_part = (run.val, run.info.validation_split(), audit_outs)
    try:
        registry = Registry(uri)
        eval_set = choose_eval_set(cfg.registry, uri, registry.champion(), run.holdout, run.info.source)
    except Exception as e:
        evaluate_datasets(checkpoint, [audit_part], total=run.val.count(), calibrate=True)
        raise_recorded(summary, registration_failed(e, uri, run_dir, checkpoint))
    audit, candidate = audit_and_score(checkpoint, eval_set, audit_part)
    summary["calibration"] = c = audit["calibration"]
    print(f"calibration: temperature {c['temperature']} fitted on the validation split; ECE "
          f"{c['ece_before']:.3f} -> {audit['ece']:.3f} (cross-fitted: {c['ece_cross_fitted']:.3f})", flush=True)
    tags = {"run": cfg.run.name, "run_dir": run_dir, "git_commit": tracking.git_commit(),
            "data_source": run.info.source, "data_fingerprint": run.info.fingerprint, "model": cfg.model.model}
    try:
        summary["registry"] = register(registry, cfg.registry, run.run_id, checkpoint, eval_set, tags, candidate)
    except Exception as e:
        raise_recorded(summary, registration_failed(e, uri, run_dir, checkpoint))
    write_summary(summary)
    log_audit_to_tensorboard(run_dir, checkpoint, summary["best_epoch"], audit)
    tracking.log_outputs(uri, run.run_id, run_dir)
    return summary


def raise_recorded(summary: dict, error: Exception) -> None:
    """Raise `error` once summary.json records it, with whatever the run had done before."""
    summary["registry"] = {"error": str(error)}
    write_summary(summary)
    raise error from None
