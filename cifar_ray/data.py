"""Ray Data pipeline: sources -> decoded uint8 images (images.py) -> seeded split (split.py; augmentation: augment.py).

Every source yields the same schema: `image` (uint8, 32x32x3, HWC) and `label` (int64,
CIFAR-10 class order). Images stay uint8 all the way to the model, which normalizes
them itself (models.py), so the constants computed here travel inside the checkpoint.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from cifar_ray.augment import AUGMENT_TASK_CPUS
from cifar_ray.config import CLASS_NAMES, IMAGE_SHAPE, DataConfig
from cifar_ray.errors import DataSourceError
from cifar_ray.images import decode_batch
from cifar_ray.storage import is_uri
from cifar_ray.split import (add_digests, compute_normalization, compute_patch_covariance, data_fingerprint,
                             split_by_digest)

IMAGE_EXTENSIONS = ["png", "jpg", "jpeg"]


@dataclass(frozen=True)
class DataInfo:
    """What the model needs to know about its data; stored in every checkpoint."""

    source: str
    num_train: int
    num_val: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    skipped_rows: int = 0  # bad rows left out with --skip-bad-rows
    num_holdout: int = 0  # images held out for the registry's fixed evaluation set
    fingerprint: str = ""  # of the source's decoded images and labels (data_fingerprint)
    # 12x12 covariance of normalized 2x2 patches: fast_resnet's whitening layer (models.py)
    patch_covariance: Optional[tuple[tuple[float, ...], ...]] = None

    def validation_split(self) -> dict:
        """The validation split as an audit's model card describes its data."""
        return {"source": self.source, "split": f"validation split, {self.num_val} images"}


# ---------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------

def read_source(spec: str, *, split: str = "train", synthetic_size: int = 2000, seed: int = 0,
                skip_bad_rows: bool = False):
    """Open a data source by name or path as a Ray Dataset of decoded images.

    `split` only matters for `cifar10`, the one source that ships a test split. A bad row
    (undecodable image, wrong size, label out of range) stops the read with an error naming
    its file and row; with `skip_bad_rows` it is reported and flagged `ok == False` instead
    (see `drop_bad_rows`).
    """
    if spec == "cifar10":
        return _read_keras_cifar10(split)
    if spec == "synthetic":
        return _read_synthetic(synthetic_size, seed=seed + (0 if split == "train" else 1))
    check_source(spec)
    import ray.data

    # a bad row's DataSourceError reaches the caller as itself, not as Ray's generic wrapper
    ray.data.DataContext.get_current().raise_original_map_exception = True
    decode = {"fn_kwargs": {"skip_bad_rows": skip_bad_rows}, "batch_format": "numpy"}
    if _is_parquet(spec):
        return _read_parquet(spec).map_batches(decode_batch, **decode)
    return _read_image_folder(spec).map_batches(decode_batch, **decode)


def count_rows(spec: str) -> int | None:
    """A Parquet source's rows from its files' metadata, without reading them (None for
    other sources): the total that progress lines count towards."""
    if spec in ("cifar10", "synthetic") or not _is_parquet(spec):
        return None
    import pyarrow.dataset

    try:
        return pyarrow.dataset.dataset(spec, format="parquet").count_rows()
    except Exception:  # reading it will report what is wrong, in its own words
        return None


def check_source(spec: str) -> None:
    """Reject a local --data path that does not exist, and fetch the Keras CIFAR-10 archive
    (or find it cached), before any Ray work starts: an offline machine fails in seconds."""
    if spec == "cifar10":
        load_keras_cifar10()
    if spec not in ("cifar10", "synthetic") and not is_uri(spec) and not os.path.exists(spec):
        raise DataSourceError(
            f"--data {spec}: no such file or folder (expected 'cifar10', 'synthetic', "
            "a Parquet folder or an image folder)")


def _is_parquet(spec: str) -> bool:
    """A URI (Parquet is the only remote source) or a local folder holding Parquet files."""
    return is_uri(spec) or _contains_parquet(Path(spec))


def _contains_parquet(path: Path) -> bool:
    return path.suffix == ".parquet" or any(path.rglob("*.parquet"))


def _read_parquet(uri: str):
    """Encoded rows (image, label, path) of every Parquet file under `uri`, schema checked."""
    import ray.data

    try:
        ds = ray.data.read_parquet(uri, include_paths=True)
        columns = ds.schema().names
    except (ValueError, OSError) as e:  # no files, unreadable footer, ...
        raise DataSourceError(f"--data {uri}: cannot read Parquet ({str(e).splitlines()[0]})") from None
    missing = [c for c in ("image", "label") if c not in columns]
    if missing:
        raise DataSourceError(f"--data {uri}: missing column(s) {', '.join(missing)} "
                              f"(found {', '.join(c for c in columns if c != 'path')})")
    return ds.select_columns(["image", "label", "path"])


def _read_image_folder(root: str):
    import ray.data

    try:
        ds = ray.data.read_binary_files(root, include_paths=True, file_extensions=IMAGE_EXTENSIONS)
    except (ValueError, OSError) as e:
        raise DataSourceError(f"--data {root}: no images found ({str(e).splitlines()[0]})") from None
    return ds.map_batches(label_from_folder, batch_format="numpy")


def load_keras_cifar10():
    """((x_train, y_train), (x_test, y_test)), downloaded by Keras on first use."""
    import keras

    try:
        return keras.datasets.cifar10.load_data()
    except Exception as e:  # network errors come in many types
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataSourceError(
            f"--data cifar10: could not download the Keras CIFAR-10 archive ({type(e).__name__}: {cause}); "
            "check the network or proxy, or pass --data PATH to a Parquet folder or image folder") from None


def _read_keras_cifar10(split: str):
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    (x_train, y_train), (x_test, y_test) = load_keras_cifar10()
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    table = pa.table({"image": ArrowTensorArray.from_numpy(x), "label": y.reshape(-1).astype("int64")})
    return ray.data.from_arrow(table).repartition(8)


def _read_synthetic(n: int, seed: int):
    """A small learnable data set: each class is a distinct colour plus noise."""
    import ray.data

    return ray.data.range(n, override_num_blocks=max(1, min(8, n // 256))).map_batches(
        make_synthetic_batch, batch_format="numpy", fn_kwargs={"seed": seed})


def make_synthetic_batch(batch: dict, seed: int) -> dict:
    ids = batch["id"].astype(np.int64)
    labels = ids % len(CLASS_NAMES)
    palette = np.random.default_rng(1234).uniform(30, 225, size=(len(CLASS_NAMES), 3))
    noise = np.stack([np.random.default_rng([seed, int(i)]).normal(0, 25, IMAGE_SHAPE) for i in ids])
    images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return {"image": images, "label": labels}


def drop_bad_rows(ds):
    """(rows that decoded, number skipped) of a dataset read with skip_bad_rows."""
    ds = ds.materialize()
    good = ds.filter(lambda row: row["ok"]).drop_columns(["ok"]).materialize()
    return good, ds.count() - good.count()


def label_from_folder(batch: dict) -> dict:
    """`<root>/<class_name>/x.png` -> label index of class_name."""
    names = [Path(p).parent.name for p in batch["path"]]
    unknown = sorted(set(names) - set(CLASS_NAMES))
    if unknown:
        raise DataSourceError(f"image folder has unknown class folder(s) {unknown}; "
                              f"expected names from {', '.join(CLASS_NAMES)}")
    return {"image": batch["bytes"], "label": np.array([CLASS_NAMES.index(n) for n in names]),
            "path": batch["path"]}


# ---------------------------------------------------------------------------------------
# The training source, split (split.py)
# ---------------------------------------------------------------------------------------

def training_steps_per_epoch(num_train: int, global_batch_size: int, num_workers: int) -> int:
    """Optimizer steps in one epoch, for any worker count: Ray Train gives each worker an
    equal share of the training split, and each step takes one full per-worker batch."""
    return (num_train // num_workers) // (global_batch_size // num_workers)


def shuffle_every_epoch(train):
    """The training split in a new order every epoch: a task permutes each block's rows (a new
    draw every pass) ahead of the augmentation.

    The split comes out of split.py as one block, and the workers shuffle only within a
    buffer of a few batches: without this, every epoch would see its images in nearly the
    same order. The task asks for the small share of a CPU that the augmentation tasks ask
    for: the training workers reserve the rest, and a task that asks for more never starts.
    """
    return train.map_batches(_permuted_rows, batch_size=None, batch_format="numpy", num_cpus=AUGMENT_TASK_CPUS)


def _permuted_rows(batch: dict) -> dict:
    order = np.random.default_rng().permutation(len(next(iter(batch.values()))))
    return {key: column[order] for key, column in batch.items()}


def load_training_data(cfg: DataConfig, seed: int):
    """Read, decode and split the training source. Returns (train, val, holdout, DataInfo).

    `holdout` is the fixed evaluation set (see `split.in_holdout`): taken out before the seeded
    train/validation split, so no run ever trains on it. All three are materialized in the
    object store: decoding happens once, and the Ray Train workers never wait on reads
    competing with them for CPUs.
    """
    ds = read_source(cfg.data, split="train", synthetic_size=cfg.synthetic_size, seed=seed,
                     skip_bad_rows=cfg.skip_bad_rows)
    skipped = 0
    if cfg.skip_bad_rows:
        ds, skipped = drop_bad_rows(ds)
        print(f"skipped {skipped} bad row(s) of {cfg.data}", file=sys.stderr, flush=True)
    ds = add_digests(ds).materialize()  # decoding and hashing happen once, here
    if ds.count() == 0:
        raise DataSourceError(f"--data {cfg.data}: no images (empty source)")
    train, val, holdout = split_by_digest(ds, cfg.val_fraction, cfg.limit, seed)
    if train.count() == 0 or val.count() == 0:
        raise DataSourceError(f"--data {cfg.data}: too few images for a train/validation split")
    mean, std = compute_normalization(train)
    info = DataInfo(source=cfg.data, num_train=train.count(), num_val=val.count(),
                    mean=tuple(mean), std=tuple(std), skipped_rows=skipped,
                    patch_covariance=compute_patch_covariance(train, mean, std),
                    num_holdout=holdout.count(), fingerprint=data_fingerprint(ds.select_columns(["digest", "label"])))
    return train, val, holdout, info
