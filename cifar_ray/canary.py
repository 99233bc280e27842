"""The canary decision: roll back, promote, or keep going, on what live traffic showed.

A pure function of two arms' counts (rollout.py gathers them; this module knows no Ray, no
MLflow). The gate (gate.py) judges a version on a fixed evaluation set before it gets
traffic; this judges it on what actually arrives, answers whose true label came back
through POST /feedback, against the champion's answers over the same window.

The rule, in order:
1. Roll back at once when the candidate fails as a service: its error rate above
   `max_error_rate`, or its p99 latency above `max_p99_ratio` x the champion's (once both
   have `min_requests`).
2. With fewer than `min_labels` labelled answers on either arm, wait.
3. Roll back when its live accuracy is significantly lower than the champion's, by more than
   `margin`: a one-sided two-proportion z test, H0 "candidate >= champion - margin",
   rejected at `level`.
4. Promote when it is significantly higher by at least `min_improvement`: H0 "candidate <=
   champion + min_improvement", rejected at `level`.
5. Otherwise keep going, until `max_duration_s`: then stop without promoting.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Arm:
    """One version's live record over the canary's window."""

    requests: int = 0
    errors: int = 0
    p99_ms: float = 0.0
    labelled: int = 0  # answers whose true label came back
    correct: int = 0  # of those, answered right

    @property
    def accuracy(self) -> float:
        return self.correct / self.labelled if self.labelled else float("nan")

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def _f(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class Rule:
    """The rule's settings; `registry canary` takes each as a flag (--min-labels ...)."""

    min_labels: int = _f(200, "labelled answers each version needs before accuracy decides")
    level: float = _f(0.05, "significance level of the one-sided tests")
    margin: float = _f(0.0, "accuracy the candidate may lose to the champion before it is rolled back")
    min_improvement: float = _f(0.0, "accuracy the candidate must gain over the champion to be promoted")
    min_requests: int = _f(100, "requests each version needs before error rate and latency decide")
    max_error_rate: float = _f(0.01, "candidate error rate that rolls it back")
    max_p99_ratio: float = _f(2.0, "candidate p99 latency, as a multiple of the champion's, that rolls it back")
    max_duration_s: float = _f(3600.0, "seconds after which an undecided canary stops, not promoted")


@dataclass(frozen=True)
class Verdict:
    action: str  # "rollback", "promote", "continue" or "stop"
    reason: str
    p_value: float | None = None

    def evidence(self, candidate: Arm, champion: Arm) -> dict:
        """What the decision rested on, flat, for version tags and --status."""
        return {"action": self.action, "reason": self.reason, "p_value": self.p_value,
                **{f"candidate_{k}": v for k, v in asdict(candidate).items()},
                **{f"champion_{k}": v for k, v in asdict(champion).items()}}


def decide(candidate: Arm, champion: Arm, rule: Rule, elapsed_s: float) -> Verdict:
    if candidate.requests >= rule.min_requests and candidate.error_rate > rule.max_error_rate:
        return Verdict("rollback", f"error rate {candidate.error_rate:.3f} above {rule.max_error_rate}")
    if (min(candidate.requests, champion.requests) >= rule.min_requests and champion.p99_ms > 0
            and candidate.p99_ms > rule.max_p99_ratio * champion.p99_ms):
        return Verdict("rollback", f"p99 {candidate.p99_ms:.0f} ms above {rule.max_p99_ratio}x the champion's "
                                   f"{champion.p99_ms:.0f} ms")
    if min(candidate.labelled, champion.labelled) >= rule.min_labels:
        worse = p_lower(candidate, champion, rule.margin)
        if worse < rule.level:
            return Verdict("rollback", f"live accuracy {candidate.accuracy:.3f} below the champion's "
                                       f"{champion.accuracy:.3f} (p = {worse:.2g})", worse)
        better = p_lower(champion, candidate, rule.min_improvement)
        if better < rule.level:
            return Verdict("promote", f"live accuracy {candidate.accuracy:.3f} above the champion's "
                                      f"{champion.accuracy:.3f} by at least {rule.min_improvement} "
                                      f"(p = {better:.2g})", better)
        p_value = min(worse, better)
    else:
        p_value = None
    if elapsed_s >= rule.max_duration_s:
        return Verdict("stop", f"undecided after {elapsed_s:.0f} s", p_value)
    waiting = (f"{min(candidate.labelled, champion.labelled)} of {rule.min_labels} labelled answers"
               if p_value is None else "no significant difference yet")
    return Verdict("continue", waiting, p_value)


def p_lower(a: Arm, b: Arm, margin: float) -> float:
    """One-sided p-value that a's accuracy is lower than b's by more than `margin`
    (H0: acc_a >= acc_b - margin), from a two-proportion z test with unpooled variances."""
    variance = (a.accuracy * (1 - a.accuracy) / a.labelled + b.accuracy * (1 - b.accuracy) / b.labelled)
    difference = a.accuracy - b.accuracy + margin
    if variance == 0:  # both arms all right or all wrong: the difference is exact
        return 0.0 if difference < 0 else 1.0
    return 0.5 * math.erfc(-difference / math.sqrt(variance) / math.sqrt(2))


def wilson_interval(correct: int, n: int, level: float = 0.05) -> tuple[float, float]:
    """Confidence interval of a proportion (Wilson's score interval), for --status."""
    if n == 0:
        return 0.0, 1.0
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - level / 2)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
