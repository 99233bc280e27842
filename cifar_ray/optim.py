"""The training pieces of the airbench94 recipe, as Keras-native parts: an optimizer, a
learning-rate schedule and a callback. models.build_optimizer and train_loop use them.

airbench94 (github.com/KellerJordan/cifar10-airbench) reaches 94% on CIFAR-10 in 10 epochs
with PyTorch's SGD. Keras' SGD differs from it in three ways that matter at airbench's
step sizes, and this module closes each:

    CoupledSGD   weight decay added to the gradient before momentum, as PyTorch's SGD does
                 (Keras' is decoupled and never passes through momentum, so it is ~1/(1-m)
                 = 6.7x weaker at momentum 0.85); per-variable LR scales (BatchNorm biases
                 at 64x); variables that stop training after a step (the whitening bias)
    Triangle     0.2 x peak -> peak at 23% of the steps -> 0.07 x peak, linear
    Lookahead    every 5 steps the weights move to an average of themselves, whose decay
                 ramps with the cube of progress, and the last step keeps the average
"""

from __future__ import annotations

import numpy as np

import keras
from keras import ops


@keras.saving.register_keras_serializable("cifar_ray")
class CoupledSGD(keras.optimizers.SGD):
    """Nesterov SGD in PyTorch's form, with airbench's per-variable rules.

    For a variable v with LR scale s, gradient g, momentum m and weight decay wd:

        d = g + (wd / s) * v          coupled decay: it goes through momentum, as in PyTorch,
                                      and a 64x LR scale does not make the decay 64x stronger
        buf = m * buf + d
        v -= lr * s * (d + m * buf)   (Nesterov)

    `lr_scales` maps a variable's name (e.g. BatchNorm's "beta") to its scale s;
    `stop_steps` maps a variable's path (e.g. "whitening/bias") to the step at which it stops
    training (s becomes 0; airbench freezes its whitening bias after 3 epochs). Both are
    resolved from the step counter, so a resumed run continues exactly.
    """

    def __init__(self, learning_rate=0.01, momentum=0.9, weight_decay=0.0, lr_scales=None, stop_steps=None,
                 name="coupled_sgd", **kwargs):
        kwargs.pop("nesterov", None)
        # Keras' own weight decay stays off: this class applies `weight_decay` in update_step.
        super().__init__(learning_rate=learning_rate, momentum=momentum, nesterov=True, name=name, **kwargs)
        self.coupled_weight_decay = float(weight_decay or 0.0)
        self.lr_scales = dict(lr_scales or {})
        self.stop_steps = {k: int(v) for k, v in (stop_steps or {}).items()}

    @property
    def weight_decay(self):
        return self.coupled_weight_decay

    @weight_decay.setter
    def weight_decay(self, value):  # PBT's explore step sets it (models.set_hyperparameters)
        self.coupled_weight_decay = float(value or 0.0)

    def _apply_weight_decay(self, variables):
        """Keras' decoupled decay: off, the decay is in update_step."""

    def build(self, variables):
        super().build(variables)
        # Each variable's rule, by its index: update_step gets backend variables, which
        # carry no Keras name or path.
        self.rules = [(self.lr_scales.get(v.name, 1.0), self.stop_steps.get(v.path)) for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        scale, stop = self.rules[index]
        lr = ops.cast(learning_rate, variable.dtype) * scale
        if stop is not None:
            lr = ops.where(ops.less(self.iterations, stop), lr, ops.zeros_like(lr))
        gradient = ops.cast(gradient, variable.dtype)
        if self.coupled_weight_decay:
            gradient = gradient + (self.coupled_weight_decay / scale) * variable
        if not self.momentum:
            self.assign_sub(variable, lr * gradient)
            return
        m = self.momentums[index]
        momentum = ops.cast(self.momentum, variable.dtype)
        self.assign(m, m * momentum + gradient)
        self.assign_sub(variable, lr * (gradient + momentum * m))

    def get_config(self):
        config = super().get_config()
        config.pop("nesterov", None)
        return {**config, "weight_decay": self.coupled_weight_decay, "lr_scales": self.lr_scales,
                "stop_steps": self.stop_steps}


@keras.saving.register_keras_serializable("cifar_ray")
class Triangle(keras.optimizers.schedules.LearningRateSchedule):
    """airbench's schedule: linear from start x peak to peak over the first `warmup` of the
    steps, then linear down to end x peak at `total_steps`."""

    def __init__(self, peak: float, total_steps: int, warmup: float = 0.23, start: float = 0.2, end: float = 0.07):
        self.peak, self.total_steps, self.warmup = float(peak), int(total_steps), float(warmup)
        self.warmup_steps = max(1, int(self.warmup * self.total_steps))
        self.start, self.end = float(start), float(end)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        rising = self.start + (1.0 - self.start) * step / self.warmup_steps
        falling_steps = max(1, self.total_steps - self.warmup_steps)
        falling = 1.0 + (self.end - 1.0) * (step - self.warmup_steps) / falling_steps
        return self.peak * ops.where(step < self.warmup_steps, rising, falling)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup": self.warmup,
                "start": self.start, "end": self.end}


class Lookahead(keras.callbacks.Callback):
    """airbench's lookahead: every `every` optimizer steps, average = lerp(average, weights,
    1 - decay) and the weights become the average; at the last step they keep the average.

    decay = 0.95**5 * (step / total_steps)**3: near 0 early (the average is just the weights),
    about 0.77 at the end, where it smooths the last steps of a decaying LR. It covers every
    float weight, BatchNorm's moving statistics included, as airbench's state_dict does.
    A resumed run starts its average from the restored weights.
    """

    def __init__(self, total_steps: int, every: int = 5):
        super().__init__()
        self.total_steps, self.every = int(total_steps), int(every)
        self.average = None

    def on_train_begin(self, logs=None):
        self.average = [np.array(w) for w in self.model.get_weights()]

    def on_train_batch_end(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step % self.every == 0:
            decay = self.decay(step)
            self.average = [a + (1.0 - decay) * (w - a) for a, w in zip(self.average, self.model.get_weights())]
        if step % self.every == 0 or step >= self.total_steps:
            self.model.set_weights(self.average)

    def decay(self, step: int) -> float:
        return 0.95 ** 5 * (step / self.total_steps) ** 3
