"""Drift: do the live answers still look like the model's answers on images like its training data?

The detector of alibi-detect's CIFAR-10 example, on the classifier's own outputs, with
scipy's tests (no new dependency):
- the reference (`reference_of`), computed once from the run's audit pass over its
  validation images and stored in the checkpoint's metadata: a sorted sample of top-1
  probabilities and the share of each predicted class;
- a sliding window of the last WINDOW live answers per version (`DriftWatch`), compared with
  it by a two-sample Kolmogorov-Smirnov test on the top-1 probability and a chi-square test
  on the predicted classes; the window drifts when the smaller p-value is below LEVEL / 2
  (Bonferroni over the two tests).

Images unlike CIFAR-10 (noise, screenshots, phone photos) shift both: the model answers them
with other confidences and a skewed class mix. benchmarks/drift.py measures the false alarm
rate on held-out CIFAR-10 images and the delay to an alarm on noise.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

REFERENCE_SIZE = 2_000  # top-1 probabilities kept in the reference
WINDOW = 500  # live answers per version compared with it
MIN_WINDOW = 100  # fewer answers than this: no verdict yet
LEVEL = 0.01  # the false alarm rate asked of one check of a full window
REFERENCE_KEY = "drift_reference"  # in a checkpoint's metadata.json


def reference_of(probabilities: np.ndarray) -> dict:
    """What the model's answers look like on images like its training data: {"top1": sorted
    sample of top-1 probabilities, "class_shares": share of answers per class}."""
    probabilities = np.asarray(probabilities, np.float64)
    top1 = np.sort(probabilities.max(1))
    if len(top1) > REFERENCE_SIZE:  # evenly spaced quantiles keep the distribution
        top1 = top1[np.linspace(0, len(top1) - 1, REFERENCE_SIZE).round().astype(int)]
    counts = np.bincount(probabilities.argmax(1), minlength=probabilities.shape[1])
    return {"top1": [round(float(p), 5) for p in top1], "class_shares": (counts / counts.sum()).round(5).tolist(),
            "images": int(len(probabilities))}


@dataclass(frozen=True)
class Verdict:
    drifting: bool
    p_value: float | None  # the smaller of the two tests' p-values
    score: float  # the KS statistic: 0 alike, 1 nothing alike
    window: int

    def as_dict(self, version: str) -> dict:
        return {"drifting": self.drifting, "p_value": self.p_value, "score": self.score, "window": self.window,
                "model_version": version}


def compare(reference: dict, top1: np.ndarray, classes: np.ndarray) -> Verdict:
    """The live window (top-1 probabilities and predicted class indices) against the reference."""
    from scipy.stats import chisquare, ks_2samp

    if len(top1) < MIN_WINDOW:
        return Verdict(False, None, 0.0, len(top1))
    ks = ks_2samp(top1, np.asarray(reference["top1"]))
    shares = np.asarray(reference["class_shares"], np.float64)
    # Classes the reference never predicted would make the expected count zero: a small floor.
    expected = np.maximum(shares, 0.5 / max(reference.get("images", 1000), 1))
    expected = expected / expected.sum() * len(classes)
    observed = np.bincount(classes, minlength=len(shares))
    chi = chisquare(observed, expected)
    p_value = float(min(ks.pvalue, chi.pvalue))
    return Verdict(p_value < LEVEL / 2, p_value, float(ks.statistic), len(top1))


class DriftWatch:
    """A replica's sliding windows of live answers, one per version, and their verdicts."""

    def __init__(self):
        self.windows: dict[str, collections.deque] = {}

    def observe(self, version: str, top1: list[float], classes: list[int]) -> None:
        window = self.windows.setdefault(version, collections.deque(maxlen=WINDOW))
        window.extend(zip(top1, classes))

    def report(self, version: str, reference: dict | None) -> dict:
        """What GET /drift answers for `version`."""
        verdict = self.verdict(version, reference)
        if verdict is None:
            return {"drifting": False, "p_value": None, "score": 0.0, "window": 0, "model_version": version,
                    "reference": "none: the checkpoint was trained before drift references were kept"}
        return verdict.as_dict(version)

    def verdict(self, version: str, reference: dict | None) -> Verdict | None:
        """None when the version has no reference (a checkpoint from before drift was kept)."""
        if reference is None:
            return None
        window = np.array(self.windows.get(version, ()), dtype=np.float64).reshape(-1, 2)
        return compare(reference, window[:, 0], window[:, 1].astype(int))
