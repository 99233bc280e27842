"""Recipe probes for the time-to-accuracy goal: plain keras.fit in one process, data in memory.

    python benchmarks/recipe_probe.py --data ../shared/data/cifar10/train --epochs 5
    python benchmarks/recipe_probe.py --data ../shared/data/cifar10/train --recipe airbench --epochs 10

Same train/validation split as `python -m cifar_ray.train` (load_training_data, seed 0), so
accuracies compare with the product's runs. Each epoch draws new crops and flips in numpy.
Prints the seconds per epoch (the plain side of a product-vs-plain comparison) and, at the
end, validation accuracy without TTA, with flip TTA and with 6 views (flip x +-1 pixel shift).

    product    models.fast_resnet with its recipe (config.MODEL_RECIPES), as a run builds it
    airbench   airbench94's choices on the same widths (github.com/KellerJordan/cifar10-airbench):
               no residual, identity-initialized convs, GELU, BatchNorm momentum 0.6 (PyTorch's
               convention) without scale, BatchNorm biases at 64x the LR, batch 1024, Nesterov
               0.85, airbench's LR and weight decay converted to Keras' units, a warmup-then-decay
               triangle schedule, and optionally lookahead (a Keras EMA written back every 5 steps)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


AIRBENCH_FLAGS = ("batch_size", "lr", "momentum", "wd", "bias_scaler", "lookahead")


def in_memory(ds) -> tuple[np.ndarray, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=4096, batch_format="numpy"))
    return np.concatenate([b["image"] for b in batches]), np.concatenate([b["label"] for b in batches])


def product_model(cfg, info, steps_per_epoch: int):
    from cifar_ray.train_loop import restore_or_build_model

    return restore_or_build_model(cfg, info, None, steps_per_epoch)[0]


def airbench_model(args, info, steps_per_epoch: int):
    import keras
    from keras import layers

    from cifar_ray import models

    bias_gain = float(np.sqrt(args.bias_scaler))

    class ScaledBias(layers.Layer):
        """x + c * p: a gradient step on p moves the bias c^2 times as far."""

        def build(self, shape):
            self.p = self.add_weight(shape=(shape[-1],), initializer="zeros", name="p")

        def call(self, x):
            return x + keras.ops.cast(bias_gain * self.p, x.dtype)

    def identity_init(c_in):
        def init(shape, dtype=None):  # PyTorch's conv init, then dirac on the first c_in filters
            kernel = np.array(keras.initializers.HeUniform()(shape)) / np.sqrt(6.0)
            n = min(c_in, shape[-1])
            kernel[:, :, :, :n] = 0
            kernel[1, 1, np.arange(n), np.arange(n)] = 1
            return keras.ops.convert_to_tensor(kernel, dtype=dtype)
        return init

    def conv_bn_gelu(x, width, pool=False):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_initializer=identity_init(x.shape[-1]))(x)
        if pool:
            x = layers.MaxPooling2D()(x)
        x = layers.BatchNormalization(momentum=1 - 0.6, epsilon=1e-12, scale=False, center=False)(x)
        return layers.Activation("gelu")(ScaledBias()(x))

    inputs, x = models.normalized_input(info.mean, info.std)
    x = models.patch_whitening(x, info.patch_covariance)
    for width in (64, 256, 256):
        x = conv_bn_gelu(conv_bn_gelu(x, width, pool=True), width)
    x = layers.Dense(10, use_bias=False)(layers.GlobalMaxPooling2D()(x))
    outputs = layers.Activation("softmax", dtype="float32")(layers.Rescaling(1 / 9)(x))
    model = keras.Model(inputs, outputs)

    # airbench's units: LR and decay per 1024 examples of a summed loss, PyTorch's coupled decay
    kilostep = 1024 * (1 + 1 / (1 - args.momentum))
    lr = args.lr / kilostep * args.batch_size  # on Keras' mean loss
    decay_per_step = (args.lr / kilostep) * (args.wd * args.batch_size / kilostep) / (1 - args.momentum)
    total = int(args.epochs * steps_per_epoch)

    class Triangle(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            s, warm = keras.ops.cast(step, "float32"), 0.23 * total
            return lr * keras.ops.where(s < warm, 0.2 + 0.8 * s / warm,
                                        keras.ops.maximum(1.0 - 0.93 * (s - warm) / (total - warm), 0.07))

    optimizer = keras.optimizers.SGD(Triangle(), momentum=args.momentum, nesterov=True,
                                     weight_decay=decay_per_step / lr)
    if args.lookahead:
        optimizer.use_ema, optimizer.ema_momentum, optimizer.ema_overwrite_frequency = True, 0.95, 5
    model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.2),
                  metrics=["accuracy"])
    return model


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    return padded[:, 1 + dy:33 + dy, 1 + dx:33 + dx]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10/train")
    parser.add_argument("--limit", type=int, default=None, help="training images (for a quick try)")
    parser.add_argument("--recipe", choices=("product", "airbench"), default="product")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--pad", type=int, default=None, help="crop padding (default: 4 product, 2 airbench)")
    parser.add_argument("--seed", type=int, default=0)
    airbench = parser.add_argument_group("airbench (its units)")
    airbench.add_argument("--batch-size", type=int, default=1024)
    airbench.add_argument("--lr", type=float, default=11.5)
    airbench.add_argument("--momentum", type=float, default=0.85)
    airbench.add_argument("--wd", type=float, default=0.0153)
    airbench.add_argument("--bias-scaler", type=float, default=64.0)
    airbench.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args()

    import ray

    from cifar_ray.augment import crop_flip
    from cifar_ray.config import PRESETS, with_recipe
    from cifar_ray.data import load_training_data

    cfg = with_recipe(PRESETS["default"], "fast_resnet").with_overrides({
        "data": args.data, "limit": args.limit, "epochs": args.epochs, "seed": args.seed})
    ray.init(logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    train, val, _, info = load_training_data(cfg.data, seed=0)
    x_train, y_train = in_memory(train)
    x_val, y_val = in_memory(val)
    ray.shutdown()
    print(f"{len(y_train)} training / {len(y_val)} validation images, recipe {args.recipe}", flush=True)

    import keras
    import tensorflow as tf

    from cifar_ray.compat import without_autotuning
    from cifar_ray.train_loop import configure_tensorflow

    configure_tensorflow(os.cpu_count() or 1)  # one process: every core
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(args.seed)
    batch = cfg.train.batch_size if args.recipe == "product" else args.batch_size
    pad = args.pad if args.pad is not None else (4 if args.recipe == "product" else 2)
    steps = len(y_train) // batch
    model = product_model(cfg, info, steps) if args.recipe == "product" else airbench_model(args, info, steps)

    one_hot = keras.utils.to_categorical(y_train, 10)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        epoch_start = time.perf_counter()
        images = crop_flip(x_train, rng, pad=pad) if pad else x_train
        ds = tf.data.Dataset.from_tensor_slices((images, one_hot)).shuffle(len(images), seed=epoch)
        model.fit(without_autotuning(ds.batch(batch, drop_remainder=True).prefetch(2)),
                  epochs=epoch + 1, initial_epoch=epoch, verbose=0)
        seconds = time.perf_counter() - epoch_start
        print(f"epoch {epoch + 1}: {seconds:.1f} s, {steps * batch / seconds:.0f} img/s", flush=True)
    if args.recipe == "airbench" and args.lookahead:
        model.optimizer.finalize_variable_values(model.trainable_variables)
    train_s = time.perf_counter() - start

    def scores(views: list[np.ndarray]) -> np.ndarray:
        return sum(model.predict(v, batch_size=1000, verbose=0) for v in views)

    flipped = x_val[:, :, ::-1]
    plain, flip = scores([x_val]), scores([x_val, flipped])
    six = flip + scores([shifted(x_val, 1, 1), shifted(x_val, -1, -1), shifted(flipped, 1, 1),
                         shifted(flipped, -1, -1)])
    shown = {k: v for k, v in vars(args).items() if args.recipe == "airbench" or k not in AIRBENCH_FLAGS}
    print(json.dumps({**shown, "train_s": round(train_s), **{
        name: round(float((s.argmax(1) == y_val).mean()), 4)
        for name, s in (("val", plain), ("val_flip", flip), ("val_tta6", six))}}), flush=True)


if __name__ == "__main__":
    main()
