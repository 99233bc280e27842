"""Batch inference with Ray Data over a Parquet folder the test writes.

Kept apart from test_serve.py: a live Serve replica would hold one of the session's two CPUs.
"""

import numpy as np

from conftest import make_images, write_parquet_folder


def test_batch_inference_writes_one_prediction_per_row(two_worker_run, tmp_path):
    import pyarrow.parquet as pq

    from cifar_ray.predict import predict

    _, summary, _ = two_worker_run
    images, labels = make_images(37, seed=8)
    data = write_parquet_folder(tmp_path / "in", images, labels)
    assert predict(summary["best_checkpoint"], str(data), str(tmp_path / "out")) == 37
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == 37
    assert set(table.column_names) >= {"label", "predicted", "predicted_class", "confidence", "probabilities"}
    probs = np.stack(table.column("probabilities").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert sorted(table.column("label").to_pylist()) == sorted(labels.tolist())
