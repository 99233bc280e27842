"""Ray Train's fixed cost per run: a baseline trainer vs the trainer cifar-ray builds.

    python benchmarks/train_overhead.py [--baseline ray|split-validation] [--rounds 3]
                                        [--workers 1] [--epochs 1]

The same tiny run (the smoke preset's model on 300 synthetic images) is fitted through
`train.make_trainer` (tf_backend's trainer and config, a loop that returns nothing, the
validation split read whole by a single worker) and through a baseline:
- ray: Ray's TensorflowTrainer as Ray's docs write it, with a loop that returns the Keras
  model and Ray's default DataConfig. Its backend config makes Ray Train's controller import
  TensorFlow, Ray Train ships the returned model to the controller (a pickle, and the import
  again if it had not happened), and every dataset is split across the workers.
- split-validation: cifar-ray's trainer with Ray's default DataConfig only. With one worker
  the validation shard is the whole split, but it comes through a SplitCoordinator actor, a
  process of its own that starts when the worker first reads it. (With 2+ workers both
  sides split it.)
Each fit is timed from `fit()` to its return, sides interleaved (baseline, cifar-ray, ...),
in one local 2-CPU Ray that keeps idle workers as `cifar-ray train` does; the medians and
their ratio are printed. Everything else a run does (data, MLflow, the audit) is the same on
both sides and left out.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def loop_returning_the_model(loop_config: dict):
    from cifar_ray.train_loop import fit_on_this_worker

    return fit_on_this_worker(loop_config)


def baseline_trainer(trainer, baseline: str):
    """`trainer` (make_trainer's) rebuilt as the baseline: the same configs and datasets."""
    import ray.train

    if baseline == "ray":
        from ray.train.tensorflow import TensorflowTrainer

        loop = loop_returning_the_model
    else:
        from cifar_ray.tf_backend import TensorflowTrainer

        loop = trainer.train_loop_per_worker
    return TensorflowTrainer(loop, train_loop_config=trainer.train_loop_config, scaling_config=trainer.scaling_config,
                             run_config=trainer.run_config, datasets=trainer.datasets,
                             dataset_config=ray.train.DataConfig())


def fit_seconds(cfg, train, val, info, baseline: str | None) -> float:
    from cifar_ray.train import make_trainer

    trainer = make_trainer(cfg, train, val, info)
    if baseline:
        trainer = baseline_trainer(trainer, baseline)
    started = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - started


def main() -> None:
    import os

    import ray

    from cifar_ray.cli import LOCAL_RAY_ENV
    from cifar_ray.config import PRESETS
    from cifar_ray.data import load_training_data
    from cifar_ray.quiet import quiet_start_up
    from cifar_ray.run_folder import with_global_batch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", choices=["ray", "split-validation"], default="ray")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    quiet_start_up()
    os.environ.update(LOCAL_RAY_ENV)
    ray.init(num_cpus=2, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    storage = tempfile.mkdtemp(prefix="train-overhead-")
    base = with_global_batch(PRESETS["smoke"].with_overrides({
        "synthetic_size": 300, "epochs": args.epochs, "num_workers": args.workers, "storage_path": storage}))
    train, val, _, info = load_training_data(base.data, seed=base.train.seed)
    times = {args.baseline: [], "cifar-ray": []}
    for i in range(args.rounds):
        for side in times:
            cfg = base.with_overrides({"name": f"{side}-{i}"})
            times[side].append(fit_seconds(cfg, train, val, info, None if side == "cifar-ray" else side))
            print(f"round {i + 1}  {side:16s}  {times[side][-1]:5.1f} s", flush=True)
    before, after = statistics.median(times[args.baseline]), statistics.median(times["cifar-ray"])
    print(f"median fit: {args.baseline} {before:.1f} s, cifar-ray {after:.1f} s "
          f"({before - after:.1f} s less, {before / after:.2f}x)")


if __name__ == "__main__":
    main()
