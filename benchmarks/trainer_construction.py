"""What making the trainer costs a process that never trains: Ray's TensorflowTrainer vs
cifar-ray's (tf_backend.TensorflowTrainer).

    python benchmarks/trainer_construction.py [--rounds 5]

The driver of `cifar-ray train` and each Tune trial's process make a trainer and hand the
loop to Ray Train; neither runs TensorFlow. Each round starts a fresh Python per side (sides
interleaved: ray, cifar-ray, ray, ...), which imports the trainer's module and then times
making one trainer, the way train.make_trainer makes it, and says whether TensorFlow was
imported on the way. The medians and their difference are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = """
import json, sys, time
from cifar_ray.quiet import quiet_start_up
quiet_start_up()
from cifar_ray.tf_backend import TensorflowConfig
if {ray!r}:
    from ray.train.v2.tensorflow.tensorflow_trainer import TensorflowTrainer
else:
    from cifar_ray.tf_backend import TensorflowTrainer
started = time.perf_counter()
TensorflowTrainer(print, tensorflow_config=TensorflowConfig())
print(json.dumps({{"seconds": time.perf_counter() - started, "tensorflow": "tensorflow" in sys.modules}}))
"""


def make_trainer_seconds(ray: bool) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE.format(ray=ray)], capture_output=True, text=True,
                            timeout=300, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    seconds = {True: [], False: []}
    for i in range(args.rounds):
        for ray in (True, False):
            run = make_trainer_seconds(ray)
            seconds[ray].append(run["seconds"])
            print(f"round {i + 1}  {'ray' if ray else 'cifar-ray':9s}  {run['seconds']:5.2f} s  "
                  f"TensorFlow imported: {run['tensorflow']}", flush=True)
    ray_s, ours_s = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(f"median to make the trainer: ray's TensorflowTrainer {ray_s:.2f} s, cifar-ray's {ours_s:.2f} s "
          f"({ray_s - ours_s:.2f} s less per driver and per Tune trial)")


if __name__ == "__main__":
    main()
