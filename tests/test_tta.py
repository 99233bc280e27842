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
