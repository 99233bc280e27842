"""The fixed holdout, the seeded train/validation split, and what training needs to know
of its split: normalization constants, the whitening layer's patch covariance, and a
fingerprint of the data. data.load_training_data puts them together.

Each image's place follows from an 8-byte hash of its decoded pixels, never from row order
(which parallel reads change from run to run) or from the file format that held it.
"""

from __future__ import annotations

import hashlib

import numpy as np

HOLDOUT_BUCKETS = 20  # one image in 20 (5%) goes to the fixed evaluation set, never trained on


def image_digests(images: np.ndarray) -> np.ndarray:
    """An 8-byte hash of each image's decoded pixels (uint64): the same whatever file format held it."""
    digests = b"".join(hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=8).digest() for x in images)
    return np.frombuffer(digests, dtype="<u8")


def _with_digest_column(batch: dict) -> dict:
    return {**batch, "digest": image_digests(batch["image"])}


def add_digests(ds):
    """Lazily add each image's `digest` column, from which the holdout and fingerprint derive."""
    return ds.map_batches(_with_digest_column, batch_format="numpy")


def in_holdout(digests: np.ndarray) -> np.ndarray:
    """Which images belong to the fixed evaluation set: one in HOLDOUT_BUCKETS, chosen by the
    pixels' digest, so the same images whatever --seed, --limit or --val-fraction say."""
    return digests % HOLDOUT_BUCKETS == 0


def seeded_keys(digests: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 per digest (splitmix64's mixer): ranks images for the split."""
    x = digests.astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _rows_where(batch: dict, holdout: bool, seed: int, low: int, high: int | None) -> dict:
    """The batch's rows in the holdout (or not), of seeded key in [low, high), without the digest."""
    keys = seeded_keys(batch["digest"], seed)
    keep = (in_holdout(batch["digest"]) == holdout) & (keys >= np.uint64(low))
    if high is not None:
        keep &= keys < np.uint64(high)
    return {key: np.asarray(column)[keep] for key, column in batch.items() if key != "digest"}


def split_by_digest(ds, val_fraction: float, limit: int | None, seed: int) -> tuple:
    """(train, validation, holdout) of a dataset with a `digest` column (add_digests), all
    materialized, without the column.

    Each image's place follows from its pixels' digest, never from row order, which parallel
    reads change from run to run: the holdout from the digest alone (in_holdout), the rest by a
    seeded ranking (seeded_keys): the first val_fraction of it is the validation split, and
    --limit takes the first of the others. So a rerun with the same --seed, a resumed run
    above all, never trains on images it validated on before.
    """
    digests = np.concatenate([b["digest"] for b in ds.select_columns(["digest"]).iter_batches(
        batch_size=65536, batch_format="numpy")])
    keys = np.sort(seeded_keys(digests[~in_holdout(digests)], seed))
    num_val = len(keys) - int(len(keys) * (1 - val_fraction))  # as Ray Data's train_test_split counts
    val_end = int(keys[num_val]) if num_val < len(keys) else None
    train_end = int(keys[num_val + limit]) if limit and val_end is not None and num_val + limit < len(keys) else None

    train = _part(ds, False, seed, val_end, train_end) if val_end is not None else _part(ds, False, seed, 0, 0)
    return train, _part(ds, False, seed, 0, val_end), holdout_of(ds)


def holdout_of(ds):
    """The fixed evaluation set of a dataset with a `digest` column, materialized, without it."""
    return _part(ds, True)


def _part(ds, holdout: bool, seed: int = 0, low: int = 0, high: int | None = None):
    return ds.map_batches(_rows_where, fn_kwargs={"holdout": holdout, "seed": seed, "low": low, "high": high},
                          batch_format="numpy").materialize()


def data_fingerprint(ds) -> str:
    """A hash of a dataset's images and labels that ignores row order and file encoding;
    reads the `digest` column where the dataset has one, instead of hashing the images."""
    rows = []
    for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        digests = batch["digest"] if "digest" in batch else image_digests(batch["image"])
        rows += [int(d).to_bytes(8, "little") + int(label).to_bytes(1, "little")
                 for d, label in zip(digests, batch["label"])]
    return hashlib.sha256(b"".join(sorted(rows))).hexdigest()[:16]


def compute_normalization(ds) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of pixel values scaled to [0, 1]."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        pixels = batch["image"].reshape(-1, 3).astype(np.float64) / 255.0
        total += pixels.sum(0)
        total_sq += (pixels ** 2).sum(0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
    return mean.round(6), std.round(6)


def compute_patch_covariance(ds, mean, std, max_images: int = 5000, size: int = 2) -> tuple:
    """Covariance of the normalized images' size x size patches, from the first `max_images`.

    Patches are flattened in Keras' kernel order (row, column, channel). The pixels are
    normalized (zero mean), so this is the patches' second moment, as in airbench.
    """
    moment = np.zeros((size * size * 3,) * 2)
    count = num_patches = 0
    for batch in ds.iter_batches(batch_size=1000, batch_format="numpy"):
        images = (batch["image"][: max_images - count] / 255.0 - mean) / std
        patches = np.lib.stride_tricks.sliding_window_view(images, (size, size), axis=(1, 2))
        patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, moment.shape[0])
        moment += patches.T @ patches
        count += len(images)
        num_patches += len(patches)
        if count >= max_images:
            break
    covariance = moment / num_patches
    return tuple(tuple(row) for row in covariance.round(6))
