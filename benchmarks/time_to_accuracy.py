"""Validation accuracy against wall time: train on the real data, or report an existing run.

    python benchmarks/time_to_accuracy.py --data ../shared/data/cifar10/train --model fast_resnet
    python benchmarks/time_to_accuracy.py --run-dir runs/fast-30min       # report a finished run

Training goes through `python -m cifar_ray.train` (all its flags pass through), so the
numbers are the product's, Ray overheads included. Prints a table of epoch, cumulative
training time, validation accuracy and loss, writes time_to_accuracy.png into the run
folder, and scores the best checkpoint on the validation split with and without flip
test-time augmentation. Wall time counts epochs only (each includes its validation pass);
start-up is summary.json's wall_time_s minus that.

Machines differ up to 3x, so the time budget scales with this machine's speed (issue 17):
30 minutes where plain keras.fit of notebook_cnn at batch 128 (train_throughput.py's plain
side) runs 940 images/s. That rate is measured first, with nothing else running, in the
precision policy training uses and in float32, and printed with the budget it gives.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path


REFERENCE_RATE, REFERENCE_MINUTES = 940.0, 30.0


def machine_rates() -> dict[str, float]:
    """{policy: images/s} of plain keras.fit of notebook_cnn at batch 128 on synthetic images,
    in the policy training uses here and in float32: steady state, median over epochs."""
    from cifar_ray.config import PRESETS
    from cifar_ray.train_loop import precision_policy
    from train_throughput import plain_keras, steady_rate, synthetic_split

    train, val = synthetic_split(8192, val_fraction=0.1)
    rates = {}
    for mixed in (True, False):
        cfg = PRESETS["default"].with_overrides({"model": "notebook_cnn", "batch_size": 128, "epochs": 4,
                                                 "mixed_precision": mixed})
        rates[precision_policy(mixed, use_gpu=False)] = steady_rate(plain_keras(cfg, train, val), len(train["label"]))
    return rates


def print_budget(rates: dict[str, float]) -> float:
    """Print each rate and the budget it gives; return the budget (minutes) of training's policy."""
    for policy, rate in rates.items():
        print(f"machine: notebook_cnn plain keras.fit, batch 128, {policy}: {rate:.0f} img/s -> budget "
              f"{REFERENCE_MINUTES * REFERENCE_RATE / rate:.1f} min ({REFERENCE_MINUTES:.0f} min at {REFERENCE_RATE:.0f} img/s)")
    return REFERENCE_MINUTES * REFERENCE_RATE / next(iter(rates.values()))


def report(run_dir: Path, target: float, budget_min: float | None = None) -> None:
    history = list(csv.DictReader((run_dir / "history.csv").open()))
    summary = json.loads((run_dir / "summary.json").read_text())
    elapsed, rows = 0.0, []
    for h in history:
        elapsed += float(h["epoch_time_s"])
        rows.append((int(h["epoch"]), elapsed, float(h["val_accuracy"]), float(h["val_loss"])))
    print(f"run {run_dir} ({summary['config']['model']['model']}, "
          f"{summary['config']['scaling']['num_workers']} worker(s))")
    print(f"{'epoch':>5} {'minutes':>8} {'val_acc':>8} {'val_loss':>8}")
    for epoch, seconds, acc, loss in rows:
        print(f"{epoch:>5} {seconds / 60:>8.1f} {acc:>8.4f} {loss:>8.4f}")
    hit = next((r for r in rows if r[2] >= target), None)
    print(f"training time {elapsed / 60:.1f} min, wall time {summary['wall_time_s'] / 60:.1f} min "
          f"(start-up, data loading and the audit: {(summary['wall_time_s'] - elapsed) / 60:.1f} min)")
    print(f"best val_accuracy {summary['best_val_accuracy']:.4f} at epoch {summary['best_epoch']}; "
          + (f"reached {target:.0%} at epoch {hit[0]}, {hit[1] / 60:.1f} min" if hit else f"never reached {target:.0%}"))
    if budget_min is not None:
        within = [r for r in rows if r[1] / 60 <= budget_min]
        print(f"within the budget ({budget_min:.1f} min of training): "
              + (f"best val_accuracy {max(r[2] for r in within):.4f}" if within else "no epoch finished"))
    plot(rows, run_dir / "time_to_accuracy.png", target, title=str(run_dir.name))
    plain, flipped = validation_accuracy(summary)
    print(f"best checkpoint on the validation split: {plain:.4f}, with flip TTA {flipped:.4f}")


def validation_accuracy(summary: dict) -> tuple[float, float]:
    """The best checkpoint's accuracy on the run's validation split (the same seeded split
    it held out), without and with flip test-time augmentation."""
    from cifar_ray.cli import init_ray
    from cifar_ray.config import Config
    from cifar_ray.data import load_training_data
    from cifar_ray.evaluate import evaluate_dataset

    init_ray()
    cfg = Config.from_dict(summary["config"])
    _, val, _, info = load_training_data(cfg.data, seed=cfg.train.seed)
    return tuple(evaluate_dataset(val, summary["best_checkpoint"], info.validation_split(), tta=tta)["accuracy"]
                 for tta in (False, True))


def plot(rows, path: Path, target: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r[1] / 60 for r in rows], [r[2] for r in rows], "o-", label="validation accuracy")
    ax.axhline(target, color="tab:red", linestyle="--", label=f"target {target:.0%}")
    ax.set(xlabel="training time (minutes)", ylabel="validation accuracy", title=f"Time to accuracy: {title}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="report this finished run instead of training")
    parser.add_argument("--target", type=float, default=0.93, help="accuracy to time (default: %(default)s)")
    parser.add_argument("--no-rate", action="store_true", help="skip measuring this machine's rate and budget")
    args, train_args = parser.parse_known_args()
    budget = None if args.no_rate else print_budget(machine_rates())
    run_dir = args.run_dir
    if run_dir is None:
        result = subprocess.run([sys.executable, "-m", "cifar_ray.train", *train_args],
                                capture_output=True, text=True)
        sys.stderr.write(result.stderr[-3000:] if result.returncode else "")
        if result.returncode:
            sys.exit(result.returncode)
        run_dir = Path(result.stdout.strip().splitlines()[-1].split("run folder: ", 1)[1])
    report(run_dir, args.target, budget)


if __name__ == "__main__":
    main()
