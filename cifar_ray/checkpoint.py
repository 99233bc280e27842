"""The self-describing checkpoint: one folder that is all serving and evaluation need.

    <checkpoint>/
      model.keras     Keras native format: architecture, weights, optimizer state.
                      The model normalizes its own input (see models.py).
      metadata.json   format version, model name, class names, input shape,
                      normalization constants, full training config, epoch, metrics,
                      per-epoch history, data source and sizes, library versions, and
                      the SHA-256 of model.keras.

Loading checks model.keras against its SHA-256, so a truncated or altered model file is
refused, even one that is still a valid archive. Models load with Keras `safe_mode=True`:
nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from cifar_ray import storage
from cifar_ray.errors import CheckpointError

FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"


def library_versions() -> dict:
    import keras
    import ray
    import tensorflow as tf

    return {"ray": ray.__version__, "tensorflow": tf.__version__, "keras": keras.__version__}


def make_metadata(cfg, info, *, epoch: int, metrics: dict, history: list[dict]) -> dict:
    """Everything a reader needs besides the weights. `cfg` is a Config, `info` a DataInfo."""
    from cifar_ray.config import CLASS_NAMES, IMAGE_SHAPE

    return {
        "format_version": FORMAT_VERSION,
        "model": cfg.model.model,
        "class_names": list(CLASS_NAMES),
        "input_shape": list(IMAGE_SHAPE),
        "input_dtype": "uint8 RGB, 0-255, HWC",
        "normalization": {"mean": list(info.mean), "std": list(info.std)},
        "config": cfg.to_dict(),
        "data": asdict(info),
        "epoch": epoch,
        "metrics": metrics,
        "history": history,
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save_checkpoint(directory: str | Path, model, metadata: dict) -> None:
    """model.keras, then metadata.json with the model file's SHA-256."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_FILE)
    metadata = {**metadata, "model_sha256": file_sha256(directory / MODEL_FILE)}
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_metadata(directory: str | Path) -> dict:
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a cifar-ray checkpoint (no {METADATA_FILE})")
    try:
        metadata = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt metadata ({e})") from None
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: checkpoint format version {version!r}; "
                              f"this cifar-ray reads version {FORMAT_VERSION}")
    return metadata


def load_checkpoint(directory: str | Path, compile: bool = True):
    """Load (model, metadata) from a local checkpoint folder, with Keras safe_mode."""
    import keras

    import cifar_ray.models  # noqa: F401  registers fast_resnet's own layer, initializer and optimizer

    metadata = read_metadata(directory)
    model_path = Path(directory) / MODEL_FILE
    if not model_path.is_file():
        raise CheckpointError(f"{directory}: {MODEL_FILE} is missing")
    expected = metadata.get("model_sha256")  # absent only in checkpoints saved before it was recorded
    if expected and file_sha256(model_path) != expected:
        raise CheckpointError(f"{model_path}: cannot be loaded: it does not match the SHA-256 that "
                              f"{METADATA_FILE} recorded when it was saved (damaged or changed since)")
    try:
        model = keras.models.load_model(model_path, compile=compile, safe_mode=True)
    except Exception as e:  # Keras raises many types for a damaged archive
        raise CheckpointError(f"{model_path}: cannot be loaded ({type(e).__name__}: {e})") from None
    return model, metadata


@contextmanager
def local_checkpoint(path_or_uri: str) -> Iterator[Path]:
    """A local folder with the checkpoint's files: the path itself, or a download of a URI."""
    if not storage.is_uri(path_or_uri):
        if not Path(path_or_uri).is_dir():
            raise CheckpointError(f"{path_or_uri}: no such checkpoint folder")
        yield Path(path_or_uri)
        return
    with tempfile.TemporaryDirectory(prefix="cifar-ray-ckpt-") as tmp:
        try:
            storage.copy_folder(path_or_uri, tmp)
        except Exception as e:
            raise CheckpointError(f"{path_or_uri}: cannot be fetched ({e})") from None
        yield Path(tmp)


def checkpoint_names(run_dir: str) -> list[str]:
    """The complete checkpoint folders (epoch_NNNN) of a Ray Train run, oldest first.

    A folder whose upload was cut short (a worker killed while saving) lacks a file and
    is left out; Ray Train never registered it, so resuming skips it too.
    """
    fs, folders = storage.subfolders(run_dir, "epoch_")
    return sorted(f.base_name for f in folders if _is_complete(fs, f.path))


def _is_complete(fs, folder: str) -> bool:
    """metadata.json is there and model.keras ends as a zip archive ends (not cut short)."""
    import pyarrow.fs

    meta, model = fs.get_file_info([f"{folder}/{METADATA_FILE}", f"{folder}/{MODEL_FILE}"])
    if meta.type != pyarrow.fs.FileType.File or model.type != pyarrow.fs.FileType.File or model.size < 22:
        return False
    with fs.open_input_file(model.path) as f:
        f.seek(model.size - 22)
        return f.read(4) == b"PK\x05\x06"  # zip end-of-central-directory record


def best_checkpoint_in(run_dir: str, metric: str = "val_accuracy") -> str:
    """The checkpoint folder (epoch_NNNN) of a Ray Train run with the highest `metric`."""
    names = checkpoint_names(run_dir)
    if not names:
        raise CheckpointError(f"{run_dir}: no checkpoints")
    score = {n: json.loads(storage.read_file(f"{run_dir.rstrip('/')}/{n}", METADATA_FILE))["metrics"][metric]
             for n in names}
    return f"{run_dir.rstrip('/')}/{max(names, key=score.__getitem__)}"
