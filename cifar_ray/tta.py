"""Test-time augmentation: airbench's six views of an image, one answer.

The image and its mirror count 1/4 each; the same pair moved one pixel up-left and one
pixel down-right (reflect padding) 1/8 each. The views' log-probabilities are averaged and
turned back into probabilities: the class this picks is the one that averaging logits picks,
as airbench does. It costs six forward passes. A checkpoint says whether its model is
scored this way (`tta` in its config: fast_resnet's recipe turns it on), and evaluate, the
gate and Serve follow it unless told otherwise.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def tta_of(metadata: dict) -> bool:
    """Whether the checkpoint's model is meant to be scored with TTA."""
    return bool(metadata.get("config", {}).get("model", {}).get("tta", False))


def views(images: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """(weight, images) for each of the six views of a batch of NHWC images."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    h, w = images.shape[1:3]
    shifted = (padded[:, :h, :w], padded[:, 2:, 2:])  # up-left, down-right
    return [(0.25, images), (0.25, images[:, :, ::-1]),
            *[(0.125, v) for s in shifted for v in (s, s[:, :, ::-1])]]


def predict_with_tta(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """Class probabilities of `images` from all six views, in one call of `predict`."""
    weighted = views(images)
    stacked = predict(np.concatenate([v for _, v in weighted]))
    log_probs = np.log(np.clip(np.asarray(stacked, np.float64), 1e-30, 1.0)).reshape(len(weighted), len(images), -1)
    mean = np.tensordot(np.array([w for w, _ in weighted]), log_probs, axes=1)
    mean -= mean.max(axis=1, keepdims=True)
    exp = np.exp(mean)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
