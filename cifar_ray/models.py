"""Model and optimizer builders: pure functions, no compile, no I/O.

Every model takes uint8-range RGB images (0-255, 32x32x3) and returns class
probabilities. It scales and normalizes its input itself with the training set's
per-channel constants, so a saved model needs no preprocessing code to serve.

Models (parameter counts are for 10 classes):
- `notebook_cnn`: the notebook's Conv32-Conv32-Pool-Drop-Conv64-Conv64-Pool-Drop-
  Dense512-Drop-Dense10, with 'same' padding throughout (the notebook's
  `Conv2D(64, 3, 3)` meant a 3x3 kernel but set stride 3). 2,168,362 parameters.
- `shallow_cnn`: the notebook's one-conv variant, Conv32-Pool-Drop-Dense512-Drop-Dense10.
- `fast_resnet`: airbench94's network (Keller Jordan's CIFAR-10 speedruns,
  github.com/KellerJordan/cifar10-airbench): a 2x2 patch-whitening conv computed from the
  training data (split.compute_patch_covariance), then three blocks of conv-pool-BatchNorm-
  GELU and conv-BatchNorm-GELU at widths 64-256-256, global max pool and a 1/9-scaled linear
  head. 1.97 M parameters, 236 MFLOP per image forward. Its recipe (optim.py's CoupledSGD,
  triangle schedule and lookahead, label smoothing, TTA) is config.MODEL_RECIPES["fast_resnet"].
  Measured accuracy: benchmarks/README.md.

Every builder takes the training set's statistics (per-channel mean and std, and the
patch covariance, which only `fast_resnet` uses); data.DataInfo holds all three.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

import keras
from keras import layers

from cifar_ray.config import CLASS_NAMES, IMAGE_SHAPE, TrainConfig
from cifar_ray.optim import CoupledSGD, Triangle

WHITENING = "whitening"  # the whitening layer's name: its bias stops training after a few epochs


def normalized_input(mean: Sequence[float], std: Sequence[float]) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """An image input and its normalized float version: (x / 255 - mean) / std.

    In float32 under any precision policy: bfloat16 keeps 8 bits of a pixel's value, and
    fast_resnet's whitening layer amplifies the small differences between neighbouring
    pixels up to 40x. The first layer of the lower-precision policy casts the result.
    """
    inputs = keras.Input(shape=IMAGE_SHAPE, name="image")
    x = layers.Rescaling(1.0 / 255, dtype="float32")(inputs)
    x = layers.Normalization(mean=list(mean), variance=[s * s for s in std], dtype="float32")(x)
    return inputs, x


def classifier_head(x: keras.KerasTensor, num_classes: int) -> keras.KerasTensor:
    # float32 output keeps the softmax stable under a mixed-precision policy
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)


def notebook_head(x: keras.KerasTensor, num_classes: int) -> keras.KerasTensor:
    """The notebooks' Flatten-Dense512-Dropout(0.5) top, then the classifier."""
    x = layers.Flatten()(x)
    x = layers.Dense(512, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    return classifier_head(x, num_classes)


def notebook_cnn(mean, std, patch_covariance=None, num_classes: int = len(CLASS_NAMES)) -> keras.Model:
    inputs, x = normalized_input(mean, std)
    for width in (32, 64):
        x = layers.Conv2D(width, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(width, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
        x = layers.Dropout(0.25)(x)
    return keras.Model(inputs, notebook_head(x, num_classes), name="notebook_cnn")


def shallow_cnn(mean, std, patch_covariance=None, num_classes: int = len(CLASS_NAMES)) -> keras.Model:
    inputs, x = normalized_input(mean, std)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Dropout(0.25)(x)
    return keras.Model(inputs, notebook_head(x, num_classes), name="shallow_cnn")


def torch_like_init() -> keras.initializers.Initializer:
    """PyTorch's default conv and linear init, uniform in +-1/sqrt(fan_in), which airbench's
    tuning assumes (Keras' Glorot draws about 2.4x larger for the head)."""
    return keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform")


@keras.saving.register_keras_serializable("cifar_ray")
class PartialIdentity(keras.initializers.Initializer):
    """A 3x3 conv kernel that starts as the identity on its first min(c_in, c_out) filters
    (PyTorch's dirac_, as airbench initializes every 3x3 conv), the rest as torch_like_init."""

    def __call__(self, shape, dtype=None):
        kernel = np.array(torch_like_init()(shape), dtype="float32")
        n = min(shape[-2], shape[-1])
        kernel[:, :, :, :n] = 0.0
        kernel[shape[0] // 2, shape[1] // 2, np.arange(n), np.arange(n)] = 1.0
        return keras.ops.convert_to_tensor(kernel, dtype=dtype)


def conv_bn_gelu(x: keras.KerasTensor, width: int, pool: bool = False) -> keras.KerasTensor:
    """3x3 conv (then an optional 2x2 max pool), BatchNorm, GELU, as airbench94.

    BatchNorm as airbench's: no scale (frozen at 1), a bias whose LR is 64x (optim.CoupledSGD's
    lr_scales on "beta"), eps 1e-12, and momentum 0.6 (PyTorch's 0.4): statistics that follow
    the fast-moving weights closely.
    """
    x = layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_initializer=PartialIdentity())(x)
    if pool:  # pooling before the norm: the norm then sees the statistics the next layer gets
        x = layers.MaxPooling2D()(x)
    x = layers.BatchNormalization(momentum=0.6, epsilon=1e-12, scale=False)(x)
    return layers.Activation("gelu")(x)


@keras.saving.register_keras_serializable("cifar_ray")
class PatchWhitening(layers.Layer):
    """A 2x2 'valid' conv with a frozen kernel (a non-trainable weight, so it stays frozen
    through save and load) and a trainable bias."""

    def __init__(self, filters: int, size: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.size = filters, size

    def build(self, input_shape):
        shape = (self.size, self.size, input_shape[-1], self.filters)
        self.kernel = self.add_weight(shape=shape, initializer="zeros", trainable=False, name="kernel")
        self.bias = self.add_weight(shape=(self.filters,), initializer="zeros", name="bias")

    def call(self, x):
        kernel = keras.ops.cast(self.kernel, x.dtype)
        return keras.ops.conv(x, kernel, padding="valid") + keras.ops.cast(self.bias, x.dtype)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "size": self.size}


def patch_whitening(x: keras.KerasTensor, patch_covariance: Optional[Sequence], eps: float = 5e-4,
                    ) -> keras.KerasTensor:
    """Whiten the image's 2x2x3 patches (airbench), then GELU.

    The 24 frozen filters are the 12 eigenvectors of the training set's patch covariance,
    each scaled by 1/sqrt(eigenvalue) and taken with both signs, so the GELU after it keeps
    both halves. Decorrelated inputs let SGD take large steps from the first epoch. The bias
    trains for the recipe's first epochs only (TrainConfig.whitening_bias_epochs, through
    optim.CoupledSGD's stop_steps). Without a covariance (unit tests) it assumes white
    patches: the identity basis.
    """
    size = 2
    dim = size * size * IMAGE_SHAPE[-1]
    covariance = np.eye(dim) if patch_covariance is None else np.asarray(patch_covariance, "float64")
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    filters = eigenvectors / np.sqrt(np.maximum(eigenvalues, 0.0) + eps)
    kernel = np.concatenate([filters, -filters], axis=1).reshape(size, size, IMAGE_SHAPE[-1], 2 * dim)
    whitening = PatchWhitening(2 * dim, size, name=WHITENING, dtype="float32")  # see normalized_input
    x = whitening(x)
    whitening.kernel.assign(kernel.astype("float32"))
    return layers.Activation("gelu", dtype="float32")(x)


def fast_resnet(mean, std, patch_covariance=None, num_classes: int = len(CLASS_NAMES),
                widths: Sequence[int] = (64, 256, 256)) -> keras.Model:
    inputs, x = normalized_input(mean, std)
    x = patch_whitening(x, patch_covariance)          # 31x31x24
    for width in widths:                              # 15x15, 7x7, 3x3
        x = conv_bn_gelu(conv_bn_gelu(x, width, pool=True), width)
    x = layers.GlobalMaxPooling2D()(x)
    # Small logits (x 1/9, airbench) keep the early softmax soft: large steps stay stable.
    x = layers.Dense(num_classes, use_bias=False, kernel_initializer=torch_like_init())(x)
    x = layers.Rescaling(1 / 9)(x)
    outputs = layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="fast_resnet")


MODELS: dict[str, Callable[..., keras.Model]] = {
    "notebook_cnn": notebook_cnn,
    "shallow_cnn": shallow_cnn,
    "fast_resnet": fast_resnet,
}


def build_model(name: str, mean: Sequence[float], std: Sequence[float],
                patch_covariance: Optional[Sequence] = None) -> keras.Model:
    """The named model for data with these statistics (data.DataInfo holds all three)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name](mean, std, patch_covariance)


def learning_rate(cfg: TrainConfig, steps_per_epoch: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """cfg.lr, or its schedule over the run's steps (cfg.schedule)."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "triangle":
        return Triangle(cfg.lr, cfg.epochs * steps_per_epoch)
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else cfg.lr,
        warmup_target=cfg.lr if warmup_steps else None,
        warmup_steps=warmup_steps,
        decay_steps=max(1, cfg.epochs * steps_per_epoch - warmup_steps),
    )


def set_hyperparameters(optimizer: keras.optimizers.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> None:
    """Give a restored optimizer cfg's learning rate (schedule) and weight decay, keeping its
    state: its step count, so a schedule goes on where it was, and its momentum. PBT's
    explore step changes these between two parts of a trial."""
    optimizer.learning_rate = learning_rate(cfg, steps_per_epoch)
    optimizer.weight_decay = cfg.weight_decay or None


def build_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer named by cfg.optimizer, with its learning-rate schedule."""
    lr = learning_rate(cfg, steps_per_epoch)
    decay = cfg.weight_decay or None
    if cfg.optimizer == "sgd_coupled":
        stop_steps = ({f"{WHITENING}/bias": cfg.whitening_bias_epochs * steps_per_epoch}
                      if cfg.whitening_bias_epochs is not None else {})
        return CoupledSGD(lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          lr_scales={"beta": cfg.bias_lr_scale}, stop_steps=stop_steps)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=True, weight_decay=decay)
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr, weight_decay=decay)
    if cfg.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(lr, weight_decay=decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
