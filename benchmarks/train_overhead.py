"""Ray Train's fixed cost per run: Ray's TensorflowTrainer vs the trainer cifar-ray builds.

    python benchmarks/train_overhead.py [--rounds 3] [--workers 1] [--epochs 1]

The same tiny run (the smoke preset's model on 300 synthetic images) is fitted through:
- ray: Ray's TensorflowTrainer, with a loop that returns the Keras model. Its backend config
  makes Ray Train's controller import TensorFlow, and Ray Train ships the returned model to
  the controller (a pickle, and the import again if it had not happened).
- cifar-ray: `train.make_trainer` (tf_backend.TensorflowConfig; the loop returns nothing).
Each fit is timed from `fit()` to its return, sides interleaved (ray, cifar-ray, ray, ...),
in one local 2-CPU Ray; the medians and their ratio are printed. Everything else a run does
(data, MLflow, the audit) is the same on both sides and left out.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def loop_returning_the_model(loop_config: dict):
    from cifar_ray.train_loop import fit_on_this_worker

    return fit_on_this_worker(loop_config)


def fit_seconds(cfg, train, val, info, ray_trainer: bool) -> float:
    from ray.train.tensorflow import TensorflowTrainer

    from cifar_ray.train import make_trainer

    trainer = make_trainer(cfg, train, val, info)
    if ray_trainer:
        trainer = TensorflowTrainer(loop_returning_the_model, train_loop_config=trainer.train_loop_config,
                                    scaling_config=trainer.scaling_config, run_config=trainer.run_config,
                                    datasets=trainer.datasets)
    started = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - started


def main() -> None:
    import ray

    from cifar_ray.quiet import quiet_start_up
    from cifar_ray.config import PRESETS
    from cifar_ray.run_folder import with_global_batch
    from cifar_ray.data import load_training_data

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    quiet_start_up()
    ray.init(num_cpus=2, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    storage = tempfile.mkdtemp(prefix="train-overhead-")
    base = with_global_batch(PRESETS["smoke"].with_overrides({
        "synthetic_size": 300, "epochs": args.epochs, "num_workers": args.workers, "storage_path": storage}))
    train, val, _, info = load_training_data(base.data, seed=base.train.seed)
    times = {True: [], False: []}
    for i in range(args.rounds):
        for ray_trainer in (True, False):
            cfg = base.with_overrides({"name": f"{'ray' if ray_trainer else 'cifar-ray'}-{i}"})
            times[ray_trainer].append(fit_seconds(cfg, train, val, info, ray_trainer))
            print(f"round {i + 1}  {'ray' if ray_trainer else 'cifar-ray':9s}  {times[ray_trainer][-1]:5.1f} s",
                  flush=True)
    before, after = statistics.median(times[True]), statistics.median(times[False])
    print(f"median fit: ray's TensorflowTrainer {before:.1f} s, cifar-ray's {after:.1f} s "
          f"({before - after:.1f} s less, {before / after:.2f}x)")


if __name__ == "__main__":
    main()
