"""The model registry in MLflow: the registered model's versions and its `champion` alias.

The registered model `cifar10-classifier` lives in the MLflow store of tracking.py; every
version is a checkpoint that registration.py copied into its MLflow run's artifacts, so it
stays loadable after Ray Train prunes the run's own checkpoints. The alias `champion` is
what Serve serves: `promote` moves it through the gate (gate.py) on the scores the versions
carry, `rollback` moves it back, and both keep the history of who held it.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

from cifar_ray import tracking
from cifar_ray.config import CHAMPION, REGISTERED_MODEL, RegistryConfig
from cifar_ray.errors import RegistryError, first_line
from cifar_ray.gate import Decision, Scores, judge

# What Serve may serve from the registry: models:/NAME@ALIAS (followed) or models:/NAME/VERSION.
REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
CANDIDATE = "candidate"  # the alias of a version under a canary or shadow rollout (rollout.py)
CANARY_TAG = "canary"  # on the registered model: the rollout's settings, JSON
STATUS_TAG = "canary_status"  # on the registered model: the rollout's live figures, JSON (rollout.py)
HISTORY_TAG = "champion_history"  # on the registered model: versions that held the alias, in order
EVAL_SET_ARTIFACT = "eval_set"
CHECKPOINT_ARTIFACT = "checkpoint"
MODEL_SHA_TAG = "model_sha256"  # on a version: its model.keras, to know a checkpoint registered before


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

    def canary(self) -> dict | None:
        """The rollout under way: {"version", "percent", "shadow", "started", "rule"}, or None.
        Only while the alias `candidate` and the settings name the same version."""
        if not self._exists():
            return None
        settings = json.loads(self.client.get_registered_model(self.name).tags.get(CANARY_TAG) or "null")
        candidate = self._or_none(self.client.get_model_version_by_alias, self.name, CANDIDATE)
        if not settings or candidate is None or str(candidate.version) != settings.get("version"):
            return None
        return settings

    def start_canary(self, version: str, percent: float, shadow: bool, rule: dict) -> dict:
        """Version `version` takes `percent` of the traffic (or, with `shadow`, a copy of it)."""
        candidate = self.version(version)
        self.check_files(candidate)
        champion = self.champion()
        if champion is None:
            raise RegistryError("no champion to compare a canary with; promote a first version")
        if str(champion.version) == str(candidate.version):
            raise RegistryError(f"version {version} is already champion")
        settings = {"version": str(candidate.version), "percent": percent, "shadow": shadow, "started": now(),
                    "champion": str(champion.version), "rule": rule}
        self.client.set_registered_model_tag(self.name, CANARY_TAG, json.dumps(settings))
        self.client.set_registered_model_alias(self.name, CANDIDATE, str(candidate.version))
        return settings

    def stop_canary(self, outcome: str | None = None, evidence: dict | None = None) -> str | None:
        """End the rollout: the alias `candidate` removed, the outcome and its evidence kept as
        tags on the version. The version it ended, or None when none was under way.

        The tags are written first: whoever sees the rollout over also finds its outcome."""
        settings = self.canary()
        version = settings["version"] if settings else None
        if version and outcome:
            self.client.set_model_version_tag(self.name, version, "canary_decision", outcome)
            self.client.set_model_version_tag(self.name, version, "canary_ended", now())
        if version and evidence:
            self.client.set_model_version_tag(self.name, version, "canary_evidence", json.dumps(evidence))
        if self._exists():
            if self._or_none(self.client.get_model_version_by_alias, self.name, CANDIDATE) is not None:
                self.client.delete_registered_model_alias(self.name, CANDIDATE)
            self.client.set_registered_model_tag(self.name, CANARY_TAG, "")
        return version

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
