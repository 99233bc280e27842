"""Quiet start-up: a stage's process, and every Ray worker it starts, without TensorFlow's
C++ start-up lines, Ray Data's execution plans and MLflow's schema messages (`--verbose`
keeps them). Ray runs `quiet_start_up` at the start of every worker process
(cli.init_ray's `worker_process_setup_hook`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import warnings

# TensorFlow's C++ log lines after start-up (cpu_feature_guard, coordination service):
# dozens per run, in the driver and every Ray worker. Read when TF is imported.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR", "MLFLOW_LOGGING_LEVEL": "WARNING"}
QUIET_LOGGERS = {
    "ray.data._internal.execution.streaming_executor": "WARNING",  # each dataset's plan
    "ray.data._internal.progress": "ERROR",  # hints about progress bars...
    "ray.data._internal.progress.logging_progress": "INFO",  # ...not progress (predict's, say)
}
QUIET_FLAG = "CIFAR_RAY_QUIET"  # set by parse_args unless --verbose


@contextlib.contextmanager
def native_stderr_silenced():
    """File descriptor 2 to /dev/null: what C++ libraries write there, Python cannot catch."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Imports `tensorflow`, whoever asks for it first, with native stderr silenced.

    Its C++ libraries log as they load (oneDNN, cudart_stub, "All log messages before
    absl::InitializeLog()"), before TF_CPP_MIN_LOG_LEVEL is read. Errors still raise.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_quietly(module):
                with native_stderr_silenced():
                    exec_module(module)

            spec.loader.exec_module = exec_quietly
        return spec


def quiet_start_up() -> None:
    """This process without TensorFlow's start-up lines, Ray Data's execution plans and
    MLflow's schema messages. Ray runs it at the start of every worker process too (init_ray's
    `worker_process_setup_hook`). Ray Data's progress (bars, or lines when stdout is not a
    terminal) stays."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    # Ray Train logs every report, whole metrics dict and all, to a logger named by its file.
    ray_spec = importlib.util.find_spec("ray")
    if ray_spec is not None:
        reports = os.path.join(ray_spec.submodule_search_locations[0], "train", "v2", "_internal",
                               "execution", "context.py")
        logging.getLogger(reports).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # Ray's and TF's own, not a user's
    if "tensorflow" not in sys.modules and not any(isinstance(f, QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, QuietTensorFlowImport())


def is_quiet() -> bool:
    """Whether this stage runs without --verbose (Ray Train then logs only warnings)."""
    return bool(os.environ.get(QUIET_FLAG))
