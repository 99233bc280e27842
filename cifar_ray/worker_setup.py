"""What every Ray worker process of a cifar-ray job runs first: init_ray passes one of these
as Ray's `worker_process_setup_hook`."""

from __future__ import annotations

from cifar_ray import idle_executor
from cifar_ray.quiet import quiet_start_up


def quiet() -> None:
    """The default: start quietly (quiet.py), and Ray Data's executor loop paced (idle_executor.py)."""
    quiet_start_up()
    idle_executor.install()


def verbose() -> None:
    """With --verbose: every start-up line, and Ray Data's executor loop paced."""
    idle_executor.install()
