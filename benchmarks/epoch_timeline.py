"""Where a Ray Train epoch's time goes: training steps, the wait for the end of the data, validation.

    python benchmarks/epoch_timeline.py [--model fast_resnet] [--images 8192] [--epochs 5]

Runs the product's train loop (`train_loop.fit_on_this_worker`: strategy, model, input path,
checkpoint per epoch) in one Ray Train worker on synthetic data, and prints per epoch: the
training steps' total, median and slowest step; the gap between the last training step
and the start of validation (Keras waiting for the training iterator to end); and the
validation pass. Made to explain epoch times that snap to fixed values (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import sys
import time


def timeline_loop(loop_config: dict) -> None:
    """The product's train loop (strategy, model, input, reporting) plus a per-step timer."""
    import keras

    from cifar_ray.train_loop import fit_on_this_worker

    class Timeline(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = self.last_step = time.perf_counter()
            self.steps = []

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            self.steps.append(now - self.last_step)
            self.last_step = now

        def on_test_begin(self, logs=None):
            self.val_start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            now = time.perf_counter()
            steps = sorted(self.steps)
            print(f"epoch {epoch + 1}: total {now - self.start:5.1f} s = steps {self.last_step - self.start:5.1f} s "
                  f"({len(steps)}, median {steps[len(steps) // 2] * 1e3:.0f} ms, slowest {steps[-1]:.2f} s) "
                  f"+ end-of-data wait {self.val_start - self.last_step:5.1f} s + validation {now - self.val_start:4.1f} s",
                  file=sys.__stdout__, flush=True)

    fit_on_this_worker(loop_config, callbacks=(Timeline(),))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fast_resnet")
    parser.add_argument("--images", type=int, default=8192, help="synthetic images (10%% held out)")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    import tempfile

    from cifar_ray.cli import init_ray
    from cifar_ray.config import PRESETS, with_recipe
    from cifar_ray.data import load_training_data
    from cifar_ray.run_folder import resolve_run
    from cifar_ray.train import make_trainer

    with tempfile.TemporaryDirectory() as storage:
        cfg = resolve_run(with_recipe(PRESETS["default"], args.model).with_overrides({
            "model": args.model, "data": "synthetic", "synthetic_size": args.images, "augment": "none",
            "epochs": args.epochs, "storage_path": storage, "name": f"timeline-{time.time_ns()}"}))
        init_ray()
        train, val, _, info = load_training_data(cfg.data, seed=0)
        make_trainer(cfg, train, val, info, timeline_loop).fit()


if __name__ == "__main__":
    main()
