"""The command lines a user types: help, one-line errors, evaluate's JSON."""

import json
import subprocess
import sys

import pytest

from conftest import make_images, write_parquet_folder

STAGES = {"train": "--num-workers", "evaluate": "--tta", "predict": "--out", "tune": "--num-samples",
          "serve": "--max-batch-size"}


def cli(stage, *args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", f"cifar_ray.{stage}", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_help(stage):
    result = cli(stage, "--help")
    assert result.returncode == 0
    assert f"python -m cifar_ray.{stage}" in result.stdout and STAGES[stage] in result.stdout


def test_train_with_missing_data_path_fails_in_one_line(tmp_path):
    result = cli("train", "--data", str(tmp_path / "nowhere"), "--storage-path", str(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --data")


def test_train_rejects_bad_flag_values():
    result = cli("train", "--model", "resnet999")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_evaluate_with_missing_checkpoint_fails_in_one_line(tmp_path):
    result = cli("evaluate", "--checkpoint", str(tmp_path / "none"), "--data", "synthetic")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no such checkpoint folder" in result.stderr.strip().splitlines()[-1]


def test_evaluate_prints_metrics_for_a_parquet_folder(two_worker_run, subprocess_env, tmp_path):
    _, summary, _ = two_worker_run
    images, labels = make_images(30, seed=9)
    data = write_parquet_folder(tmp_path / "eval", images, labels, fmt="JPEG")
    result = cli("evaluate", "--checkpoint", summary["best_checkpoint"], "--data", str(data),
                 "--out", str(tmp_path / "report"), env=subprocess_env)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = json.loads(result.stdout[result.stdout.index("{"):])
    assert printed["examples"] == 30 and 0.0 <= printed["accuracy"] <= 1.0 and printed["loss"] > 0
    written = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert {k: written[k] for k in printed} == printed
    assert (tmp_path / "report" / "MODEL_CARD.md").is_file()
