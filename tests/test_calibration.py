"""Temperature scaling: the fit, its effect on ECE, and that it changes no prediction."""

import numpy as np
import pytest

from cifar_ray.calibration import apply_temperature, cross_fitted, fit_temperature, temperature_of
from cifar_ray.report import expected_calibration_error


def calibrated_toy(n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits) of a model calibrated by construction: each label is drawn from
    softmax(logits)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (n, 10))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return labels, logits


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("sharpness", [3.0, 0.4])  # overconfident, underconfident (label smoothing)
def test_the_fitted_temperature_undoes_a_miscalibration_and_drops_the_ece(sharpness):
    labels, logits = calibrated_toy()
    miscalibrated = softmax(logits * sharpness)
    temperature = fit_temperature(labels, miscalibrated)
    assert temperature == pytest.approx(sharpness, rel=0.1)
    fixed = apply_temperature(miscalibrated, temperature)
    before, after = expected_calibration_error(labels, miscalibrated), expected_calibration_error(labels, fixed)
    assert before > 0.08 and after < 0.02, (before, after)
    assert (fixed.argmax(1) == miscalibrated.argmax(1)).all()  # no prediction changes
    # fitted on one half, measured on the other: as good on images it did not see
    assert expected_calibration_error(labels, cross_fitted(labels, miscalibrated)) < 0.02


def test_temperatures_compose_and_one_changes_nothing():
    _, logits = calibrated_toy(100)
    p = softmax(logits)
    assert apply_temperature(p, 1.0) is p
    np.testing.assert_allclose(apply_temperature(apply_temperature(p, 2.0), 0.5), p, atol=1e-6)
    np.testing.assert_allclose(apply_temperature(p, 2.0), softmax(logits / 2), atol=1e-6)
    assert temperature_of({}) == 1.0 and temperature_of({"temperature": 0.7}) == 0.7
