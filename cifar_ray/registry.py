"""The model registry: every exported model is a version, and a gate decides which is champion.

    python -m cifar_ray.registry list
    python -m cifar_ray.registry show 3
    python -m cifar_ray.registry promote 3            # through the gate; --force skips it
    python -m cifar_ray.registry rollback             # champion goes back to the previous one
    python -m cifar_ray.registry register runs/NAME/epoch_0010   # a checkpoint made earlier

The registered model `cifar10-classifier` lives in the MLflow store of tracking.py. The best
checkpoint of every train run and of every Tune experiment becomes a new version. Its files
are copied into the run's MLflow artifacts, so a version stays loadable after Ray Train prunes
the run's own checkpoints.

The gate (gate.py) scores every version on one fixed evaluation set and decides which one
is `champion`, the alias Serve follows. The decision and its reason are printed and kept as
the version's tags.
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from cifar_ray import tracking
from cifar_ray.cli import first_line
from cifar_ray.config import CHAMPION, REGISTERED_MODEL, Config, RegistryConfig
from cifar_ray.gate import (Decision, EvalSet, RegistryError, Scores, audit_and_score, champion_scores,
                            choose_eval_set, decide, judge, score, write_eval_set)

HISTORY_TAG = "champion_history"  # on the registered model: versions that held the alias, in order
EVAL_SET_ARTIFACT = "eval_set"
CHECKPOINT_ARTIFACT = "checkpoint"
MODEL_SHA_TAG = "model_sha256"  # on a version: its model.keras, to know a checkpoint registered before


# ---------------------------------------------------------------------------------------
# The registered model in MLflow
# ---------------------------------------------------------------------------------------

class Registry:
    """The registered model `cifar10-classifier` in one MLflow store, and its champion."""

    def __init__(self, uri: str, name: str = REGISTERED_MODEL):
        self.uri, self.name = uri, name
        self.client = tracking.client(uri)

    def ensure_model(self) -> None:
        if not self._exists():
            self.client.create_registered_model(
                self.name, description="CIFAR-10 classifiers from cifar-ray; the alias champion is served")

    def _exists(self) -> bool:
        return self._or_none(self.client.get_registered_model, self.name) is not None

    def versions(self) -> list:
        if not self._exists():
            return []
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return sorted(found, key=lambda v: int(v.version))

    def version(self, version: str):
        found = self._or_none(self.client.get_model_version, self.name, str(version))
        if found is None:
            raise RegistryError(f"{self.name} has no version {version}")
        return found

    def version_holding(self, run_id: str, model_sha256: str | None):
        """The version registered from MLflow run `run_id` with this model file, or None."""
        if not model_sha256 or not self._exists():
            return None
        found = self.client.search_model_versions(f"name = '{self.name}' and run_id = '{run_id}'")
        return next((v for v in found if v.tags.get(MODEL_SHA_TAG) == model_sha256), None)

    def champion(self):
        """The version the alias points to, or None."""
        return self._or_none(self.client.get_model_version_by_alias, self.name, CHAMPION)

    @staticmethod
    def _or_none(lookup, *args):
        """lookup(*args), or None where MLflow says there is no such thing (it answers
        RESOURCE_DOES_NOT_EXIST or, for an unknown alias or version, INVALID_PARAMETER_VALUE)."""
        from mlflow.exceptions import MlflowException

        try:
            return lookup(*args)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def history(self) -> list[str]:
        """Versions that held the alias, oldest first, ending with the current champion
        (also when the alias was moved outside cifar-ray, by MLflow's UI or client)."""
        tag = self.client.get_registered_model(self.name).tags.get(HISTORY_TAG, "") if self._exists() else ""
        history = [v for v in tag.split(",") if v]
        current = self.champion()
        if current is not None and (not history or history[-1] != str(current.version)):
            history.append(str(current.version))
        return history

    def set_champion(self, version: str, history: list[str] | None = None) -> None:
        """Move the alias to `version` and record it (after `history`, default: the history so far)."""
        history = list(self.history() if history is None else history)
        if not history or history[-1] != str(version):
            history.append(str(version))
        self.client.set_registered_model_alias(self.name, CHAMPION, str(version))
        self.client.set_registered_model_tag(self.name, HISTORY_TAG, ",".join(history[-200:]))
        self.client.set_model_version_tag(self.name, str(version), "champion_since", now())

    def check_files(self, version) -> None:
        """A version's checkpoint must be in the store before it may be served."""
        import mlflow.artifacts

        try:
            names = {Path(f.path).name for f in mlflow.artifacts.list_artifacts(
                artifact_uri=version.source, tracking_uri=self.uri)}
        except Exception as e:
            raise RegistryError(f"version {version.version}: cannot list its files at {version.source} "
                                f"({first_line(e)})") from None
        missing = {"model.keras", "metadata.json"} - names
        if missing:
            raise RegistryError(f"version {version.version}: {', '.join(sorted(missing))} missing at {version.source}")

    def download(self, version, destination: str) -> Path:
        """The version's checkpoint folder, fetched into `destination`."""
        return tracking.download(self.uri, version.source, destination)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------
# Registering a checkpoint: score, store, gate
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------

def list_versions(registry: Registry) -> str:
    champion = registry.champion()
    rows = [("version", "champion", "created", "run", "model", "eval_accuracy", "gate")]
    for v in registry.versions():
        created = datetime.fromtimestamp(v.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M")
        rows.append((v.version, "*" if champion and str(champion.version) == str(v.version) else "", created,
                     v.tags.get("run", ""), v.tags.get("model", ""), v.tags.get("eval_accuracy", "")[:6],
                     v.tags.get("gate_decision", "")))
    if len(rows) == 1:
        return f"{registry.name} has no versions yet in {registry.uri}"
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def show_version(registry: Registry, version: str) -> str:
    v = registry.version(version)
    info = {"version": str(v.version), "aliases": list(v.aliases), "source": v.source, "run_id": v.run_id,
            "created": datetime.fromtimestamp(v.creation_timestamp / 1000).isoformat(timespec="seconds"),
            "tags": dict(sorted(v.tags.items()))}
    return json.dumps(info, indent=2)


def promote(registry: Registry, cfg: RegistryConfig, version: str, force: bool) -> Decision:
    """Move champion to `version` if the gate allows it (judged on the scores both versions
    carry, from the same evaluation set), or regardless with `force`."""
    candidate = registry.version(version)
    registry.check_files(candidate)
    champion = registry.champion()
    if champion is not None and str(champion.version) == str(candidate.version):
        raise RegistryError(f"version {version} is already champion")
    if force:
        decision = Decision(True, "forced by registry promote --force")
    else:
        scores = Scores.from_tags(candidate.tags)
        incumbent = Scores.from_tags(champion.tags) if champion is not None else None
        if scores is None:
            raise RegistryError(f"version {version} has no scores on an evaluation set; use --force to promote "
                                "it anyway")
        if champion is not None and (incumbent is None or incumbent.eval_set != scores.eval_set):
            raise RegistryError(f"version {version} and champion version {champion.version} were not scored on "
                                "the same evaluation set; use --force to promote anyway")
        decision = judge(scores, incumbent, cfg.min_improvement, cfg.max_class_drop)
    if decision.promote:
        registry.set_champion(str(candidate.version))
        registry.client.set_model_version_tag(registry.name, str(candidate.version), "promoted_by", decision.reason)
    return decision


def rollback(registry: Registry) -> tuple[str, str]:
    """Champion back to the version that held it before the current one: (from, to)."""
    history = registry.history()
    if len(history) < 2:
        raise RegistryError("no earlier champion to roll back to")
    current, previous = history[-1], history[-2]
    registry.check_files(registry.version(previous))
    registry.set_champion(previous, history=history[:-1])
    return current, previous


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


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    from cifar_ray.cli import parse_args, run_cli

    args = parse_args("registry", argv, prog)

    def run() -> None:
        cfg = Config().with_overrides({k: v for k, v in vars(args).items()
                                       if v is not None and k not in ("command", "version", "force", "checkpoint", "verbose")})
        if args.command == "register":
            register_checkpoint(cfg, args.checkpoint)
            return
        registry = Registry(tracking.tracking_uri(cfg))
        try:
            if args.command == "list":
                print(list_versions(registry))
            elif args.command == "show":
                print(show_version(registry, args.version))
            elif args.command == "promote":
                decision = promote(registry, cfg.registry, args.version, args.force)
                verdict = "is now champion" if decision.promote else "not promoted"
                print(f"{registry.name} version {args.version} {verdict}: {decision.reason}")
                if not decision.promote:
                    raise SystemExit(1)
            elif args.command == "rollback":
                current, previous = rollback(registry)
                print(f"{registry.name}: champion rolled back from version {current} to version {previous}")
        except (RegistryError, SystemExit):
            raise
        except Exception as e:
            raise tracking.TrackingUnavailable(f"registry {registry.uri}: {first_line(e)}") from None

    run_cli(run)


if __name__ == "__main__":
    main()
