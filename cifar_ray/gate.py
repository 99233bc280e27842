"""The promotion gate: does a candidate deserve to be `champion`? A pure function of scores.

Every version is scored on one fixed evaluation set (eval_set.py). A candidate takes the
champion's place only if its accuracy beats the champion's by at least --min-improvement
and no class loses more than --max-class-drop. Nothing here reads or writes: registration.py
scores and registers, model_registry.py moves the alias.
"""

from __future__ import annotations

from dataclasses import dataclass

from cifar_ray.config import RegistryConfig
from cifar_ray.errors import RegistryError


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
