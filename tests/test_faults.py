"""Training faults: killed workers, a killed driver, a full disk, too many failures, unwritable storage.

Each test runs `python -m cifar_ray.train` as its own driver process on the session's
Ray cluster and kills real processes with SIGKILL: the training workers, found through
Ray's state API, or the driver itself (whose reruns then run in this process, the first on
a disk that fills up). Every wait is bounded.
"""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import full_disk_loop, train_worker_pids

from cifar_ray.checkpoint import checkpoint_names, load_checkpoint, read_metadata

# One worker: a group of one starts and steps faster (a run killed twice: 43 s, 61 s with two).
# What these tests prove (resume from the registered checkpoint, each epoch once, the
# failure budget, the one-line error) does not depend on the group's size; a group of two
# starts, MultiWorkerMirroredStrategy and all, in conftest's two_worker_run and across two
# nodes in test_cluster.py.
SMOKE = ["--preset", "smoke", "--synthetic-size", "600", "--batch-size", "64", "--num-workers", "1"]


def log_of(storage: Path, name: str) -> Path:
    return storage.parent / f"{name}.log"


def training_flags(storage: Path, name: str, *args: str) -> list[str]:
    return [*SMOKE, "--storage-path", str(storage), "--name", name, *args]


def start_training(storage: Path, name: str, *args: str, env: dict) -> subprocess.Popen:
    """`python -m cifar_ray.train` in the background, its output in log_of(storage, name)."""
    log = open(log_of(storage, name), "w")
    return subprocess.Popen([sys.executable, "-m", "cifar_ray.train", *training_flags(storage, name, *args)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


def history_epochs(run_dir: Path) -> list[int]:
    with open(run_dir / "history.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def registered_checkpoint(run_dir: Path) -> str | None:
    """The latest checkpoint Ray Train's controller has registered (from its snapshot file):
    the one a restarted worker group resumes from. A checkpoint folder exists a moment earlier."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return latest["checkpoint_dir_name"] if latest else None


def finish(process: subprocess.Popen, storage: Path, name: str, timeout: float = 300) -> str:
    """Wait for the training process; its output."""
    process.wait(timeout=timeout)
    return log_of(storage, name).read_text()


@pytest.fixture
def storage(tmp_path):
    return tmp_path / "runs"


def test_a_killed_worker_resumes_from_the_registered_checkpoint_and_one_kill_too_many_fails_clearly(
        ray_cluster, subprocess_env, storage):
    """--max-failures 1: the first kill restarts the group, which resumes from the checkpoint
    Ray Train registered and trains on; the second is one failure more than allowed, and the
    run stops with a one-line error that names the checkpoints kept and how to resume. (A run
    that finishes after its driver was killed: the driver test below. Kept as one run: each
    group start costs about 10 s of the suite.)"""
    # 8 epochs, of which about 3 are trained: each kill must land before a group of one
    # (0.8 s an epoch) has finished
    process = start_training(storage, "kill", "--epochs", "8", "--max-failures", "1", env=subprocess_env)
    run_dir = storage / "kill"
    try:
        wait_for(lambda: registered_checkpoint(run_dir), 240, "the first registered checkpoint")
        first = wait_for(lambda: train_worker_pids(ray_cluster), 60, "train workers")
        os.kill(min(first), signal.SIGKILL)
        second = wait_for(lambda: train_worker_pids(ray_cluster) - first, 120, "restarted train workers")
        start = registered_checkpoint(run_dir)  # what the new group resumes from: the latest registered
        before = read_metadata(run_dir / start)["history"]
        resumed = wait_for(lambda: (r := registered_checkpoint(run_dir)) != start and r, 120,
                           "a checkpoint registered by the restarted group")
        os.kill(min(second), signal.SIGKILL)
        log = finish(process, storage, "kill")
    finally:
        process.kill()
    # resumed from the registered checkpoint: the epochs before it were not trained again (a
    # retrained epoch differs, in its time if nothing else), and each epoch is there once
    history = read_metadata(run_dir / resumed)["history"]
    assert history[:len(before)] == before
    assert [row["epoch"] for row in history] == list(range(1, len(history) + 1)) and len(history) > len(before)

    assert process.returncode == 2, log[-3000:]
    assert not any(line.startswith("Traceback") for line in log.splitlines())  # workers' own logs may have one
    errors = [line for line in log.splitlines() if line.startswith("error: ")]  # Ray may stream more after it
    assert len(errors) == 1, log[-3000:]
    last = errors[0]
    assert last.startswith("error: training failed after 1 restart(s)"), last
    assert "rerun with --name kill to resume" in last
    kept = checkpoint_names(str(run_dir))  # complete ones: a save cut short is left out
    assert kept and f"(latest {kept[-1]})" in last
    model, metadata = load_checkpoint(run_dir / kept[-1])
    assert metadata["epoch"] >= len(history) and model.count_params() > 0


def test_a_killed_driver_and_a_full_disk_each_leave_a_run_its_rerun_resumes(ray_cluster, subprocess_env, storage,
                                                                            capsys):
    """The driver is SIGKILLed after epoch 2's checkpoint. Its rerun (in this process, as
    `python -m cifar_ray.train` runs it) resumes, then meets a full disk saving epoch 3: one
    clear error, epochs 1-2 intact, the cut-short folder not counted. The next rerun trains
    epoch 3 only, its optimizer exactly where an uninterrupted run's would be; one more, with
    nothing left to train, starts no worker group and registers no second version. (One run
    for both faults: each run start costs about 12 s of the suite.)"""
    from cifar_ray.cli import build_parser
    from cifar_ray.config import Config
    from cifar_ray.data import training_steps_per_epoch
    from cifar_ray.errors import TrainingFailed
    from cifar_ray.flags import config_from_args
    from cifar_ray.model_registry import Registry
    from cifar_ray.models import build_optimizer
    from cifar_ray.run_folder import resolve_run
    from cifar_ray.tracking import tracking_uri
    from cifar_ray.train import run

    args = ["--epochs", "3", "--schedule", "cosine"]  # Adam (the smoke preset's) with a moving LR
    process = start_training(storage, "driver", *args, env=subprocess_env)
    try:
        wait_for(lambda: "epoch_0002" in checkpoint_names(str(storage / "driver")), 240, "the second checkpoint")
        before = read_metadata(storage / "driver" / "epoch_0002")["history"]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    wait_for(lambda: not train_worker_pids(ray_cluster), 90, "the dead driver's workers to go")

    # The reruns: the same flags, and no second interpreter to start
    cfg = resolve_run(config_from_args(build_parser("train").parse_args(training_flags(storage, "driver", *args))))
    run_dir = storage / "driver"
    with pytest.raises(TrainingFailed) as failed:
        run(cfg.with_overrides({"max_failures": 0}), train_loop=full_disk_loop(epoch=3))
    message = str(failed.value)
    assert "No space left on device" in message, message
    assert "(latest epoch_0002)" in message and "rerun with --name driver to resume" in message
    assert (run_dir / "epoch_0003").is_dir() and checkpoint_names(str(run_dir)) == ["epoch_0001", "epoch_0002"]
    for epoch in ("epoch_0001", "epoch_0002"):
        assert load_checkpoint(run_dir / epoch)[1]["epoch"] == int(epoch[-1])  # whole: the SHA-256 matches
    kept = read_metadata(run_dir / "epoch_0002")["history"]

    summary = run(cfg)
    assert history_epochs(run_dir) == [1, 2, 3]
    model, metadata = load_checkpoint(run_dir / "epoch_0003")
    # It resumed from the last checkpoint Ray Train had recorded: epoch 2 (or epoch 1 when the
    # driver died between epoch 2's upload and its registration, and the first rerun trained
    # epoch 2 again). Never from scratch, and epochs 1-2 were not trained again now.
    assert metadata["history"][0] == before[0] and metadata["history"][:2] == kept
    assert all(math.isfinite(row["loss"]) for row in metadata["history"])

    # the optimizer resumed where it stopped: exactly the planned steps, and the LR of an
    # uninterrupted run at every epoch
    saved = Config.from_dict(metadata["config"])
    steps = training_steps_per_epoch(metadata["data"]["num_train"], saved.train.batch_size, num_workers=1)
    assert int(model.optimizer.iterations) == 3 * steps
    uninterrupted = build_optimizer(saved.train, steps)
    for row in metadata["history"]:
        uninterrupted.iterations.assign(row["epoch"] * steps)
        assert row["lr"] == pytest.approx(float(uninterrupted.learning_rate), rel=1e-5)

    # Once more, with nothing left to train: the run ends without starting a worker group.
    # (A Tune trial restored after its last epoch re-reports it instead: test_tune's resume
    # test, when the kill lands that late.) Its best checkpoint, registered already, is not
    # registered again.
    trained_at = (run_dir / "epoch_0003" / "model.keras").stat().st_mtime
    history = (run_dir / "history.csv").read_text()
    registry = Registry(tracking_uri(cfg))
    versions = len(registry.versions())
    capsys.readouterr()
    again = run(cfg)
    assert "all 3 epochs of driver are trained already: no worker group starts" in capsys.readouterr().out
    assert (run_dir / "history.csv").read_text() == history
    assert (run_dir / "epoch_0003" / "model.keras").stat().st_mtime == trained_at
    assert again["best_val_accuracy"] == summary["best_val_accuracy"]
    assert again["registry"]["version"] == summary["registry"]["version"] and not again["registry"]["promoted"]
    assert len(registry.versions()) == versions


def test_unwritable_storage_fails_before_training(ray_cluster, subprocess_env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "cifar_ray.train", *SMOKE,
                             "--storage-path", str(blocker / "runs")],
                            env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not writable" in result.stderr.strip().splitlines()[-1]
    assert "data:" not in result.stdout  # stopped before reading any data
    assert time.monotonic() - started < 60
