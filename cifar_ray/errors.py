"""The errors a user can act on, and how they are told: one line, never a traceback.

Every stage's command runs under cli.run_cli, which finds one of these inside whatever Ray
wrapped it in (`find_user_error`) and prints its first line with exit status 2. They live
here, below every other module, so that raising one imports nothing.
"""

from __future__ import annotations

import re


class DataSourceError(ValueError):
    """A problem with the user's data, reported as one line, never a traceback."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or from an incompatible version."""


class RegistryError(ValueError):
    """A registry request that cannot be done: unknown version, missing files, no champion."""


class TrackingUnavailable(ValueError):
    """The MLflow tracking store or registry cannot be reached."""


class ClusterUnreachable(ConnectionError):
    """The Ray cluster this stage was told to join cannot be reached."""


class HostNotReady(OSError):
    """This machine cannot serve as asked: its port held by another process, or an open-file
    limit HAProxy cannot start under (ingress.py)."""


class TrainingFailed(RuntimeError):
    """Training stopped after --max-failures restarts; its checkpoints are kept.

    Defined here, not in train.py: under `python -m cifar_ray.train` that module is
    __main__, and its classes would not match the ones run_cli checks for.
    """


# What a user can act on: printed as one line, exit status 2 (cli.run_cli).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, ClusterUnreachable,
                                                HostNotReady)


def first_line(error: BaseException, limit: int = 300) -> str:
    """An error's message as one short line (its type when it has no message)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def find_user_error(error: BaseException) -> BaseException | None:
    """The user-facing cause inside an error that Ray may have wrapped several times."""
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


# A file path or a URI in an error message: "/a/b/model.keras", "sqlite:////a/mlflow.db",
# "s3://b/runs/x" (not "models:/name@alias", which names a registry version).
PATH_OR_URI = re.compile(r"(?:\b[a-z][a-z0-9+.-]*://|(?<![\w.:])/)[^\s'\",:;()]*")


def without_paths(message: str) -> str:
    """An error as an HTTP body gives it: each path or URI cut to its last part. Clients
    learn what failed, not where the cluster keeps its files; the replica's log has it all."""
    return PATH_OR_URI.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], message)
