"""Registering a checkpoint: store its files in MLflow, make it a version of the registered
model, and let the gate decide on it.

The end of every train run and Tune experiment (lifecycle.finish_run) and `cifar-ray
registry register CHECKPOINT` call `register`, with the checkpoint's scores on the fixed
evaluation set (eval_set.py); the champion's are read from its tags, or measured.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from cifar_ray.config import RegistryConfig
from cifar_ray.errors import RegistryError, TrackingUnavailable, first_line
from cifar_ray.eval_set import EvalSet, score, write_eval_set
from cifar_ray.gate import Scores, decide
from cifar_ray.model_registry import CHECKPOINT_ARTIFACT, EVAL_SET_ARTIFACT, MODEL_SHA_TAG, Registry


def register(registry: Registry, cfg: RegistryConfig, run_id: str, checkpoint: str, eval_set: EvalSet,
             tags: dict, candidate: Scores | None = None) -> dict:
    """Make `checkpoint` a new version, scored on `eval_set` (unless `candidate` holds its
    scores there already), and let the gate decide on it. A checkpoint this MLflow run
    registered before (a rerun of a finished run) is not registered again: the outcome
    names the version it is.

    Returns what summary.json records: version, decision, reason, scores and the champion.
    """
    from cifar_ray.checkpoint import METADATA_FILE, local_checkpoint
    from cifar_ray.storage import read_file

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


def champion_scores(registry: Registry, champion, eval_set: EvalSet) -> Scores | None:
    """The champion's scores on `eval_set`: its tags if scored there, else measured now."""
    if champion is None:
        return None
    stored = Scores.from_tags(champion.tags)
    if stored is not None and stored.eval_set == eval_set.fingerprint:
        return stored
    print(f"scoring champion version {champion.version} on the evaluation set ({eval_set.description})", flush=True)
    with tempfile.TemporaryDirectory(prefix="cifar-ray-champion-") as tmp:
        return score(str(registry.download(champion, tmp)), eval_set)


def registration_failed(error: Exception, uri: str, run_dir: str, checkpoint: str) -> Exception:
    """A RegistryError as it is; anything else means the store failed: say how to register later."""
    if isinstance(error, RegistryError):
        return error
    return TrackingUnavailable(
        f"cannot register the model in {uri} ({first_line(error)}); the run's checkpoints are kept in "
        f"{run_dir}; register the best later with: python -m cifar_ray.registry register {checkpoint} "
        f"--tracking-uri {uri}")
