"""Epoch-boundary waits from Ray killing idle workers: Ray's default vs cifar-ray's local Ray.

    python benchmarks/idle_workers.py [--rounds 2] [--epochs 5] [--images 400]

On a machine with few CPUs, Ray kills an idle task worker after 1 s once there are more
workers than CPUs (`idle_worker_killing_time_threshold_ms`). Between two epochs, the
training split's Ray Data task idles through validation and the checkpoint; its worker is
killed, and the next epoch's first batch waits for a new worker process. The Ray that
cifar-ray starts on one machine keeps idle workers 60 s (cli.LOCAL_RAY_ENV).

Each side starts its own 2-CPU Ray (the setting is read when Ray starts), fits the smoke
model with 1 worker through `train.make_trainer`, and takes each epoch's time as the worker
measured it (the checkpoint's history). Sides interleave (default, kept, default, ...); the
medians of the epochs after the first, and their ratio, are printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from cifar_ray.cli import LOCAL_RAY_ENV

KEEP_MS = int(LOCAL_RAY_ENV["RAY_idle_worker_killing_time_threshold_ms"])
SIDES = {"ray default (1 s)": 1_000, f"cifar-ray ({KEEP_MS / 1000:g} s)": KEEP_MS}


def epoch_seconds(keep_ms: int, epochs: int, images: int, storage: str) -> list[float]:
    """Start a 2-CPU Ray that keeps idle workers `keep_ms`, fit, stop Ray; each epoch's seconds."""
    import ray

    from cifar_ray.checkpoint import read_metadata
    from cifar_ray.config import PRESETS
    from cifar_ray.data import load_training_data
    from cifar_ray.run_folder import resolve_run
    from cifar_ray.train import make_trainer

    ray.init(num_cpus=2, logging_level="WARNING", _system_config={"idle_worker_killing_time_threshold_ms": keep_ms})
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        cfg = resolve_run(PRESETS["smoke"].with_overrides({
            "synthetic_size": images, "epochs": epochs, "storage_path": storage, "name": f"keep-{keep_ms}"}))
        train, val, _, info = load_training_data(cfg.data, seed=0)
        result = make_trainer(cfg, train, val, info).fit()
        return [row["epoch_time_s"] for row in read_metadata(result.checkpoint.path)["history"]]
    finally:
        ray.shutdown()


def main() -> None:
    from cifar_ray.quiet import quiet_start_up

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--images", type=int, default=400, help="synthetic images (10%% held out)")
    args = parser.parse_args()
    quiet_start_up()
    later_epochs = {side: [] for side in SIDES}
    for round_ in range(1, args.rounds + 1):
        for side, keep_ms in SIDES.items():
            with tempfile.TemporaryDirectory(prefix="idle-workers-") as storage:
                seconds = epoch_seconds(keep_ms, args.epochs, args.images, storage)
            later_epochs[side] += seconds[1:]
            print(f"round {round_}, {side}: epochs {', '.join(f'{s:.2f}' for s in seconds)} s", flush=True)
    medians = {side: statistics.median(s) for side, s in later_epochs.items()}
    print("\n| side | median epoch after the first, s | epochs |\n| --- | --- | --- |")
    for side, median in medians.items():
        print(f"| {side} | {median:.2f} | {len(later_epochs[side])} |")
    default, kept = medians.values()
    print(f"\ndefault / cifar-ray: {default / kept:.2f}x")


if __name__ == "__main__":
    main()
