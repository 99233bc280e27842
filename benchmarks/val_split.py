"""One Ray Train worker: the validation split streamed through Ray Data's split, or read whole.

    python benchmarks/val_split.py [--rounds 4] [--workers 1]

The same tiny run (the smoke preset's model on 300 synthetic images, 1 epoch) is fitted
through `train.make_trainer`, whose DataConfig splits only the training data when there is
one worker, and through the same trainer with Ray Train's default DataConfig, which splits
every dataset: a shard of one is the whole split, behind a SplitCoordinator actor (a process
of its own) that starts when the worker first reads it. Each fit is timed from `fit()` to
its return, sides interleaved (split, whole, split, ...), in one local 2-CPU Ray; the medians
and their ratio are printed. With --workers 2 both sides split (the product's choice then).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def fit_seconds(cfg, train, val, info, split_val: bool) -> float:
    import ray.train

    from cifar_ray.tf_backend import TensorflowTrainer
    from cifar_ray.train import make_trainer

    trainer = make_trainer(cfg, train, val, info)
    if split_val:
        trainer = TensorflowTrainer(trainer.train_loop_per_worker, train_loop_config=trainer.train_loop_config,
                                    scaling_config=trainer.scaling_config, run_config=trainer.run_config,
                                    datasets=trainer.datasets, dataset_config=ray.train.DataConfig())
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
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    quiet_start_up()
    os.environ.update(LOCAL_RAY_ENV)  # idle workers kept, as `cifar-ray train` keeps them
    ray.init(num_cpus=2, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    base = with_global_batch(PRESETS["smoke"].with_overrides({
        "synthetic_size": 300, "epochs": 1, "num_workers": args.workers,
        "storage_path": tempfile.mkdtemp(prefix="val-split-")}))
    train, val, _, info = load_training_data(base.data, seed=base.train.seed)
    times = {True: [], False: []}
    for i in range(args.rounds):
        for split_val in (True, False):
            side = "split" if split_val else "whole"
            times[split_val].append(fit_seconds(base.with_overrides({"name": f"{side}-{i}"}), train, val, info,
                                                split_val))
            print(f"round {i + 1}  validation {side}  {times[split_val][-1]:5.1f} s", flush=True)
    split, whole = statistics.median(times[True]), statistics.median(times[False])
    print(f"median fit: validation split {split:.1f} s, read whole {whole:.1f} s "
          f"({split - whole:.1f} s less, {split / whole:.2f}x)")


if __name__ == "__main__":
    main()
