"""What every `python -m cifar_ray.<stage>` shares: Ray start-up and one-line errors."""

from __future__ import annotations

import os
import sys
from typing import Callable

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError)


class TrainingFailed(RuntimeError):
    """Training stopped after --max-failures restarts; its checkpoints are kept.

    Defined here, not in train.py: under `python -m cifar_ray.train` that module is
    __main__, and its classes would not match the ones this module checks for.
    """


def init_ray() -> None:
    """Join the cluster this runs on (a job, RAY_ADDRESS, `ray start`), or start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(logging_level="WARNING")


def first_line(error: BaseException, limit: int = 300) -> str:
    """An error's message as one short line (its type when it has no message)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def find_user_error(error: BaseException) -> BaseException | None:
    """The user-facing cause inside an error that Ray may have wrapped several times."""
    from cifar_ray.checkpoint import CheckpointError
    from cifar_ray.data import DataSourceError

    seen = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        ours = (DataSourceError, CheckpointError, TrainingFailed)
        if isinstance(e, ours) and not isinstance(getattr(e, "cause", None), ours):
            return e  # the innermost one: Ray's wrappers subclass the cause's type too
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
        stack += list(getattr(e, "worker_failures", {}).values())  # Ray Train's worker errors
    return error if isinstance(error, USER_ERRORS) else None


def run_cli(main: Callable[[], object]) -> None:
    """Run `main`; turn a user error into one line on stderr and exit status 2."""
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        user_error = find_user_error(e)
        if user_error is None or os.environ.get("CIFAR_RAY_DEBUG"):
            raise
        message = str(user_error).strip().splitlines()[0] if str(user_error).strip() else repr(user_error)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
