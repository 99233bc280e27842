"""Models and optimizers: shapes, the notebook's parameter count, names. No Ray needed."""

import numpy as np
import pytest

from cifar_ray.config import TrainConfig
from cifar_ray.models import MODELS, build_model, build_optimizer

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_map_uint8_images_to_class_probabilities(name):
    model = build_model(name, MEAN, STD)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("uint8")
    probabilities = np.asarray(model(images, training=False))
    assert probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)


def test_notebook_cnn_has_the_notebooks_parameter_count_with_same_padding():
    model = build_model("notebook_cnn", MEAN, STD)
    # 896 + 9,248 + 18,496 + 36,928 convs, 8*8*64*512 + 512 dense, 5,130 head
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 2_168_362


def test_model_normalizes_its_input():
    model = build_model("shallow_cnn", MEAN, STD)
    normalize = model.layers[2]
    pixel = np.full((1, 32, 32, 3), 255 * np.array(MEAN), dtype="float32")
    np.testing.assert_allclose(np.asarray(normalize(model.layers[1](pixel))), 0.0, atol=1e-5)


@pytest.mark.parametrize("name, cls", [("sgd", "SGD"), ("adam", "Adam"), ("rmsprop", "RMSprop")])
def test_optimizers_by_name(name, cls):
    optimizer = build_optimizer(TrainConfig(optimizer=name), steps_per_epoch=10)
    assert type(optimizer).__name__ == cls


def test_cosine_schedule_warms_up_then_decays():
    cfg = TrainConfig(optimizer="sgd", lr=0.4, schedule="cosine", warmup_epochs=1, epochs=4)
    schedule = build_optimizer(cfg, steps_per_epoch=10)._learning_rate  # the schedule itself
    lrs = [float(schedule(step)) for step in (0, 5, 10, 25, 40)]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.2) and lrs[2] == pytest.approx(0.4)
    assert lrs[2] > lrs[3] > lrs[4] >= 0.0
