"""Training-time augmentation: pure numpy functions, vectorized over a batch, and the Ray
Data step that applies them in small tasks beside the training workers, with new draws
every epoch.

    crop_flip   reflect-pad by 4 (--crop-padding; fast_resnet's recipe: 2), random 32x32 crop,
                horizontal flip (the usual CIFAR recipe)
    notebook    the notebook's ImageDataGenerator: rotation, shifts, flip, optional zoom
"""

from __future__ import annotations

import numpy as np

AUGMENT_TASK_CPUS = 0.25  # small tasks fit beside the training workers


def add_augmentation(ds, mode: str, crop_padding: int = 4):
    """Lazily augment `ds`: every pass over it (every epoch) draws new transforms."""
    if mode == "none":
        return ds
    return ds.map_batches(augment_batch, batch_format="numpy", fn_kwargs={"mode": mode, "crop_padding": crop_padding},
                          batch_size=512, num_cpus=AUGMENT_TASK_CPUS)


def augment_batch(batch: dict, mode: str, rng: np.random.Generator | None = None, crop_padding: int = 4) -> dict:
    rng = rng or np.random.default_rng()
    if mode == "crop_flip":
        return {**batch, "image": crop_flip(batch["image"], rng, pad=crop_padding)}
    return {**batch, "image": notebook_augment(batch["image"], rng)}


def crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Reflect-pad by `pad`, take a random 32x32 crop, flip half the images."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    top = rng.integers(0, 2 * pad + 1, n)
    left = rng.integers(0, 2 * pad + 1, n)
    rows = top[:, None] + np.arange(h)
    cols = left[:, None] + np.arange(w)
    flip = rng.random(n) < 0.5
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def notebook_augment(images: np.ndarray, rng: np.random.Generator, rotation: float = 15.0,
                     shift: float = 0.1, zoom: float = 0.0) -> np.ndarray:
    """The notebook's ImageDataGenerator: rotation, shifts, horizontal flip, optional zoom.

    Bilinear sampling with edge pixels repeated outside the image (Keras' fill_mode
    'nearest'), as one vectorized affine warp over the whole batch.
    """
    n, h, w, _ = images.shape
    angle = np.deg2rad(rng.uniform(-rotation, rotation, n))[:, None, None]
    shift_y = (rng.uniform(-shift, shift, n) * h)[:, None, None]
    shift_x = (rng.uniform(-shift, shift, n) * w)[:, None, None]
    scale = rng.uniform(1 - zoom, 1 + zoom, n)[:, None, None]
    flip = (rng.random(n) < 0.5)[:, None, None]

    cy, cx = (h - 1) / 2, (w - 1) / 2
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    y, x = y - cy, np.where(flip, cx - x, x - cx)  # flipping = mirroring the sample grid
    src_y = (np.cos(angle) * y - np.sin(angle) * x) * scale + cy - shift_y
    src_x = (np.sin(angle) * y + np.cos(angle) * x) * scale + cx - shift_x
    return _bilinear_sample(images, src_y, src_x)


def _bilinear_sample(images: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sample every image at its own (y, x) grid. Pixels are gathered from the flattened
    batch with np.take (about 1.8x faster than fancy indexing) and blended in float32."""
    n, h, w, c = images.shape
    y = np.clip(y, 0, h - 1).astype(np.float32)
    x = np.clip(x, 0, w - 1).astype(np.float32)
    y0, x0 = np.floor(y).astype(np.intp), np.floor(x).astype(np.intp)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (y - y0)[..., None], (x - x0)[..., None]
    pixels = images.reshape(n * h * w, c)
    first = np.arange(n)[:, None, None] * (h * w)  # each image's first pixel

    def at(row, col):
        return np.take(pixels, first + row * w + col, axis=0).astype(np.float32)

    top = at(y0, x0)
    top += (at(y0, x1) - top) * wx
    bottom = at(y1, x0)
    bottom += (at(y1, x1) - bottom) * wx
    top += (bottom - top) * wy
    return np.rint(top).astype(np.uint8)
