"""Registering a checkpoint: score it on the fixed evaluation set, store its files in
MLflow, make it a version of the registered model, and let the gate decide on it.

The end of every train run and Tune experiment calls `register_run`; `python -m
cifar_ray.registry register CHECKPOINT` calls `register_checkpoint` for one made earlier.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from cifar_ray import tracking
from cifar_ray.cli import first_line
from cifar_ray.config import Config, RegistryConfig
from cifar_ray.gate import (EvalSet, RegistryError, Scores, audit_and_score, champion_scores, choose_eval_set,
                            decide, score, write_eval_set)
from cifar_ray.registry import CHECKPOINT_ARTIFACT, EVAL_SET_ARTIFACT, MODEL_SHA_TAG, Registry


def register(registry: Registry, cfg: RegistryConfig, run_id: str, checkpoint: str, eval_set: EvalSet,
             tags: dict, candidate: Scores | None = None) -> dict:
    """Make `checkpoint` a new version, scored on `eval_set` (unless `candidate` holds its
    scores there already), and let the gate decide on it. A checkpoint this MLflow run
    registered before (a rerun of a finished run) is not registered again: the outcome
    names the version it is.

    Returns what summary.json records: version, decision, reason, scores and the champion.
    """
    from cifar_ray.checkpoint import METADATA_FILE, local_checkpoint, read_file

    registry.ensure_model()
    champion = registry.champion()
    model_sha256 = json.loads(read_file(checkpoint, METADATA_FILE)).get("model_sha256")
    earlier = registry.version_holding(run_id, model_sha256)
    if earlier is not None:  # a rerun of a finished run, or a resumed one whose best did not change
        return already_registered(registry, earlier, champion)
    candidate = candidate or score(checkpoint, eval_set)
    incumbent = champion_scores(registry, champion, eval_set)
    decision = decide(cfg.promote, candidate, incumbent, cfg)

    artifact_uri = registry.client.get_run(run_id).info.artifact_uri
    with local_checkpoint(checkpoint) as folder:
        registry.client.log_artifacts(run_id, str(folder), CHECKPOINT_ARTIFACT)
    if eval_set.uri is None:
        with tempfile.TemporaryDirectory() as tmp:
            write_eval_set(eval_set.dataset, Path(tmp))
            registry.client.log_artifacts(run_id, tmp, EVAL_SET_ARTIFACT)
        eval_set.uri = f"{artifact_uri}/{EVAL_SET_ARTIFACT}"
    version_tags = {
        **{k: str(v) for k, v in tags.items() if v is not None}, **candidate.tags(),
        **({MODEL_SHA_TAG: model_sha256} if model_sha256 else {}),
        "eval_set_uri": eval_set.uri, "eval_set_description": eval_set.description,
        "gate_decision": "promoted" if decision.promote else "not promoted", "gate_reason": decision.reason,
        "gate_compared_to": str(champion.version) if champion else "none",
    }
    version = registry.client.create_model_version(registry.name, source=f"{artifact_uri}/{CHECKPOINT_ARTIFACT}",
                                                   run_id=run_id, tags=version_tags, description=decision.reason)
    if decision.promote:
        registry.set_champion(str(version.version))
    outcome = {
        "registered_model": registry.name, "version": str(version.version), "promoted": decision.promote,
        "reason": decision.reason,
        "champion": str(version.version) if decision.promote else (str(champion.version) if champion else None),
        "compared_to": str(champion.version) if champion else None, "eval_accuracy": candidate.accuracy,
        "champion_eval_accuracy": incumbent.accuracy if incumbent else None,
        "eval_set": {"fingerprint": eval_set.fingerprint, "description": eval_set.description},
        "tracking_uri": registry.uri,
    }
    print(format_outcome(outcome), flush=True)
    return outcome


def already_registered(registry: Registry, version, champion) -> dict:
    """The outcome of registering a checkpoint that this run registered before: nothing new."""
    outcome = {
        "registered_model": registry.name, "version": str(version.version), "promoted": False,
        "reason": f"version {version.version} is this run's best checkpoint already (same model.keras); "
                  "nothing new registered",
        "champion": str(champion.version) if champion else None, "compared_to": None,
        "eval_accuracy": float(version.tags["eval_accuracy"]), "champion_eval_accuracy": None,
        "eval_set": {"fingerprint": version.tags["eval_set"], "description": version.tags["eval_set_description"]},
        "tracking_uri": registry.uri,
    }
    print(f"registry: {outcome['reason']}; the champion is version {outcome['champion']}", flush=True)
    return outcome


def format_outcome(o: dict) -> str:
    verdict = "is now champion" if o["promoted"] else f"not promoted (champion stays version {o['champion']})"
    return (f"registry: {o['registered_model']} version {o['version']} {verdict}: {o['reason']}\n"
            f"  evaluation set: {o['eval_set']['description']} [{o['eval_set']['fingerprint']}]")


def register_run(cfg: Config, run_id: str, checkpoint: str, holdout, info, run_dir: str,
                 audit: tuple | None = None) -> tuple[dict | None, dict]:
    """The end of a train or Tune run: register its best checkpoint through the gate.

    `audit` is evaluate_dataset's (ds, data, outs) for the checkpoint's own audit, done in
    the same model pass as the gate's scoring, before the checkpoint is copied into the
    registry, so the version carries it. Returns (the audit's metrics, the registry's
    outcome). A registry that cannot be reached costs no work: the audit is still written,
    the checkpoints stay where they are, and the error says how to register them later.
    """
    from cifar_ray.evaluate import evaluate_datasets

    uri = tracking.tracking_uri(cfg)
    try:
        registry = Registry(uri)
        eval_set = choose_eval_set(registry, cfg.registry, registry.champion(), holdout, info.source)
    except Exception as e:
        if audit:
            evaluate_datasets(checkpoint, [audit], total=audit[0].count(), calibrate=True)
        raise _registration_failed(e, uri, run_dir, checkpoint) from None
    audited, candidate = audit_and_score(checkpoint, eval_set, audit)
    tags = {"run": cfg.run.name, "run_dir": run_dir, "git_commit": tracking.git_commit(),
            "data_source": info.source, "data_fingerprint": info.fingerprint, "model": cfg.model.model}
    try:
        return audited, register(registry, cfg.registry, run_id, checkpoint, eval_set, tags, candidate)
    except Exception as e:
        raise _registration_failed(e, uri, run_dir, checkpoint) from None


def _registration_failed(error: Exception, uri: str, run_dir: str, checkpoint: str) -> Exception:
    """A RegistryError as it is; anything else means the store failed: say how to register later."""
    if isinstance(error, RegistryError):
        return error
    return tracking.TrackingUnavailable(
        f"cannot register the model in {uri} ({first_line(error)}); the run's checkpoints are kept in "
        f"{run_dir}; register the best later with: python -m cifar_ray.registry register {checkpoint} "
        f"--tracking-uri {uri}")


def register_checkpoint(cfg: Config, checkpoint: str) -> dict:
    """`registry register`: a checkpoint made earlier, through the gate, in its own MLflow run.

    For a first version with no --eval-data, the evaluation set is held out of the
    checkpoint's own training source, as at the end of training.
    """
    from cifar_ray.checkpoint import local_checkpoint, read_metadata
    from cifar_ray.cli import init_ray

    with local_checkpoint(checkpoint) as folder:
        metadata = read_metadata(folder)
    uri = tracking.tracking_uri(cfg)
    registry = Registry(uri)
    champion = registry.champion()
    init_ray()
    holdout = None
    if not cfg.registry.eval_data and champion is None:
        holdout = holdout_of_training_source(Config.from_dict(metadata["config"]))
    eval_set = choose_eval_set(registry, cfg.registry, champion, holdout, metadata["data"]["source"])
    name = f"register-{Path(checkpoint.rstrip('/')).parent.name}-{Path(checkpoint.rstrip('/')).name}"
    run_cfg = Config.from_dict(metadata["config"]).with_overrides({"name": name})
    run_id = tracking.start_run(uri, run_cfg, kind="register")
    tags = {"run": metadata["config"]["run"]["name"], "checkpoint": checkpoint, "git_commit": tracking.git_commit(),
            "data_source": metadata["data"]["source"], "data_fingerprint": metadata["data"].get("fingerprint"),
            "model": metadata["model"]}
    outcome = register(registry, cfg.registry, run_id, checkpoint, eval_set, tags)
    tracking.end_run(uri, run_id)
    return outcome


def holdout_of_training_source(cfg: Config):
    from cifar_ray.data import read_source
    from cifar_ray.split import add_digests, holdout_of

    d = cfg.data
    ds = add_digests(read_source(d.data, synthetic_size=d.synthetic_size, seed=cfg.train.seed)).materialize()
    return holdout_of(ds)
