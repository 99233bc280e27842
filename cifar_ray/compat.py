"""The one place cifar-ray patches its stack: Keras `fit` under MultiWorkerMirroredStrategy.

Keras 3.15's TensorFlow trainer breaks with 2+ workers (keras-team/keras#20585):

1. `fit`/`evaluate` first "symbolically build" the model from one data batch, which they
   all-reduce across workers in eager mode: "Attempt to convert a value (PerReplica...)".
   Building only needs shapes, so we build from zeros shaped like the dataset's
   element_spec. This also pulls no batch, so no Ray Data epoch is started and dropped.
2. Each step's scalar metrics are averaged with `strategy.reduce("MEAN", v, axis=0)`,
   and a scalar has no axis 0: "Invalid reduction dimension 0". We reduce with
   axis=None: the mean over workers of each worker's running metric, which is the global
   value when every worker sees the same number of examples (Ray's equal split).

Gradients are untouched: Keras already sums them across workers in the optimizer.
tests/test_train.py proves the result: identical weights on every worker.

3. Under the strategy, TensorFlow feeds each device through a per-device tf.data pipeline
   built with default options, so tf.data autotuning is on there whatever the input
   dataset says. Autotuning's model thread sleeps in doubling periods (10 ms, 20 ms, ...
   10.24 s, 20.48 s, ...) and often misses its wake-up when Keras drops an epoch's
   iterator, so the next epoch waited until the thread's period ran out: 10-80 s
   (benchmarks/README.md). Those pipelines only move batches; we turn autotuning off.
"""

from __future__ import annotations

import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import trainer as tf_trainer
from tensorflow.python.data.ops import multi_device_iterator_ops

_keras_reduce_per_replica = tf_trainer.reduce_per_replica
_tf_create_device_dataset = multi_device_iterator_ops._create_device_dataset


def _zeros_like_spec(spec) -> tf.Tensor:
    # A distributed input's spec is per replica, and each worker has one replica.
    spec = getattr(spec, "_value_specs", (spec,))[0]
    return tf.zeros([d if d is not None else 1 for d in spec.shape], spec.dtype)


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    if self._distribute_strategy is None:
        return
    if iterator is not None:
        spec = iterator.data_adapter.get_tf_dataset().element_spec
        data_batch = tree.map_structure(_zeros_like_spec, spec)
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def _reduce_per_replica(values, strategy, reduction):
    if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
        return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
    return _keras_reduce_per_replica(values, strategy, reduction)


def without_autotuning(dataset: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def _create_device_dataset(*args, **kwargs):
    return without_autotuning(_tf_create_device_dataset(*args, **kwargs))


def patch_multi_worker_fit() -> None:
    """Make Keras 3 `fit` correct and stall-free under MultiWorkerMirroredStrategy. Idempotent."""
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = _reduce_per_replica
    multi_device_iterator_ops._create_device_dataset = _create_device_dataset
