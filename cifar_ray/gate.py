"""The promotion gate: which registry version deserves to be `champion`.

Every version is scored on one fixed evaluation set: the current champion's, or
--eval-data; for a first version, the images held out of the training source by a hash of
their pixels (split.in_holdout), which no run trains on. A candidate takes the champion's
place only if its accuracy beats the champion's by at least --min-improvement and no class
loses more than --max-class-drop. The decision itself (`judge`, `decide`) is a pure
function of two score tables; registry.py stores the scores and moves the alias.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cifar_ray import tracking
from cifar_ray.config import RegistryConfig

if TYPE_CHECKING:
    from cifar_ray.registry import Registry


class RegistryError(ValueError):
    """A registry request that cannot be done: unknown version, missing files, no champion."""


# ---------------------------------------------------------------------------------------
# The gate: pure functions of scores
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scores:
    """A version's accuracy, overall and per class, on the evaluation set `eval_set` (its fingerprint)."""

    eval_set: str
    accuracy: float
    per_class: dict[str, float]

    @classmethod
    def from_metrics(cls, eval_set: str, metrics: dict) -> "Scores":
        """From report.compute_metrics' output."""
        return cls(eval_set, metrics["accuracy"], {c: m["accuracy"] for c, m in metrics["per_class"].items()})

    @classmethod
    def from_tags(cls, tags: dict) -> "Scores | None":
        if "eval_accuracy" not in tags:
            return None
        per_class = {k.split(".", 1)[1]: float(v) for k, v in tags.items() if k.startswith("class_accuracy.")}
        return cls(tags.get("eval_set", ""), float(tags["eval_accuracy"]), per_class)

    def tags(self) -> dict[str, str]:
        return {"eval_set": self.eval_set, "eval_accuracy": f"{self.accuracy:.6f}",
                **{f"class_accuracy.{c}": f"{a:.6f}" for c, a in self.per_class.items()}}


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def judge(candidate: Scores, champion: Scores | None, min_improvement: float, max_class_drop: float) -> Decision:
    """The gate: better overall by `min_improvement`, and no class worse by more than `max_class_drop`."""
    if champion is None:
        return Decision(True, "first version: there is no champion yet")
    if candidate.eval_set != champion.eval_set:
        raise RegistryError("the candidate and the champion were scored on different evaluation sets")
    gain = round(candidate.accuracy - champion.accuracy, 6)
    if gain < min_improvement:
        return Decision(False, f"accuracy {candidate.accuracy:.4f} vs the champion's {champion.accuracy:.4f} "
                               f"({gain:+.4f}), short of the required +{min_improvement:g}")
    drops = {c: round(a - candidate.per_class.get(c, 0.0), 6) for c, a in champion.per_class.items()}
    worst = max(drops, key=drops.get) if drops else None
    if worst is not None and drops[worst] > max_class_drop:
        return Decision(False, f"class {worst} falls from {champion.per_class[worst]:.4f} to "
                               f"{candidate.per_class.get(worst, 0.0):.4f} ({-drops[worst]:+.4f}), over the "
                               f"allowed -{max_class_drop:g}")
    return Decision(True, f"accuracy {candidate.accuracy:.4f} vs the champion's {champion.accuracy:.4f} "
                          f"({gain:+.4f}), no class down by more than {max_class_drop:g}")


def decide(mode: str, candidate: Scores, champion: Scores | None, cfg: RegistryConfig) -> Decision:
    """The gate's verdict under --promote auto|never|force."""
    verdict = judge(candidate, champion, cfg.min_improvement, cfg.max_class_drop)
    if mode == "auto":
        return verdict
    if mode == "never":
        return Decision(False, f"--promote never (the gate would {'promote' if verdict.promote else 'refuse'}: "
                               f"{verdict.reason})")
    return Decision(True, f"--promote force (the gate would {'promote' if verdict.promote else 'refuse'}: "
                          f"{verdict.reason})")


# ---------------------------------------------------------------------------------------
# The fixed evaluation set
# ---------------------------------------------------------------------------------------

@dataclass
class EvalSet:
    """The gate's evaluation set: decoded images in Ray's object store, and where it is kept."""

    dataset: object
    fingerprint: str
    description: str
    uri: str | None = None  # its artifact URI once the registry keeps a copy


def choose_eval_set(registry: Registry, cfg: RegistryConfig, champion, holdout=None, source: str = "") -> EvalSet:
    """--eval-data, else the champion's evaluation set, else `holdout` (held out of `source`)."""
    from cifar_ray.data import read_source
    from cifar_ray.split import data_fingerprint

    if cfg.eval_data:
        ds = read_source(cfg.eval_data, split="test").materialize()
        return EvalSet(ds, data_fingerprint(ds), f"--eval-data {cfg.eval_data}")
    if champion is not None and champion.tags.get("eval_set_uri"):
        with tempfile.TemporaryDirectory(prefix="cifar-ray-evalset-") as tmp:
            ds = read_source(str(tracking.download(registry.uri, champion.tags["eval_set_uri"], tmp))).materialize()
        fingerprint = data_fingerprint(ds)
        if fingerprint != champion.tags.get("eval_set"):
            raise RegistryError(f"the champion's evaluation set at {champion.tags['eval_set_uri']} has changed "
                                f"(fingerprint {fingerprint}, registered {champion.tags.get('eval_set')})")
        return EvalSet(ds, fingerprint, champion.tags.get("eval_set_description", ""), champion.tags["eval_set_uri"])
    if holdout is None or holdout.count() == 0:
        raise RegistryError("no evaluation set for a first version: pass --eval-data")
    return EvalSet(holdout, data_fingerprint(holdout),
                   f"{holdout.count()} images held out of {source} by pixel hash, never trained on")


def write_eval_set(ds, folder: Path) -> None:
    """The evaluation set as a Parquet folder in the input schema (image: PNG bytes, label)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cifar_ray.images import encode_png

    images, labels = [], []
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        images += [encode_png(x) for x in batch["image"]]
        labels += [int(y) for y in batch["label"]]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": images, "label": pa.array(labels, pa.int64())}), folder / "part-0.parquet")


def score(checkpoint: str, eval_set: EvalSet) -> Scores:
    return audit_and_score(checkpoint, eval_set, audit=None)[1]


def audit_and_score(checkpoint: str, eval_set: EvalSet, audit: tuple | None) -> tuple[dict | None, Scores]:
    """(the audit's metrics, the gate's scores): `audit` is evaluate_dataset's (ds, data,
    outs) for the checkpoint's own audit on the validation split, done in the same model
    pass as the scoring. Its images first fit the checkpoint's temperature (calibration.py):
    the audit and the scores are of calibrated probabilities."""
    from cifar_ray.evaluate import evaluate_datasets

    scoring = (eval_set.dataset, {"source": eval_set.description, "split": "all rows"}, ())
    parts = [audit, scoring] if audit else [scoring]
    *audited, scored = evaluate_datasets(checkpoint, parts, total=sum(ds.count() for ds, _, _ in parts),
                                         calibrate=audit is not None)
    return (audited[0] if audited else None), Scores.from_metrics(eval_set.fingerprint, scored)


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
