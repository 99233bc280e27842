"""Checkpoint safety: damaged or incompatible checkpoints get one clear error everywhere."""

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_ray.checkpoint import (METADATA_FILE, MODEL_FILE, file_sha256, load_checkpoint,
                                  read_metadata)
from cifar_ray.errors import CheckpointError
from cifar_ray.storage import write_file
from conftest import alter_one_weight


def damage(checkpoint, kind: str, tmp_path):
    """A copy of `checkpoint` with one kind of damage, and the error text it must cause."""
    copy = tmp_path / kind
    shutil.copytree(checkpoint, copy)
    if kind == "incompatible version":
        metadata = json.loads((copy / METADATA_FILE).read_text())
        (copy / METADATA_FILE).write_text(json.dumps({**metadata, "format_version": 99}))
        return copy, "checkpoint format version 99"
    if kind == "missing model":
        (copy / MODEL_FILE).unlink()
        return copy, f"{MODEL_FILE} is missing"
    if kind == "corrupt model":
        data = (copy / MODEL_FILE).read_bytes()
        (copy / MODEL_FILE).write_bytes(data[: len(data) // 2])  # a half-written upload
        return copy, "cannot be loaded"
    if kind == "altered model":  # a valid archive that loads, but not the model that was saved
        alter_one_weight(copy)
        return copy, "does not match the SHA-256"
    if kind == "missing metadata":
        (copy / METADATA_FILE).unlink()
        return copy, "not a cifar-ray checkpoint"
    if kind == "corrupt metadata":
        (copy / METADATA_FILE).write_text('{"format_version": 1, "mod')
        return copy, "corrupt metadata"
    raise ValueError(kind)


KINDS = ["incompatible version", "missing model", "corrupt model", "altered model", "missing metadata",
         "corrupt metadata"]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_checkpoint_raises_checkpoint_error(two_worker_run, tmp_path, kind):
    _, summary, _ = two_worker_run
    path, expected = damage(summary["best_checkpoint"], kind, tmp_path)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)


@pytest.mark.parametrize("stage", ["evaluate", "predict"])
@pytest.mark.parametrize("kind", ["incompatible version", "missing model", "corrupt model", "altered model"])
def test_cli_reports_a_damaged_checkpoint_in_one_line(two_worker_run, tmp_path, capsys, stage, kind):
    """The command's own main(), in this process: no TensorFlow import to pay per case
    (test_checkpoint_cli_in_a_subprocess_fails_in_one_line runs one as a real process)."""
    _, summary, _ = two_worker_run
    path, expected = damage(summary["best_checkpoint"], kind, tmp_path)
    extra = ["--out", str(tmp_path / "out")] if stage == "predict" else []
    with pytest.raises(SystemExit) as exited:  # --verbose: leave this process's log levels alone
        importlib.import_module(f"cifar_ray.{stage}").main(
            ["--checkpoint", str(path), "--data", "synthetic", "--verbose", *extra])
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last and str(path) in last


def test_checkpoint_cli_in_a_subprocess_fails_in_one_line(two_worker_run, tmp_path):
    _, summary, _ = two_worker_run
    path, expected = damage(summary["best_checkpoint"], "corrupt model", tmp_path)
    result = subprocess.run([sys.executable, "-m", "cifar_ray.evaluate", "--checkpoint", str(path),
                             "--data", "synthetic"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last and str(path) in last


def test_models_load_in_safe_mode(two_worker_run, tmp_path):
    """A model.keras carrying a Lambda layer (arbitrary Python) is refused, not run."""
    import keras

    _, summary, _ = two_worker_run
    path = tmp_path / "lambda"
    shutil.copytree(summary["best_checkpoint"], path)
    inputs = keras.Input((32, 32, 3))
    keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs)).save(path / MODEL_FILE)
    # with a metadata.json rewritten to match, as one who replaced the file on purpose would
    metadata = json.loads((path / METADATA_FILE).read_text())
    (path / METADATA_FILE).write_text(json.dumps({**metadata, "model_sha256": file_sha256(path / MODEL_FILE)}))
    with pytest.raises(CheckpointError, match="safe_mode"):
        load_checkpoint(path)


def test_checkpoints_record_their_model_files_sha256(two_worker_run):
    _, summary, _ = two_worker_run
    checkpoint = Path(summary["best_checkpoint"])
    assert read_metadata(checkpoint)["model_sha256"] == file_sha256(checkpoint / MODEL_FILE)


def test_an_interrupted_write_leaves_the_old_file_whole_and_no_debris(tmp_path):
    write_file(str(tmp_path), "summary.json", b'{"epochs": 1}')
    write_file(str(tmp_path), "summary.json", b'{"epochs": 2}')
    assert (tmp_path / "summary.json").read_bytes() == b'{"epochs": 2}'
    with pytest.raises(TypeError):  # fails inside the write, after the file was opened
        write_file(str(tmp_path), "summary.json", object())
    assert (tmp_path / "summary.json").read_bytes() == b'{"epochs": 2}'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]

