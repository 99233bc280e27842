"""Scoring a checkpoint: in the driver vs a pool of one model actor (Ray Data).

    python benchmarks/scoring.py --checkpoint runs/NAME/epoch_0004 [--rows 500 5000 10000] [--rounds 2]

What evaluate.IN_DRIVER_ROWS decides between. Each side predicts the same synthetic
images (uint8, 32x32x3) from a Ray dataset, end to end: loading the model (and, for the
pool, starting its actor process) included. Sides run interleaved (driver, pool, driver,
pool, ...) and the medians are printed with their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time


def score_seconds(checkpoint: str, rows: int, in_driver: bool) -> float:
    import ray.data

    from cifar_ray.data import make_synthetic_batch
    from cifar_ray.evaluate import predicted_batches

    ds = ray.data.range(rows).map_batches(make_synthetic_batch, fn_kwargs={"seed": 0}, batch_format="numpy").materialize()
    started = time.perf_counter()
    batches = predicted_batches(ds, checkpoint, 1, tta=False, raw=False, total=rows if in_driver else None)
    scored = sum(len(b["probabilities"]) for b in batches)
    assert scored == rows
    return time.perf_counter() - started


def main() -> None:
    import ray

    from cifar_ray.quiet import quiet_start_up

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[500, 5000, 10000])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    quiet_start_up()
    ray.init(num_cpus=2, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    score_seconds(args.checkpoint, 100, in_driver=True)  # TensorFlow imported, as in a training driver
    print("rows    in driver s   actor pool s   pool / driver")
    for rows in args.rows:
        times = {True: [], False: []}
        for _ in range(args.rounds):
            for in_driver in (True, False):
                times[in_driver].append(score_seconds(args.checkpoint, rows, in_driver))
        driver, pool = statistics.median(times[True]), statistics.median(times[False])
        print(f"{rows:6d}  {driver:11.1f}  {pool:13.1f}  {pool / driver:13.2f}x")


if __name__ == "__main__":
    main()
