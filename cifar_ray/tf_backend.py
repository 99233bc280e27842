"""Ray Train's TensorFlow backend, in a module that does not import TensorFlow.

Ray's `TensorflowConfig` lives in `ray.train.tensorflow`, whose `__init__` imports
TensorFlow. Ray Train's controller unpickles the run's backend config, so every training
run, and every Tune trial, imported TensorFlow (6 s on 2 cores) in a process that never
runs it, before any worker started. This config does what Ray's does: on start, each
worker gets the TF_CONFIG that MultiWorkerMirroredStrategy reads, written by Ray's own
function on the worker, where TensorFlow is wanted anyway.

Ray's `TensorflowTrainer` itself imports that package as it is made (for its default
config), so the driver and each Tune trial's process, which hand the loop over and never
run it, imported TensorFlow too: `TensorflowTrainer` here is Ray's, made without it.

Four imports below are from Ray's non-public paths, for want of a public API in Ray 2.60: the
enum that names a backend's framework (Ray Train's state export and dashboard read it), Ray's
TensorflowTrainer from its defining module (its public home, `ray.train.tensorflow`, is the
package that imports TensorFlow), and the two functions Ray's own TensorflowBackend calls,
which build each worker's address and TF_CONFIG.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework  # no public home in Ray 2.60
from ray.train.v2.tensorflow.tensorflow_trainer import TensorflowTrainer as RayTensorflowTrainer


@dataclass
class TensorflowConfig(BackendConfig):
    @property
    def backend_cls(self):
        return TensorflowBackend

    @property
    def framework(self):
        return TrainingFramework.TENSORFLOW


class TensorflowTrainer(RayTensorflowTrainer):
    """Ray's TensorflowTrainer, with this module's config. Ray's own `__init__` only runs
    `from ray.train.tensorflow import TensorflowConfig` (3-6 s of TensorFlow import) and then
    its parent's, DataParallelTrainer's: this calls that one directly."""

    def __init__(self, train_loop_per_worker, *, tensorflow_config: TensorflowConfig | None = None, **kwargs):
        super(RayTensorflowTrainer, self).__init__(train_loop_per_worker,
                                                   backend_config=tensorflow_config or TensorflowConfig(), **kwargs)


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
