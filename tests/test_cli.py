"""The command lines a user types: help, one-line errors, evaluate's JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_images, write_parquet_folder

STAGES = {"train": "--num-workers", "evaluate": "--tta", "predict": "--out", "tune": "--num-samples",
          "serve": "--max-batch-size", "registry": "canary", "feedback": "export"}


def cli(stage, *args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", f"cifar_ray.{stage}", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_help(stage):
    result = cli(stage, "--help")
    assert result.returncode == 0
    assert f"python -m cifar_ray.{stage}" in result.stdout and STAGES[stage] in result.stdout


def cifar_ray_command() -> str:
    """The console script installed beside this interpreter (the venv's own, not PATH's)."""
    return str(Path(sys.executable).with_name("cifar-ray"))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_cifar_ray_command_answers_help_for_every_stage(stage):
    result = subprocess.run([cifar_ray_command(), stage, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: cifar-ray {stage}") and STAGES[stage] in result.stdout


def test_cifar_ray_command_lists_its_stages_and_rejects_an_unknown_one():
    listed = subprocess.run([cifar_ray_command(), "--help"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and all(stage in listed.stdout for stage in STAGES)
    unknown = subprocess.run([cifar_ray_command(), "trian"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "invalid choice: 'trian'" in unknown.stderr


HEAVY = ("tensorflow", "keras", "ray", "mlflow", "fastapi")


@pytest.mark.parametrize("args", [[stage, "--help"] for stage in sorted(STAGES)]
                         + [["train", "--model", "resnet999"], ["registry", "promote", "--help"]])
def test_help_and_flag_errors_import_no_tensorflow_keras_or_ray(args):
    """What makes `--help` answer at once: nothing heavy is imported to parse flags."""
    probe = ("import sys\nfrom cifar_ray.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
             f"    pass\nprint('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []", result.stdout + result.stderr


TF_START_UP_NOISE = ("absl::InitializeLog", "cudart_stub", "oneDNN custom operations", "cpu_feature_guard")


def without_tf_log_level(env: dict) -> dict:
    """The product must quiet TensorFlow itself, not inherit this session's setting."""
    return {k: v for k, v in env.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def test_verbose_keeps_tensorflows_start_up_lines():
    """The quiet default is checked where a real stage starts TensorFlow: evaluate, below."""
    probe = ("from cifar_ray.cli import parse_args\n"
             "parse_args('evaluate', ['--checkpoint', 'c', '--data', 'd', '--verbose'])\n"
             "import keras\nprint('imported', keras.__version__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env=without_tf_log_level(os.environ))
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr
    assert any(n in line for line in result.stderr.splitlines() for n in TF_START_UP_NOISE), result.stderr


def test_train_with_missing_data_path_fails_in_one_line(tmp_path):
    result = cli("train", "--data", str(tmp_path / "nowhere"), "--storage-path", str(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --data")


def test_offline_default_run_names_the_cause_before_ray_starts(tmp_path):
    """The default --data cifar10 with no network (a proxy that refuses): one line with the
    reason and what to do, and Ray never started."""
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras"), "https_proxy": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "RAY_ADDRESS": ""}
    result = cli("train", "--storage-path", str(tmp_path / "runs"), env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --data cifar10: could not download the Keras CIFAR-10 archive (")
    assert "refused" in last.lower() and "--data PATH" in last
    assert "Ray" not in result.stdout + result.stderr.replace(last, "")  # failed before Ray started


def test_a_ray_cluster_that_is_not_there_is_one_line_that_says_what_to_do(monkeypatch, capsys):
    """What ray.init raises when RAY_ADDRESS names no running cluster, as the user sees it.
    (Ray itself is faked: whether `auto` finds a cluster depends on what else runs here.)"""
    import ray

    from cifar_ray.cli import init_ray, run_cli

    def no_cluster(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(SystemExit) as exited:
        run_cli(init_ray)
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: cannot join the Ray cluster at RAY_ADDRESS=auto (Could not find any running Ray instance.); "
        "start it (`ray start --head`), or unset RAY_ADDRESS to start a local one")


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
                 "--out", str(tmp_path / "report"), env=without_tf_log_level(subprocess_env))
    assert result.returncode == 0, result.stderr[-2000:]
    # 30 images: evaluate scores them in its own process, which imported TensorFlow without a word.
    assert not any(n in result.stderr for n in TF_START_UP_NOISE), result.stderr[-2000:]
    printed = json.loads(result.stdout[result.stdout.index("{"):])
    # loss 0.0 is right for a model that the temperature sharpened to 1.0 on every image
    assert printed["examples"] == 30 and 0.0 <= printed["accuracy"] <= 1.0 and printed["loss"] >= 0
    written = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert {k: written[k] for k in printed} == printed
    assert (tmp_path / "report" / "MODEL_CARD.md").is_file()
