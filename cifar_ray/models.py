"""Model and optimizer builders: pure functions, no compile, no I/O.

Every model takes uint8-range RGB images (0-255, 32x32x3) and returns class
probabilities. It scales and normalizes its input itself with the training set's
per-channel constants, so a saved model needs no preprocessing code to serve.

Models (parameter counts are for 10 classes):
- `notebook_cnn`: the notebook's Conv32-Conv32-Pool-Drop-Conv64-Conv64-Pool-Drop-
  Dense512-Drop-Dense10, with 'same' padding throughout (the notebook's
  `Conv2D(64, 3, 3)` meant a 3x3 kernel but set stride 3). 2,168,362 parameters.
- `shallow_cnn`: the notebook's one-conv variant, Conv32-Pool-Drop-Dense512-Drop-Dense10.
- `fast_resnet`: a ResNet-9-style net (Page's DAWNBench ResNet-9, airbench) sized for a
  2-core CPU: widths 24-48-96-192, BatchNorm, two residual blocks, global max pool.
  928,690 parameters, about 0.38 GFLOP per training image; its recipe (SGD Nesterov,
  warmup + cosine, label smoothing, weight decay) is config.MODEL_RECIPES["fast_resnet"].
  Measured accuracy: benchmarks/README.md.
"""

from __future__ import annotations

from typing import Callable, Sequence

import keras
from keras import layers

from cifar_ray.config import CLASS_NAMES, IMAGE_SHAPE, TrainConfig


def normalized_input(mean: Sequence[float], std: Sequence[float]) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """An image input and its normalized float version: (x / 255 - mean) / std."""
    inputs = keras.Input(shape=IMAGE_SHAPE, name="image")
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = layers.Normalization(mean=list(mean), variance=[s * s for s in std])(x)
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


def notebook_cnn(mean, std, num_classes: int = len(CLASS_NAMES)) -> keras.Model:
    inputs, x = normalized_input(mean, std)
    for width in (32, 64):
        x = layers.Conv2D(width, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(width, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
        x = layers.Dropout(0.25)(x)
    return keras.Model(inputs, notebook_head(x, num_classes), name="notebook_cnn")


def shallow_cnn(mean, std, num_classes: int = len(CLASS_NAMES)) -> keras.Model:
    inputs, x = normalized_input(mean, std)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Dropout(0.25)(x)
    return keras.Model(inputs, notebook_head(x, num_classes), name="shallow_cnn")


def conv_bn_relu(x: keras.KerasTensor, width: int) -> keras.KerasTensor:
    x = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
    # Keras' default momentum 0.99 leaves the moving statistics near their initial values
    # for hundreds of steps, so early validation is near chance; 0.9 is PyTorch's default,
    # which the ResNet-9 recipes were tuned with.
    x = layers.BatchNormalization(momentum=0.9)(x)
    return layers.ReLU()(x)


def residual(x: keras.KerasTensor, width: int) -> keras.KerasTensor:
    return layers.Add()([x, conv_bn_relu(conv_bn_relu(x, width), width)])


def fast_resnet(mean, std, num_classes: int = len(CLASS_NAMES),
                widths: Sequence[int] = (24, 48, 96, 192)) -> keras.Model:
    inputs, x = normalized_input(mean, std)
    x = conv_bn_relu(x, widths[0])                                        # 32x32
    x = residual(layers.MaxPooling2D()(conv_bn_relu(x, widths[1])), widths[1])  # 16x16
    x = layers.MaxPooling2D()(conv_bn_relu(x, widths[2]))                 # 8x8
    x = residual(layers.MaxPooling2D()(conv_bn_relu(x, widths[3])), widths[3])  # 4x4
    x = layers.GlobalMaxPooling2D()(x)
    return keras.Model(inputs, classifier_head(x, num_classes), name="fast_resnet")


MODELS: dict[str, Callable[..., keras.Model]] = {
    "notebook_cnn": notebook_cnn,
    "shallow_cnn": shallow_cnn,
    "fast_resnet": fast_resnet,
}


def build_model(name: str, mean: Sequence[float], std: Sequence[float]) -> keras.Model:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name](mean, std)


def build_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer named by cfg.optimizer, with its learning-rate schedule."""
    lr: float | keras.optimizers.schedules.LearningRateSchedule = cfg.lr
    if cfg.schedule == "cosine":
        warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup_steps else cfg.lr,
            warmup_target=cfg.lr if warmup_steps else None,
            warmup_steps=warmup_steps,
            decay_steps=max(1, cfg.epochs * steps_per_epoch - warmup_steps),
        )
    decay = cfg.weight_decay or None
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=True, weight_decay=decay)
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr, weight_decay=decay)
    if cfg.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(lr, weight_decay=decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
