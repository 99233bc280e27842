"""Validation accuracy against wall time: train on the real data, or report an existing run.

    python benchmarks/time_to_accuracy.py --data ../shared/data/cifar10/train --model fast_resnet
    python benchmarks/time_to_accuracy.py --run-dir runs/fast-30min       # report a finished run

Training goes through `python -m cifar_ray.train` (all its flags pass through), so the
numbers are the product's, Ray overheads included. Prints a table of epoch, cumulative
training time, validation accuracy and loss, and writes time_to_accuracy.png into the run
folder. Wall time counts epochs only (each includes its validation pass); start-up is
summary.json's wall_time_s minus that.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path


def report(run_dir: Path, target: float) -> None:
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
    plot(rows, run_dir / "time_to_accuracy.png", target, title=str(run_dir.name))


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
    parser.add_argument("--target", type=float, default=0.88, help="accuracy to time (default: %(default)s)")
    args, train_args = parser.parse_known_args()
    run_dir = args.run_dir
    if run_dir is None:
        result = subprocess.run([sys.executable, "-m", "cifar_ray.train", *train_args],
                                capture_output=True, text=True)
        sys.stderr.write(result.stderr[-3000:] if result.returncode else "")
        if result.returncode:
            sys.exit(result.returncode)
        run_dir = Path(result.stdout.strip().splitlines()[-1].split("run folder: ", 1)[1])
    report(run_dir, args.target)


if __name__ == "__main__":
    main()
