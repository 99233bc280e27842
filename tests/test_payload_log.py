"""The payload log (payload_log.py) and its export as training data (feedback.py), in this
process. Through Serve: test_registry.py's feedback test."""

import numpy as np
import pyarrow.dataset as ds
import pytest

from cifar_ray import payload_log
from cifar_ray.errors import DataSourceError
from cifar_ray.feedback import export
from cifar_ray.payload_log import SCHEMA, PayloadLog, describe_input
from conftest import make_images


def answer(request_id: str, image=None, version: str = "1") -> dict:
    row = {"kind": "answer", "request_id": request_id, "model_version": version, "top_classes": ["cat", "dog"],
           "top_probabilities": [0.7, 0.2], "latency_ms": 5.0, "input_bytes": 900, "input_format": "image/jpeg"}
    return {**row, **describe_input(image, keep_image=True)} if image is not None else row


def feedback(request_id: str, label: int) -> dict:
    return {"kind": "feedback", "request_id": request_id, "model_version": "1", "label": label}


def test_rows_are_flushed_as_one_dataset_partitioned_by_date(tmp_path):
    log = PayloadLog(str(tmp_path / "log"))
    images, _ = make_images(2)
    log.add(answer("a", images[0]))
    log.add(answer("b"))
    assert log.flush() == 2
    log.add(feedback("a", 3))
    log.flush()
    table = ds.dataset(tmp_path / "log", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 3 and set(SCHEMA.names) <= set(table.column_names) and "date" in table.column_names
    rows = {(r["kind"], r["request_id"]): r for r in table.to_pylist()}
    assert rows["answer", "a"]["image_sha256"] == describe_input(images[0], False)["image_sha256"]
    assert rows["answer", "a"]["image"][:4] == b"\x89PNG" and rows["answer", "b"]["image"] is None
    assert rows["feedback", "a"]["label"] == 3 and rows["answer", "a"]["top_classes"] == ["cat", "dog"]
    assert len(list((tmp_path / "log").glob("date=*/part-*.parquet"))) == 2
    assert log.written == 3 and log.dropped == 0 and not log.due()


def test_storage_that_fails_and_a_full_buffer_drop_rows_and_count_them(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    counted = []
    log = PayloadLog(str(tmp_path / "a-file" / "log"), on_drop=counted.append)
    log.add(answer("a"))
    log.add(answer("b"))
    assert log.flush() == 2  # tried, failed, dropped: nothing raised
    assert (log.dropped, log.written, sum(counted)) == (2, 0, 2)
    monkeypatch.setattr(payload_log, "MAX_BUFFERED", 3)
    log = PayloadLog(str(tmp_path / "log"), on_drop=counted.append)
    for i in range(5):
        log.add(answer(str(i)))
    assert log.dropped == 2 and log.flush() == 3 and log.written == 3


def test_export_keeps_labelled_logged_images_once_each_the_latest_label_winning(tmp_path, ray_cluster):
    from cifar_ray.data import read_source

    images, _ = make_images(3, seed=4)
    log = PayloadLog(str(tmp_path / "log"))
    log.add(answer("a", images[0]))
    log.add(answer("b", images[1]))
    log.add(answer("c", images[1]))  # the same picture again
    log.add(answer("d"))  # labelled, but its image was not kept
    log.add(answer("e", images[2]))  # kept, never labelled
    log.flush()
    for request_id, label in (("a", 1), ("b", 2), ("c", 7), ("d", 4), ("unknown", 5)):
        log.add(feedback(request_id, label))
    log.flush()
    counts = export(str(tmp_path / "log"), str(tmp_path / "out"))
    assert counts == {"answers_logged": 4, "feedback": 5, "labelled_with_image": 3, "images": 2}
    rows = read_source(str(tmp_path / "out")).take_all()
    by_label = sorted(int(r["label"]) for r in rows)
    assert by_label == [1, 7]  # image 1 once, with the label of its later answer
    pixels = {int(r["label"]): np.asarray(r["image"]) for r in rows}
    assert np.array_equal(pixels[1], images[0]) and np.array_equal(pixels[7], images[1])


def test_export_without_labelled_images_is_one_line(tmp_path):
    with pytest.raises(DataSourceError, match="no payload log there"):
        export(str(tmp_path / "none"), str(tmp_path / "out"))
    log = PayloadLog(str(tmp_path / "log"))
    log.add(answer("a"))
    log.flush()
    with pytest.raises(DataSourceError, match="no logged image has feedback yet"):
        export(str(tmp_path / "log"), str(tmp_path / "out"))


def test_a_replicas_row_is_hashed_and_encoded_when_written(tmp_path):
    from cifar_ray.payload_log import answer_row

    images, _ = make_images(2, seed=7)
    answer = {"request_id": "r", "model_version": "2", "top_k": [{"class_name": "cat", "probability": 0.9}]}
    log = PayloadLog(str(tmp_path / "log"))
    log.add(answer_row(answer, 3.0, (1234, "image/png"), images[0], keep_image=True))
    log.add(answer_row({**answer, "request_id": "s"}, 3.0, (99, "json"), images[1], keep_image=False))
    log.flush()
    rows = {r["request_id"]: r for r in ds.dataset(tmp_path / "log", format="parquet", partitioning="hive")
            .to_table().to_pylist()}
    assert rows["r"]["image"] == describe_input(images[0], True)["image"] and rows["s"]["image"] is None
    assert rows["s"]["image_sha256"] == describe_input(images[1], False)["image_sha256"]
    assert (rows["r"]["input_bytes"], rows["r"]["input_format"], rows["r"]["top_classes"]) == (1234, "image/png", ["cat"])


def test_a_restarted_rollout_remembers_the_logged_answers_and_their_labels(tmp_path):
    from cifar_ray.answers import AnswerBook
    from cifar_ray.payload_log import recent_answers

    log = PayloadLog(str(tmp_path / "log"))
    log.add(answer("a"))  # top class "cat": index 3
    log.add(answer("b", version="2"))
    log.add(feedback("a", 3))
    log.flush()
    book = AnswerBook()
    book.remember(recent_answers(str(tmp_path / "log")))
    assert book.label("b", 3) == {"request_id": "b", "model_version": "2", "correct": True}
    assert book.label("a", 5) == {"request_id": "a", "model_version": "1", "correct": False}
    assert book.summary()["2"]["labelled"] == 1 and "1" not in book.summary()  # "a" was counted before the restart
    assert recent_answers(str(tmp_path / "none")) == []


def test_a_killed_writer_loses_at_most_its_unflushed_rows_and_leaves_the_log_readable(tmp_path):
    """A writer SIGKILLed while it adds and flushes rows (a Rollout replica killed): every
    flushed row is in the log, nothing half-written breaks reading it."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    writer = ("import sys\nsys.path.insert(0, sys.argv[2])\nfrom cifar_ray.payload_log import PayloadLog\n"
              "log, i = PayloadLog(sys.argv[1]), 0\n"
              "while True:\n"
              "    log.add({'kind': 'answer', 'request_id': str(i), 'model_version': '1', 'image': bytes(3000)})\n"
              "    i += 1\n"
              "    if i % 200 == 0:\n"
              "        log.flush()\n"
              "        print(i, flush=True)\n")
    path = tmp_path / "log"
    process = subprocess.Popen([sys.executable, "-c", writer, str(path), str(root)], stdout=subprocess.PIPE, text=True)
    flushed = 0
    deadline = time.monotonic() + 60
    while flushed < 2000 and time.monotonic() < deadline:
        flushed = int(process.stdout.readline() or flushed)
    process.send_signal(signal.SIGKILL)  # most likely in the middle of adding or writing
    process.wait(timeout=30)
    ids = {int(i) for i in ds.dataset(path, format="parquet", partitioning="hive").to_table(
        columns=["request_id"]).column("request_id").to_pylist()}
    assert flushed >= 2000 and set(range(flushed)) <= ids
    assert max(ids) < flushed + 200  # beyond what it said it flushed: at most the flush under way
