"""The CPU that Ray Data's SplitCoordinator (streaming_split, what Ray Train's workers read
through) burns while a worker trains: for three ways of giving the training split a new
order every epoch, each with Ray Data's executor as it is ("spins") and with
cifar_ray.idle_executor installed in Ray's worker processes ("rests").

    python benchmarks/split_coordinator.py [--images 20480] [--batches 12] [--seconds-per-batch 2.5] [--rounds 2]

A consumer in this process reads 1,024-image batches (crop_flip applied in Ray Data tasks,
a 4,096-row local shuffle buffer, as train_loop does) and sleeps between batches as a
training step would. The coordinator's CPU seconds are read from /proc before and after.
Variants, interleaved round by round (each executor setting in a Ray of its own):

    one block   the split as split.py leaves it: one block, the same order every epoch
    permuted    one block, its rows permuted by a task each epoch (data.shuffle_every_epoch)
    64 blocks   the split cut into 64 blocks whose order is randomized each epoch

Ray Data's executor loop waits on its running tasks; with none running and outputs not yet
consumed, it loops without waiting, and the coordinator's CPU is taken from training;
idle_executor adds a 20 ms rest to such a turn.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def coordinator_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) of each SplitCoordinator process, by PID, from /proc."""
    seconds = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"SplitCoordinator" not in fh.read():
                    continue
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            seconds[int(pid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20480)
    parser.add_argument("--batches", type=int, default=12, help="batches consumed per measurement")
    parser.add_argument("--seconds-per-batch", type=float, default=2.5, help="the simulated training step")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import ray
    from ray.data import RandomSeedConfig

    from cifar_ray.augment import add_augmentation
    from cifar_ray.data import make_synthetic_batch, shuffle_every_epoch

    names = ("one block", "permuted", "64 blocks")
    shares: dict[str, list[float]] = {f"{name}, {mode}": [] for mode in ("spins", "rests") for name in names}
    for round_ in range(args.rounds):
        for mode in ("spins", "rests"):
            hook = {"worker_process_setup_hook": "cifar_ray.worker_setup.verbose"} if mode == "rests" else None
            ray.init(logging_level="ERROR", log_to_driver=False, runtime_env=hook)
            ray.data.DataContext.get_current().enable_progress_bars = False
            split = ray.data.range(args.images, override_num_blocks=1).map_batches(
                make_synthetic_batch, fn_kwargs={"seed": 0}, batch_format="numpy").materialize()
            variants = {
                "one block": lambda: split,
                "permuted": lambda: shuffle_every_epoch(split),
                "64 blocks": lambda: split.repartition(64).materialize().randomize_block_order(
                    seed=RandomSeedConfig(seed=0, reseed_after_execution=True)),
            }
            for name, make in variants.items():
                older = set(coordinator_cpu_s())  # earlier variants' coordinators: not measured
                shard = add_augmentation(make(), "crop_flip", 2).streaming_split(1)[0]
                start, first = time.perf_counter(), None
                for i, _ in enumerate(shard.iter_batches(batch_size=1024, local_shuffle_buffer_size=4096)):
                    if first is None:  # its coordinator exists once a batch has come
                        first = {pid: s for pid, s in coordinator_cpu_s().items() if pid not in older}
                        start = time.perf_counter()
                    time.sleep(args.seconds_per_batch)
                    if i + 1 >= args.batches:
                        break
                wall = time.perf_counter() - start
                now = coordinator_cpu_s()
                key = f"{name}, {mode}"
                shares[key].append(sum(now.get(pid, s) - s for pid, s in first.items()) / wall)
                print(f"round {round_ + 1}  {key:<20} coordinator {shares[key][-1]:.2f} of a core over {wall:.1f} s",
                      flush=True)
            ray.shutdown()
    base = statistics.median(shares["one block, spins"])
    print("\nmedian share of a core taken by the coordinator while training reads")
    for name, values in shares.items():
        print(f"  {name:<20} {statistics.median(values):.2f}  ({statistics.median(values) / base:.2f}x one block, spins)")


if __name__ == "__main__":
    main()
