"""The airbench recipe's pieces (optim.py, models.fast_resnet) on tiny data: the optimizer
against PyTorch's SGD written out in numpy, the schedule, lookahead, the frozen whitening
bias, and the same steps and LRs for 1 and 2 workers. No Ray needed."""

from dataclasses import replace

import numpy as np
import pytest

import keras

from cifar_ray.config import PRESETS, with_recipe
from cifar_ray.run_folder import with_global_batch
from cifar_ray.data import training_steps_per_epoch
from cifar_ray.models import build_model, build_optimizer
from cifar_ray.optim import CoupledSGD, Lookahead, Triangle

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)  # of pixels scaled to [0, 1]


def torch_sgd(v, grads, lr, momentum, weight_decay, scale):
    """PyTorch's SGD(nesterov=True) on one parameter group with lr * scale and weight decay
    weight_decay / scale, as airbench sets its groups."""
    buf = np.zeros_like(v)
    for g in grads:
        d = g + weight_decay / scale * v
        buf = momentum * buf + d
        v = v - lr * scale * (d + momentum * buf)
    return v


def test_coupled_sgd_matches_pytorch_sgd_with_per_variable_scales():
    rng = np.random.default_rng(0)
    start = {"kernel": rng.normal(size=(3, 4)), "beta": rng.normal(size=(4,))}
    variables = [keras.Variable(start[name], name=name, dtype="float32") for name in start]
    grads = [[rng.normal(size=start[name].shape) for name in start] for _ in range(3)]
    optimizer = CoupledSGD(0.1, momentum=0.85, weight_decay=0.01, lr_scales={"beta": 64.0})
    for step in grads:
        optimizer.apply([keras.ops.convert_to_tensor(g, "float32") for g in step], variables)
    for i, (name, scale) in enumerate((("kernel", 1.0), ("beta", 64.0))):
        expected = torch_sgd(start[name], [step[i] for step in grads], 0.1, 0.85, 0.01, scale)
        np.testing.assert_allclose(np.asarray(variables[i]), expected, rtol=1e-4, atol=1e-5)


def test_a_variable_stops_training_at_its_step_and_the_rule_survives_saving(tmp_path):
    bias = keras.Variable(np.zeros(2), name="bias", dtype="float32")
    optimizer = CoupledSGD(0.5, momentum=0.0, weight_decay=0.1, stop_steps={bias.path: 2})
    values = []
    for _ in range(4):
        optimizer.apply([keras.ops.ones((2,))], [bias])
        values.append(float(np.asarray(bias)[0]))
    assert values[0] < 0 and values[1] < values[0]  # trains for steps 0 and 1
    assert values[3] == values[2] == values[1]  # then neither the gradient nor the decay moves it
    restored = CoupledSGD.from_config(optimizer.get_config())
    assert (restored.stop_steps, restored.weight_decay) == ({bias.path: 2}, 0.1)


def test_triangle_schedule_rises_to_its_peak_at_23_percent_then_falls():
    schedule = Triangle(1.5, total_steps=100)
    lrs = {step: float(schedule(step)) for step in (0, 23, 100)}
    assert lrs == pytest.approx({0: 0.3, 23: 1.5, 100: 0.07 * 1.5})
    assert float(schedule(10)) == pytest.approx(1.5 * (0.2 + 0.8 * 10 / 23))


def test_lookahead_averages_every_5_steps_and_ends_on_the_average():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    lookahead = Lookahead(total_steps=12)
    lookahead.set_model(model)
    lookahead.on_train_begin()
    start = model.get_weights()[0].copy()

    def step_to(step, weights):  # as if the optimizer had just taken step `step`
        model.optimizer.iterations.assign(step)
        model.set_weights([weights])
        lookahead.on_train_batch_end(0)
        return model.get_weights()[0]

    moved = start + 1.0
    assert np.array_equal(step_to(4, moved), moved)  # no update between multiples of 5
    decay = 0.95 ** 5 * (5 / 12) ** 3
    average = start + (1 - decay) * (moved - start)
    np.testing.assert_allclose(step_to(5, moved), average, rtol=1e-6)  # weights := the average
    np.testing.assert_allclose(step_to(12, average + 3.0), average, rtol=1e-6)  # the last step keeps it


def test_whitening_bias_trains_for_its_epochs_then_freezes_and_its_kernel_never_moves():
    cfg = replace(with_recipe(PRESETS["default"], "fast_resnet").train,
                  epochs=3, batch_size=16, whitening_bias_epochs=1, lookahead=False)
    model = build_model("fast_resnet", MEAN, STD)
    model.compile(optimizer=build_optimizer(cfg, steps_per_epoch=2), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 32, 32, 3)).astype("uint8")
    labels = keras.utils.to_categorical(rng.integers(0, 10, 32), 10)
    whitening = model.get_layer("whitening")
    kernel, snapshots = np.asarray(whitening.kernel).copy(), [np.asarray(whitening.bias).copy()]
    for epoch in range(3):
        model.fit(images, labels, batch_size=16, epochs=epoch + 1, initial_epoch=epoch, verbose=0)
        snapshots.append(np.asarray(whitening.bias).copy())
    assert not np.array_equal(snapshots[0], snapshots[1])  # epoch 1: it trains
    assert np.array_equal(snapshots[1], snapshots[3])  # epochs 2 and 3: frozen
    assert np.array_equal(kernel, np.asarray(whitening.kernel))
    conv = next(layer for layer in model.layers if layer.name.startswith("conv2d"))
    assert np.asarray(conv.kernel)[1, 1, 0, 0] != 1.0  # the convs did train


@pytest.mark.parametrize("num_train", [42_804, 45_000, 2_100])
def test_one_and_two_workers_take_the_same_steps_at_the_same_lrs(num_train):
    recipe = with_recipe(PRESETS["default"], "fast_resnet")
    schedules = []
    for workers in (1, 2):
        cfg = with_global_batch(recipe.with_overrides({"num_workers": workers}))
        steps = training_steps_per_epoch(num_train, cfg.train.batch_size, workers)
        optimizer = build_optimizer(cfg.train, steps)
        schedules.append([float(optimizer._learning_rate(s)) for s in range(0, steps * cfg.train.epochs + 1)])
    assert schedules[0] == schedules[1]
