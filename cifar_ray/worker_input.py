"""What each Ray Train worker feeds `fit`: its shards of the training and validation
splits as tf.data datasets of (uint8 images, one-hot labels) in per-worker batches.

Training streams from Ray Data every epoch where the epoch brings new augmentations, and is
read once into memory where it does not; validation is always read once. Each is handed to
the worker's strategy as it is (`distribute_datasets_from_function`): the shards are the
workers' own already.
"""

from __future__ import annotations

import numpy as np

from cifar_ray.config import CLASS_NAMES, IMAGE_SHAPE


def training_input(strategy, shard, per_worker_batch: int, steps: int, augmented: bool):
    """The worker's training shard for `fit`: per-worker batches, exactly `steps` of them.
    Streamed from Ray Data every epoch where each epoch brings new augmentations; else read
    once and reshuffled in memory (in_memory_dataset).

    Keras steps once into the end of an input of unknown length, and that call still moves
    `optimizer.iterations`, which drives the LR schedule: one step ahead per epoch. A known
    length stops it there. Batches are per-worker and handed to the strategy as they are
    (`distribute_datasets_from_function`): TF's rebatching of global batches would hide the
    count behind a length Keras cannot read.
    """
    import tensorflow as tf

    if augmented:
        dataset = streamed_dataset(shard, per_worker_batch)
    else:
        dataset = in_memory_dataset(shard, per_worker_batch, training=True)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(steps))
    return strategy.distribute_datasets_from_function(lambda _: dataset)


def validation_input(strategy, shard, per_worker_batch: int):
    """The worker's validation shard, read once (in_memory_dataset), in per-worker batches
    handed to the strategy as they are: each worker scores its own shard, and Ray's equal
    split makes the mean of the workers' metrics the metric of the whole split."""
    dataset = in_memory_dataset(shard, per_worker_batch, training=False)
    return strategy.distribute_datasets_from_function(lambda _: dataset)


def streamed_dataset(shard, batch_size: int):
    """A worker's training shard, streamed from Ray Data every epoch (a new order and new
    augmentations each time), in full batches shuffled within a 4-batch buffer.

    `to_tf` turns TF's auto-sharding off, so every worker reads its whole shard. The column
    types are data.py's fixed schema: left to infer them, `to_tf` first runs the whole
    pipeline, augmentation included, for one row.
    """
    import tensorflow as tf

    return for_keras(shard.to_tf(
        feature_columns="image",
        label_columns="label",
        feature_type_spec=tf.TensorSpec((None, *IMAGE_SHAPE), tf.uint8),
        label_type_spec=tf.TensorSpec((None,), tf.int64),
        batch_size=batch_size,
        drop_last=True,
        local_shuffle_buffer_size=4 * batch_size,
    ))


def in_memory_dataset(shard, batch_size: int, training: bool):
    """A worker's shard read once, here, and kept in memory. Validation always: its images
    are the same every epoch (CIFAR's 5,000 take 15 MB), and a Ray Data pass over them cost
    about 0.4 s of a 5 s epoch. Training without augmentation too: streaming the same images
    again made the first batch 0.4 s late and steps 15-20% slower (notebook_cnn; both in
    benchmarks/README.md). Training draws a new order every epoch, in full batches.

    A training shard is then fixed from the first epoch (the driver's permutation,
    data.shuffle_every_epoch, makes it a random share of the split), as with tf.data's own
    sharding. CIFAR's 42,804 training images take 131 MB. Auto-sharding is off: the shard is
    this worker's already.
    """
    import tensorflow as tf

    images, labels = read_whole(shard)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if training:
        dataset = dataset.shuffle(len(labels), reshuffle_each_iteration=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return for_keras(dataset.batch(batch_size, drop_remainder=training).with_options(options))


def for_keras(dataset):
    """(uint8 images, one-hot labels), tf.data autotuning off.

    Labels are one-hot because Keras smooths labels only in CategoricalCrossentropy.
    Autotuning is off as in the per-device pipelines (compat.py, point 3): nothing here is
    tunable, and its model thread stalled epoch boundaries by 10-80 s.
    """
    import tensorflow as tf

    from cifar_ray.compat import without_autotuning

    return without_autotuning(dataset.map(lambda x, y: (x, tf.one_hot(y, len(CLASS_NAMES)))))


def read_whole(shard) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one pass over a Ray Data shard, as numpy arrays."""
    images, labels = [np.zeros((0, *IMAGE_SHAPE), np.uint8)], [np.zeros(0, np.int64)]
    for batch in shard.iter_batches(batch_size=4096, batch_format="numpy"):
        images.append(batch["image"])
        labels.append(batch["label"])
    return np.concatenate(images), np.concatenate(labels)
