"""One patch to Ray Data 2.60: its streaming executor's loop turns at most 50 times a second.

`StreamingExecutor.run` turns `_scheduling_loop_step` in a loop, and a step blocks only in
`ray.wait` on running tasks, which returns at once whenever a task has an output ready. A
training worker consumes an epoch slowly: its outputs wait, held back by Ray Data's
backpressure, the wait returns at once, and the loop turns without a pause for the whole
epoch. The SplitCoordinator that feeds Ray Train's workers took 0.45-0.74 of a core of a
2-core machine, taken from training (benchmarks/split_coordinator.py). Here a step that
took less than MIN_STEP_S is followed by a rest for the remainder: a step that waited for a
task adds nothing, and new work is dispatched within MIN_STEP_S.

init_ray installs it in the driver and, through Ray's `worker_process_setup_hook`, in every
worker process of the job, where the coordinators run. Nothing changes where the private
method is missing (another Ray version).
"""

from __future__ import annotations

import time

MIN_STEP_S = 0.02


def install() -> None:
    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:
        return
    step = getattr(StreamingExecutor, "_scheduling_loop_step", None)
    if step is None or getattr(step, "rests", False):
        return

    def step_at_most_every_min_step(self, topology):
        start = time.perf_counter()
        keep_going = step(self, topology)
        rest = MIN_STEP_S - (time.perf_counter() - start)
        if keep_going and rest > 0:
            time.sleep(rest)
        return keep_going

    step_at_most_every_min_step.rests = True
    StreamingExecutor._scheduling_loop_step = step_at_most_every_min_step
