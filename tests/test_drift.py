"""The drift detector's decisions on fixed inputs (drift.py)."""

import numpy as np

from cifar_ray import drift
from cifar_ray.drift import DriftWatch, compare, reference_of


def answers(rng, n: int, confident: bool = True, classes: int = 10) -> np.ndarray:
    """Class probabilities like a model's: sharp on images like its training data (top-1
    mostly near 0.9, classes even), flat and lopsided on noise (top-1 near 0.4, 2 classes)."""
    logits = rng.normal(0, 1, (n, 10))
    if confident:
        logits[np.arange(n), rng.integers(0, classes, n)] += 4.0
    else:
        logits[np.arange(n), rng.integers(0, 2, n)] += 1.0
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def window(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return probabilities.max(1), probabilities.argmax(1)


def test_the_reference_keeps_a_sorted_sample_and_the_class_shares():
    rng = np.random.default_rng(0)
    probabilities = answers(rng, 5000)
    reference = reference_of(probabilities)
    assert len(reference["top1"]) == drift.REFERENCE_SIZE and reference["images"] == 5000
    assert reference["top1"] == sorted(reference["top1"])
    assert abs(np.median(reference["top1"]) - np.median(probabilities.max(1))) < 0.01
    assert abs(sum(reference["class_shares"]) - 1) < 1e-3 and min(reference["class_shares"]) > 0.08


def test_windows_like_the_reference_rarely_alarm_and_noise_always_does():
    rng = np.random.default_rng(1)
    reference = reference_of(answers(rng, 5000))
    alarms = sum(compare(reference, *window(answers(rng, drift.WINDOW))).drifting for _ in range(200))
    assert alarms <= 4  # LEVEL 0.01 asked: 2 expected in 200
    noisy = compare(reference, *window(answers(rng, drift.WINDOW, confident=False)))
    assert noisy.drifting and noisy.p_value < 1e-10 and noisy.score > 0.5


def test_a_shift_in_classes_alone_is_drift():
    rng = np.random.default_rng(2)
    reference = reference_of(answers(rng, 5000))
    verdict = compare(reference, *window(answers(rng, drift.WINDOW, classes=3)))  # still confident
    assert verdict.drifting and verdict.score < 0.2


def test_the_watch_waits_for_a_window_and_slides():
    rng = np.random.default_rng(3)
    reference = reference_of(answers(rng, 5000))
    watch = DriftWatch()
    assert watch.verdict("1", None) is None
    top1, classes = window(answers(rng, drift.MIN_WINDOW - 1, confident=False))
    watch.observe("1", top1.tolist(), classes.tolist())
    assert watch.verdict("1", reference).as_dict("1") == {"drifting": False, "p_value": None, "score": 0.0,
                                                          "window": drift.MIN_WINDOW - 1, "model_version": "1"}
    top1, classes = window(answers(rng, drift.WINDOW, confident=False))
    watch.observe("1", top1.tolist(), classes.tolist())
    assert watch.verdict("1", reference).drifting
    top1, classes = window(answers(rng, drift.WINDOW))  # a full window of normal answers replaces it
    watch.observe("1", top1.tolist(), classes.tolist())
    verdict = watch.verdict("1", reference)
    assert not verdict.drifting and verdict.window == drift.WINDOW
