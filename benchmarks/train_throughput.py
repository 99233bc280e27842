"""Training throughput: plain keras.fit vs Ray Train with 1 worker and with N workers.

    python benchmarks/train_throughput.py [--model notebook_cnn] [--images 8192] [--rounds 2]
    # the real path: real images, crop_flip in Ray Data vs in a parallel tf.data map
    python benchmarks/train_throughput.py --model fast_resnet --batch-size 1024 \
        --data ../shared/data/cifar10/train --limit 10240 --augment crop_flip --workers 0

Same model, images (the product's split of the synthetic source, or of --data's real one),
global batch and validation split on every side. With --augment crop_flip,
the plain side crops and flips in a tf.data map (num_parallel_calls and prefetch AUTOTUNE,
as a user without Ray would write it), the Ray side in Ray Data tasks. Sides run interleaved (plain, ray-1, ray-N, plain, ...)
and each reports steady-state images/s: the median over epochs after the first (which
traces the graph), each epoch including its validation pass. Ray's start-up (cluster
join, worker group, first data epoch) is reported separately: wall time minus epochs.
MFU divides the model's training FLOP/s by this machine's measured matmul rate in the
compute dtype of the precision policy (bfloat16 on AMX CPUs, float32 elsewhere).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np


def training_flops_per_image(model) -> float:
    """3x the forward FLOPs (forward + two backward matmuls) of the conv and dense layers."""
    import keras

    flops = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            h, w, c_out = layer.output.shape[1:]
            kh, kw = layer.kernel_size
            flops += 2 * h * w * kh * kw * layer.input.shape[-1] * c_out
        elif isinstance(layer, keras.layers.Dense):
            flops += 2 * layer.input.shape[-1] * layer.units
    return 3.0 * flops


def matmul_gflops(dtype: str, size: int = 2048, repeats: int = 5) -> float:
    """This machine's practical peak in `dtype` (the policy's compute dtype: bfloat16 runs
    on AMX here): a large TF matmul, median of a few."""
    import tensorflow as tf

    a = tf.cast(tf.random.normal((size, size)), dtype)
    b = tf.cast(tf.random.normal((size, size)), dtype)
    (a @ b).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        (a @ b).numpy()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times) / 1e9


def tf_crop_flip(pad: int):
    """crop_flip as a tf.data map: reflect-pad by `pad`, random 32x32 crop, random flip."""
    import tensorflow as tf

    def augment(image, label):
        padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        return tf.image.random_flip_left_right(tf.image.random_crop(padded, (32, 32, 3))), label

    return augment


def plain_keras(cfg, train: dict, val: dict) -> dict:
    """keras.fit in this process, the model and compile step exactly as the workers do."""
    import keras
    import tensorflow as tf

    from cifar_ray.compat import without_autotuning
    from cifar_ray.data import DataInfo
    from cifar_ray.train_loop import lookahead, precision_policy, restore_or_build_model

    keras.mixed_precision.set_global_policy(precision_policy(cfg.train.mixed_precision, cfg.scaling.use_gpu))
    info = DataInfo("synthetic", len(train["label"]), len(val["label"]), (0.5,) * 3, (0.25,) * 3)
    steps = len(train["label"]) // cfg.train.batch_size
    model, _ = restore_or_build_model(cfg, info, None, steps)

    def dataset(d, training):
        ds = tf.data.Dataset.from_tensor_slices((d["image"], tf.one_hot(d["label"], 10)))
        ds = ds.shuffle(4 * cfg.train.batch_size) if training else ds
        if training and cfg.data.augment == "crop_flip":
            ds = ds.map(tf_crop_flip(cfg.data.crop_padding), num_parallel_calls=tf.data.AUTOTUNE)
        # As in worker_input.for_keras, so neither side stalls at epoch boundaries.
        return without_autotuning(ds.batch(cfg.train.batch_size, drop_remainder=training).prefetch(2))

    epoch_times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_times.append(time.perf_counter() - self.start)

    model.fit(dataset(train, True), validation_data=dataset(val, False), epochs=cfg.train.epochs,
              callbacks=[Timer(), *lookahead(cfg, steps)], verbose=0)
    return {"epoch_times": epoch_times, "startup_s": 0.0, "images": len(train["label"]), "model": model}


def ray_train(cfg, workers: int) -> dict:
    from cifar_ray.checkpoint import read_metadata
    from cifar_ray.data import load_training_data
    from cifar_ray.run_folder import resolve_run
    from cifar_ray.train import make_trainer

    with tempfile.TemporaryDirectory() as storage:
        run_cfg = resolve_run(cfg.with_overrides({"num_workers": workers, "storage_path": storage,
                                                  "name": f"throughput-{workers}w-{time.time_ns()}"}))
        start = time.perf_counter()
        train, val, _, info = load_training_data(run_cfg.data, seed=0)
        result = make_trainer(run_cfg, train, val, info).fit()
        wall = time.perf_counter() - start
        # The latest checkpoint holds every epoch; Result.metrics_dataframe only the kept ones.
        history = read_metadata(result.checkpoint.path)["history"]
    epoch_times = [m["epoch_time_s"] for m in history]
    return {"epoch_times": epoch_times, "startup_s": wall - sum(epoch_times), "images": info.num_train}


def product_split(cfg) -> tuple[dict, dict]:
    """(train, val) arrays of the product's split of cfg's data source (real or synthetic): the
    plain side trains and validates on exactly the images the Ray sides do."""
    from cifar_ray.data import load_training_data

    train, val, _, _ = load_training_data(cfg.data, seed=0)

    def arrays(ds):
        batches = list(ds.iter_batches(batch_size=4096, batch_format="numpy"))
        return {k: np.concatenate([b[k] for b in batches]) for k in ("image", "label")}

    return arrays(train), arrays(val)


def synthetic_split(images: int, val_fraction: float) -> tuple[dict, dict]:
    """(train, val) arrays of `images` synthetic images (data.make_synthetic_batch), the last
    `val_fraction` held out."""
    from cifar_ray.data import make_synthetic_batch

    everything = make_synthetic_batch({"id": np.arange(images)}, seed=0)
    split = int(images * (1 - val_fraction))
    return {k: v[:split] for k, v in everything.items()}, {k: v[split:] for k, v in everything.items()}


def steady_rate(run: dict) -> float:
    return run["images"] / statistics.median(run["epoch_times"][1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="notebook_cnn")
    parser.add_argument("--images", type=int, default=8192, help="synthetic images (split as the product splits them)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="N for the N-worker side (0: no such side)")
    parser.add_argument("--data", default=None, help="a real source (default: synthetic images)")
    parser.add_argument("--limit", type=int, default=None, help="with --data: training images")
    parser.add_argument("--augment", default="none", choices=("none", "crop_flip"))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import ray

    from cifar_ray.config import PRESETS, with_recipe

    cfg = with_recipe(PRESETS["default"], args.model).with_overrides({
        "data": args.data or "synthetic", "synthetic_size": args.images, "limit": args.limit,
        "augment": args.augment, "batch_size": args.batch_size, "epochs": args.epochs})
    from cifar_ray.cli import init_ray

    init_ray()  # as cifar-ray's commands start Ray: idle workers kept, Ray Data's executor paced
    ray.data.DataContext.get_current().enable_progress_bars = False

    train, val = product_split(cfg)
    split = len(train["label"])

    sides = {"plain keras.fit": lambda: plain_keras(cfg, train, val),
             "Ray Train, 1 worker": lambda: ray_train(cfg, 1)}
    if args.workers:
        sides[f"Ray Train, {args.workers} workers"] = lambda: ray_train(cfg, args.workers)
    results = {name: [] for name in sides}
    flops = None
    for round_ in range(args.rounds):
        for name, side in sides.items():
            run = side()
            if "model" in run:  # the plain side hands back its model for the FLOP count
                flops = training_flops_per_image(run.pop("model"))
            results[name].append(run)
            print(f"round {round_ + 1}  {name:<22} {steady_rate(run):7.0f} img/s  "
                  f"start-up {run['startup_s']:5.1f} s  epochs {['%.1f' % t for t in run['epoch_times']]}",
                  flush=True)

    import keras

    from cifar_ray.train_loop import precision_policy

    compute_dtype = keras.mixed_precision.Policy(
        precision_policy(cfg.train.mixed_precision, cfg.scaling.use_gpu)).compute_dtype
    peak = matmul_gflops(compute_dtype)
    plain_runs = [steady_rate(r) for r in results["plain keras.fit"]]
    print(f"\nmodel {args.model}: {flops / 1e6:.0f} MFLOP per training image; {compute_dtype} "
          f"matmul peak measured {peak:.0f} GFLOP/s; {split} training images on every side ({cfg.data.data}, augment "
          f"{cfg.data.augment}), global batch {args.batch_size}")
    print("vs plain: the median of each round's ratio (the sides of a round ran back to back)")
    print(f"{'side':<22} {'img/s':>7} {'vs plain':>8} {'start-up s':>10} {'GFLOP/s':>8} {'MFU':>6}")
    for name, runs in results.items():
        rates = [steady_rate(r) for r in runs]
        rate = statistics.median(rates)
        ratio = statistics.median(r / p for r, p in zip(rates, plain_runs))
        startup = statistics.median(r["startup_s"] for r in runs)
        achieved = rate * flops / 1e9
        print(f"{name:<22} {rate:>7.0f} {ratio:>7.2f}x {startup:>10.1f} {achieved:>8.0f} {achieved / peak:>6.1%}")


if __name__ == "__main__":
    main()
