"""Where a short training run's CPU goes, by process, with and without Ray Train's
preemption watcher.

    ray start --head --num-cpus 2
    RAY_ADDRESS=auto python benchmarks/run_cpu.py [--rounds 2]

Runs `python -m cifar_ray.train --preset smoke` (600 synthetic images, 1 worker, 3 epochs)
on the running cluster, alternately with RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=1 (Ray's
default) and =0 (the tests' Ray, tests/conftest.py). While each run lasts, it reads the CPU
time of every process on the machine from /proc every 0.1 s; a process's share is what it
used while the run lasted (the driver, Ray's actor processes, the cluster's own daemons).
Prints each run's wall time and CPU seconds, the medians and their ratio, and the CPU by
process name of the last run with the watcher on. Linux only.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import time

TICK = os.sysconf("SC_CLK_TCK")
SIDES = {"watcher on (Ray's default)": "1", "watcher off (the tests' Ray)": "0"}


def processes() -> dict[tuple[str, int], tuple[str, float]]:
    """{(pid, start time): (command line, CPU seconds so far)} of every process now."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                name = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        found[(pid, int(fields[19]))] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return found


def run_and_account(command: list[str], env: dict) -> tuple[float, dict[str, float]]:
    """(wall seconds, {process name: CPU seconds used while the command ran})."""
    before = processes()
    last = dict(before)
    start = time.monotonic()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while child.poll() is None:
        for key, (name, cpu) in processes().items():  # a process that exits keeps its last reading
            last[key] = (name or last.get(key, ("?", 0))[0], cpu)
        time.sleep(0.1)
    wall = time.monotonic() - start
    if child.returncode != 0:
        sys.exit(f"the training run failed (exit {child.returncode}): {' '.join(command)}")
    used = collections.Counter()
    for key, (name, cpu) in last.items():
        spent = cpu - before.get(key, (name, 0.0))[1]
        if spent > 0.05:
            used[short_name(name, command)] += spent
    return wall, used


def short_name(command_line: str, driver: list[str]) -> str:
    if command_line.startswith(" ".join(driver[:3])):
        return "the driver (cifar_ray.train)"
    first = command_line.split(" ")[0]
    return first if first.startswith("ray::") else os.path.basename(first) or "(exited before it was named)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs per side, interleaved")
    args = parser.parse_args()
    if "RAY_ADDRESS" not in os.environ:
        sys.exit("start a cluster first (ray start --head --num-cpus 2) and set RAY_ADDRESS=auto")
    walls, cpus = collections.defaultdict(list), collections.defaultdict(list)
    breakdown = {}
    with tempfile.TemporaryDirectory() as storage:
        for round_ in range(args.rounds):
            for side, flag in SIDES.items():
                command = [sys.executable, "-m", "cifar_ray.train", "--preset", "smoke", "--synthetic-size", "600",
                           "--batch-size", "64", "--num-workers", "1", "--epochs", "3",
                           "--storage-path", f"{storage}/{round_}-{flag}", "--name", "run"]
                env = {**os.environ, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": flag}
                wall, used = run_and_account(command, env)
                walls[side].append(wall)
                cpus[side].append(sum(used.values()))
                breakdown[side] = used
                print(f"round {round_ + 1}, {side}: {wall:.1f} s wall, {sum(used.values()):.1f} s CPU", flush=True)
    print()
    for side in SIDES:
        print(f"{side}: median {statistics.median(walls[side]):.1f} s wall, {statistics.median(cpus[side]):.1f} s CPU")
    on, off = SIDES
    print(f"off/on: wall {statistics.median(walls[off]) / statistics.median(walls[on]):.3f}x, "
          f"CPU {statistics.median(cpus[off]) / statistics.median(cpus[on]):.3f}x")
    print(f"\nCPU by process, the last run with the {on}:")
    for name, seconds in breakdown[on].most_common(20):
        print(f"  {seconds:6.1f} s  {name}")


if __name__ == "__main__":
    main()
