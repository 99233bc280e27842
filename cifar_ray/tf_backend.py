"""Ray Train's TensorFlow backend, in a module that does not import TensorFlow.

Ray's `TensorflowConfig` lives in `ray.train.tensorflow`, whose `__init__` imports
TensorFlow. Ray Train's controller unpickles the run's backend config, so every training
run, and every Tune trial, imported TensorFlow (6 s on 2 cores) in a process that never
runs it, before any worker started. This config does what Ray's does: on start, each
worker gets the TF_CONFIG that MultiWorkerMirroredStrategy reads, written by Ray's own
function on the worker, where TensorFlow is wanted anyway.

Three imports below are Ray internals, for want of a public API in Ray 2.60: the enum that
names a backend's framework (Ray Train's state export and dashboard read it), and the two
functions Ray's own TensorflowBackend calls, which build each worker's address and TF_CONFIG.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework  # no public home in Ray 2.60


@dataclass
class TensorflowConfig(BackendConfig):
    @property
    def backend_cls(self):
        return TensorflowBackend

    @property
    def framework(self):
        return TrainingFramework.TENSORFLOW


class TensorflowBackend(Backend):
    def on_start(self, worker_group, backend_config: TensorflowConfig) -> None:
        urls = worker_group.execute(worker_url)
        ray.get([worker_group.execute_single_async(rank, set_tf_config, urls, rank)
                 for rank in range(len(worker_group))])


def worker_url() -> str:
    """This worker's address and a free port, for the other workers to reach it."""
    from ray._common.network_utils import build_address
    from ray.train._internal.utils import get_address_and_port

    return build_address(*get_address_and_port())


def set_tf_config(worker_urls: list[str], rank: int) -> None:
    from ray.train.tensorflow.config import _setup_tensorflow_environment

    _setup_tensorflow_environment(worker_urls, rank)
