"""The audit: metrics checked against values worked out by hand, and the written report."""

import json
from pathlib import Path

import numpy as np
import pytest

from cifar_ray.report import compute_metrics, expected_calibration_error

CLASSES = ["a", "b", "c"]
# Six predictions whose every metric is easy to work out on paper.
LABELS = np.array([0, 0, 1, 1, 2, 2])
PROBABILITIES = np.array([
    [0.90, 0.05, 0.05],  # a -> a, confidence .9, right
    [0.20, 0.70, 0.10],  # a -> b, .7, wrong
    [0.10, 0.80, 0.10],  # b -> b, .8, right
    [0.60, 0.30, 0.10],  # b -> a, .6, wrong
    [0.10, 0.10, 0.80],  # c -> c, .8, right
    [0.05, 0.05, 0.90],  # c -> c, .9, right
], dtype=np.float32)


@pytest.fixture
def metrics():
    return compute_metrics(LABELS, PROBABILITIES, CLASSES)


def test_accuracy_loss_and_confusion(metrics):
    assert metrics["examples"] == 6
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.2, 0.8, 0.3, 0.8, 0.9])), rel=1e-6)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [1, 1, 0], [0, 0, 2]]


def test_per_class_precision_recall_f1(metrics):
    per_class = metrics["per_class"]
    assert [per_class[c]["recall"] for c in CLASSES] == [0.5, 0.5, 1.0]
    assert [per_class[c]["precision"] for c in CLASSES] == [0.5, 0.5, 1.0]
    assert [per_class[c]["f1"] for c in CLASSES] == pytest.approx([0.5, 0.5, 1.0])
    assert [per_class[c]["support"] for c in CLASSES] == [2, 2, 2]


def test_worst_class_and_its_gap(metrics):
    assert metrics["worst_class"] == "a" and metrics["worst_class_accuracy"] == 0.5
    assert metrics["mean_class_accuracy"] == pytest.approx(2 / 3)
    assert metrics["worst_class_gap"] == pytest.approx(2 / 3 - 0.5)


def test_expected_calibration_error_by_hand(metrics):
    # bins (width 1/15): {.9 right, .9 right}, {.8 right, .8 right}, {.7 wrong}, {.6 wrong}
    expected = (2 * abs(1 - 0.9) + 2 * abs(1 - 0.8) + abs(0 - 0.7) + abs(0 - 0.6)) / 6
    assert metrics["ece"] == pytest.approx(expected, abs=1e-6)


def test_perfectly_calibrated_predictions_have_zero_ece():
    labels = np.array([0] * 10)
    probabilities = np.tile([[1.0, 0.0]], (10, 1))
    assert expected_calibration_error(labels, probabilities) == 0.0


def test_top5_counts_the_true_class_among_the_five_most_likely():
    probabilities = np.eye(10)[[0, 0]] * 0.5 + np.linspace(0.01, 0.1, 10) / 2  # top 5: 0, 9, 8, 7, 6
    labels = np.array([6, 5])  # 6 is in the top 5, 5 is sixth
    assert compute_metrics(labels, probabilities, list("abcdefghij"))["top5_accuracy"] == 0.5


def test_training_writes_the_audit_into_run_folder_and_checkpoint(two_worker_run):
    _, summary, _ = two_worker_run
    for folder in (Path(summary["run_dir"]), Path(summary["best_checkpoint"])):
        for name in ("confusion_matrix.png", "per_class.png", "reliability.png", "errors.png"):
            assert (folder / name).read_bytes()[:4] == b"\x89PNG", (folder, name)
        metrics = json.loads((folder / "metrics.json").read_text())
        card = (folder / "MODEL_CARD.md").read_text()
        num_val = json.loads((Path(summary["best_checkpoint"]) / "metadata.json").read_text())["data"]["num_val"]
        assert metrics["examples"] == num_val and metrics["data"]["source"] == "synthetic"
        assert "`synthetic`" in card and f"validation split, {num_val} images" in card
        assert f"| accuracy | {metrics['accuracy']:.4f} |" in card
        assert f"| expected calibration error (15 bins) | {metrics['ece']:.4f} |" in card
        calibration = metrics["calibration"]  # before, and on images the temperature was not fitted on
        assert f"| expected calibration error before temperature scaling | {calibration['ece_before']:.4f} |\n" in card
        assert f"| ECE with the temperature fitted on the other half of these images | " \
               f"{calibration['ece_cross_fitted']:.4f} |\n| examples | {num_val} |" in card
        assert "Out-of-scope uses" in card and "faces or people" in card.lower()
