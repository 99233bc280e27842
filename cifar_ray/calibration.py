"""Temperature scaling (Guo et al., 2017): one number that makes probabilities honest.

A network trained with label smoothing is underconfident; one trained long without it is
overconfident. Dividing the logits by a temperature T, fitted on held-out images by
minimising the cross-entropy, fixes most of either without changing a single prediction
(the order of the classes stays the same). The end of a training run fits T on the
validation split and stores it in the checkpoint's metadata.json; `apply_temperature` then
runs wherever probabilities leave the model: evaluate, batch predict, the gate, Serve.
"""

from __future__ import annotations

import numpy as np

TEMPERATURE_KEY = "temperature"  # in metadata.json


def temperature_of(metadata: dict) -> float:
    """The checkpoint's fitted temperature; 1 (no change) where none was fitted."""
    return float(metadata.get(TEMPERATURE_KEY) or 1.0)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T), from the model's probabilities (their logs are the logits up to
    a per-row constant, which softmax ignores)."""
    if temperature == 1.0:
        return probabilities
    scaled = np.log(np.clip(probabilities, 1e-30, 1.0)) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the cross-entropy of the scaled probabilities
    (convex in 1/T: a bounded scalar search over log T finds it)."""
    from scipy.optimize import minimize_scalar

    from cifar_ray.report import cross_entropy

    def loss(log_t: float) -> float:
        return cross_entropy(labels, apply_temperature(probabilities, float(np.exp(log_t))))

    best = minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return round(float(np.exp(best.x)), 4)


def cross_fitted(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Each half of the images scaled with the temperature fitted on the other half: what
    calibration does on images the temperature was not fitted on."""
    halves = np.arange(len(labels)) % 2
    out = np.empty_like(probabilities, dtype=np.float32)
    for half in (0, 1):
        fit, apply = halves != half, halves == half
        t = fit_temperature(labels[fit], probabilities[fit])
        out[apply] = apply_temperature(probabilities[apply], t)
    return out
