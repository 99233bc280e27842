"""A run's folder, <storage-path>/<name>/: naming it, finding
its checkpoints (also those of a run finished before), and what a run leaves in it at the
end: summary.json, history.csv, curves.png and the audit's TensorBoard images. Train runs
and Tune trials share it.
"""

from __future__ import annotations

import json
from datetime import datetime

from cifar_ray import storage
from cifar_ray.config import TENSORBOARD_DIR, Config
from cifar_ray.errors import first_line

SCORE_METRIC = "val_accuracy"  # what checkpoints, trials and runs are ranked by


def resolve_run(cfg: Config, kind: str = "train") -> Config:
    """Name an unnamed run `<kind>-<date>-<time>` and make a local storage path absolute
    (Ray needs one)."""
    return cfg.with_overrides({"name": cfg.run.name or datetime.now().strftime(f"{kind}-%Y%m%d-%H%M%S"),
                               "storage_path": storage.absolute(cfg.run.storage_path)})


def checkpoints_of(result) -> tuple[str, str, str]:
    """(run folder, latest checkpoint, best checkpoint) of a finished Ray Train run."""
    if result.checkpoint is None:
        raise RuntimeError(f"run {result.path} reported no checkpoint")
    best = result.get_best_checkpoint(SCORE_METRIC, "max") or result.checkpoint
    return result.path, result.checkpoint.path, best.path


def finished_run_checkpoints(cfg: Config) -> tuple[str, str, str] | None:
    """checkpoints_of a rerun whose last epoch is trained already, read from its folder
    (Ray Train keeps the best checkpoints and the latest); None when there is work left."""
    from cifar_ray.checkpoint import best_checkpoint_in, checkpoint_names

    run_dir = cfg.run_dir
    names = checkpoint_names(run_dir)
    if not names or int(names[-1].removeprefix("epoch_")) < cfg.train.epochs:
        return None
    return run_dir, f"{run_dir}/{names[-1]}", best_checkpoint_in(run_dir, SCORE_METRIC)


def write_run_outputs(cfg: Config, run_dir: str, latest_checkpoint: str, best_checkpoint: str,
                      wall_time_s: float) -> dict:
    """summary.json, history.csv and curves.png next to the checkpoints."""
    from cifar_ray.checkpoint import local_checkpoint, read_metadata
    from cifar_ray.report import history_csv, plot_curves

    with local_checkpoint(latest_checkpoint) as latest:
        history = read_metadata(latest)["history"]
    best = max(history, key=lambda m: m[SCORE_METRIC])
    summary = {
        "run": cfg.run.name,
        "run_dir": run_dir,
        "best_checkpoint": best_checkpoint,
        "best_epoch": best["epoch"],
        "best_val_accuracy": best["val_accuracy"],
        "best_val_loss": best["val_loss"],
        "epochs": len(history),
        "wall_time_s": round(wall_time_s, 1),
        "train_images_per_s": round(sum(m["images_per_s"] for m in history) / len(history), 1),
        "config": cfg.to_dict(),
    }
    write_summary(summary)
    storage.write_file(run_dir, "history.csv", history_csv(history).encode())
    storage.write_file(run_dir, "curves.png", plot_curves(history, title=f"{cfg.model.model} · {cfg.run.name}"))
    return summary


def write_summary(summary: dict) -> None:
    storage.write_file(summary["run_dir"], "summary.json", json.dumps(summary, indent=2).encode())


def log_audit_to_tensorboard(run_dir: str, audited: str, epoch: int, audit: dict) -> None:
    """A checkpoint's confusion matrix and per-class accuracy, as images at its `epoch`, beside
    the curves the chief worker logged (train_loop.tensorboard_on_chief). The images are the
    audit's own PNGs, read back from the folder `audited` holds them in."""
    import tensorflow as tf

    step = epoch - 1
    try:
        images = {tag: storage.read_file(audited, png) for tag, png in
                  (("confusion_matrix", "confusion_matrix.png"), ("per_class_accuracy", "per_class.png"))}
        writer = tf.summary.create_file_writer(f"{run_dir}/{TENSORBOARD_DIR}/audit")
        with writer.as_default():
            for tag, png in images.items():
                tf.summary.image(tag, tf.image.decode_png(png)[None], step=step)
            tf.summary.scalar("accuracy", audit["accuracy"], step=step)
            tf.summary.scalar("expected_calibration_error", audit["ece"], step=step)
        writer.close()
    except Exception as e:  # TensorBoard is a view: never lose a run over it
        print(f"TensorBoard: could not log the audit ({first_line(e)})", flush=True)


def with_global_batch(cfg: Config) -> Config:
    """Resolve the global batch (--per-worker-batch-size x workers) and scale the LR to it.

    Linear scaling (Goyal et al., 2017): an LR tuned for a global batch of --lr-batch-size
    is multiplied by global batch / lr-batch-size. The resolved values replace the inputs,
    so resolving twice changes nothing and checkpoints record what was actually used.
    """
    t, workers = cfg.train, cfg.scaling.num_workers
    batch = t.per_worker_batch_size * workers if t.per_worker_batch_size else t.batch_size
    if batch % workers:
        raise ValueError(f"global batch {batch} does not split evenly across {workers} workers")
    if t.steps_per_execution > 1 and workers > 1:
        # Keras 3's multi-step loop fails under MultiWorkerMirroredStrategy (InvalidArgumentError
        # in the while loop's cond, measured with 2 workers); one step per call works.
        raise ValueError("--steps-per-execution above 1 needs --num-workers 1")
    lr = t.lr * batch / t.lr_batch_size if t.lr_batch_size else t.lr
    return cfg.with_overrides({"batch_size": batch, "per_worker_batch_size": None,
                               "lr": lr, "lr_batch_size": None})
