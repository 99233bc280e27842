"""Test-time augmentation (tta.py): the six views, their weights, and how they are combined."""

import numpy as np

from cifar_ray.tta import predict_with_tta, tta_of, views


def test_six_views_mirror_and_shift_by_one_pixel_with_airbench_weights():
    images = np.arange(2 * 4 * 4 * 1).reshape(2, 4, 4, 1)
    weighted = views(images)
    assert [w for w, _ in weighted] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    assert np.array_equal(weighted[1][1], images[:, :, ::-1])
    up_left, down_right = weighted[2][1], weighted[4][1]
    assert np.array_equal(up_left[:, 1:, 1:], images[:, :3, :3])  # moved one pixel down-right in the frame
    assert np.array_equal(down_right[:, :3, :3], images[:, 1:, 1:])
    assert np.array_equal(up_left[:, 0, 1:], images[:, 1, :3])  # reflect padding


def test_combined_views_average_logits_in_one_call():
    calls = []

    def left_vs_right(x):  # logits: the left column's brightness vs the right column's
        calls.append(len(x))
        logits = np.stack([x[:, :, 0, 0].mean(1), x[:, :, -1, 0].mean(1)], axis=1) / 50.0
        return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    images = np.zeros((3, 32, 32, 1))
    images[:, :, :16] = 200.0  # bright on the left: the plain view says class 0
    assert left_vs_right(images)[0, 0] > 0.98
    combined = predict_with_tta(left_vs_right, images)
    assert calls[-1] == 6 * 3  # every view in one call
    np.testing.assert_allclose(combined, 0.5, atol=1e-6)  # each mirror pair cancels out
    np.testing.assert_allclose(predict_with_tta(lambda x: np.tile([0.7, 0.3], (len(x), 1)), images),
                               [[0.7, 0.3]] * 3, rtol=1e-6)


def test_a_checkpoint_says_whether_it_is_scored_with_tta():
    assert tta_of({"config": {"model": {"model": "fast_resnet", "tta": True}}})
    assert not tta_of({"config": {"model": {"model": "notebook_cnn"}}})  # made before the field existed


def test_evaluate_and_serve_score_a_fast_resnet_checkpoint_with_tta_unless_told_not_to(tmp_path):
    from cifar_ray import live_model
    from cifar_ray.checkpoint import make_metadata, save_checkpoint
    from cifar_ray.config import PRESETS, with_recipe
    from cifar_ray.data import DataInfo
    from cifar_ray.evaluate import Predictor
    from cifar_ray.models import build_model

    cfg = with_recipe(PRESETS["default"], "fast_resnet")
    info = DataInfo("synthetic", 8, 8, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    model = build_model("fast_resnet", info.mean, info.std)
    save_checkpoint(tmp_path, model, make_metadata(cfg, info, epoch=1, metrics={}, history=[]))
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3)).astype("uint8")
    plain = np.asarray(model.predict_on_batch(images))
    six_views = predict_with_tta(lambda x: np.asarray(model.predict_on_batch(x)), images)
    assert not np.allclose(plain, six_views, atol=1e-4)

    batch = {"image": images, "label": np.zeros(5, "int64")}
    np.testing.assert_allclose(Predictor(str(tmp_path))(batch)["probabilities"], six_views, atol=1e-5)
    np.testing.assert_allclose(Predictor(str(tmp_path), tta=False)(batch)["probabilities"], plain, atol=1e-5)
    served = live_model.load(tmp_path, "1")
    np.testing.assert_allclose(served.predict(images), six_views, atol=1e-5)
    np.testing.assert_allclose(served.predict(images, tta=False), plain, atol=1e-5)
