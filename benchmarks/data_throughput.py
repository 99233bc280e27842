"""Input pipeline throughput: Ray Data read + decode + augment vs what training consumes.

    python benchmarks/data_throughput.py [--data ../shared/data/cifar10/train] [--train-rate 650]

Sides, interleaved (A, B, A, B), each over every image of --data:
- Ray Data: read Parquet, decode JPEG/PNG (images.decode_batch), augment (augment.augment_batch,
  crop_flip and notebook), iterated on the driver as numpy batches: what a worker receives.
- The notebook's path. ImageDataGenerator is gone in Keras 3; its replacement is the
  preprocessing layers (RandomRotation 15 degrees, RandomTranslation 0.1, RandomFlip,
  RandomZoom 0.2) in a tf.data pipeline that decodes with tf.io.decode_image.
- Per epoch: augmentation alone over the decoded images in the object store, which is
  all a training epoch asks of Ray Data (the splits are decoded once per run).
The goal: the input pipeline delivers at least 10x what training consumes (--train-rate,
images/s; default: fast_resnet's 650 img/s with 1 worker on 2 cores, benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ray_data_rate(data: str, augment: str) -> tuple[float, int]:
    from cifar_ray.augment import add_augmentation
    from cifar_ray.data import read_source

    start = time.perf_counter()
    n = 0
    for batch in add_augmentation(read_source(data), augment).iter_batches(batch_size=1024, batch_format="numpy"):
        n += len(batch["label"])
    return n / (time.perf_counter() - start), n


def augment_only_rate(decoded, augment: str) -> tuple[float, int]:
    """What each training epoch costs: the splits are decoded once and kept in the object
    store (data.load_training_data), so an epoch only augments."""
    from cifar_ray.augment import add_augmentation

    start = time.perf_counter()
    n = 0
    for batch in add_augmentation(decoded, augment).iter_batches(batch_size=1024, batch_format="numpy"):
        n += len(batch["label"])
    return n / (time.perf_counter() - start), n


def keras_layers_rate(data: str) -> tuple[float, int]:
    import keras
    import pyarrow.parquet as pq
    import tensorflow as tf

    table = pq.read_table(data, columns=["image", "label"])
    augment = keras.Sequential([
        keras.layers.RandomRotation(15 / 360, fill_mode="nearest"),
        keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest"),
        keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomZoom(0.2, fill_mode="nearest"),
    ])
    ds = tf.data.Dataset.from_tensor_slices((table.column("image").to_pylist(), table.column("label").to_numpy()))
    ds = ds.map(lambda b, y: (tf.io.decode_image(b, channels=3, expand_animations=False), y),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(1024).map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    start = time.perf_counter()
    n = sum(int(y.shape[0]) for _, y in ds.prefetch(2))
    return n / (time.perf_counter() - start), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10/train"))
    parser.add_argument("--train-rate", type=float, default=650.0, help="images/s that training consumes")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import ray

    ray.init(logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    from cifar_ray.data import read_source

    decoded = read_source(args.data).materialize()
    sides = {"Ray Data, crop_flip": lambda: ray_data_rate(args.data, "crop_flip"),
             "Ray Data, notebook": lambda: ray_data_rate(args.data, "notebook"),
             "per epoch: crop_flip only": lambda: augment_only_rate(decoded, "crop_flip"),
             "per epoch: notebook only": lambda: augment_only_rate(decoded, "notebook"),
             "Keras 3 layers (notebook)": lambda: keras_layers_rate(args.data)}
    rates = {name: [] for name in sides}
    for round_ in range(args.rounds):
        for name, side in sides.items():
            rate, n = side()
            rates[name].append(rate)
            print(f"round {round_ + 1}  {name:<26} {rate:8.0f} img/s over {n} images", flush=True)
    print(f"\ntraining consumes {args.train_rate:.0f} img/s; goal: input >= 10x that")
    print(f"{'pipeline':<26} {'img/s':>8} {'x training':>10}")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:<26} {median:>8.0f} {median / args.train_rate:>9.1f}x")


if __name__ == "__main__":
    main()
