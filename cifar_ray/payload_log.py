"""The payload log: a sample of what the endpoint was asked and what it answered, as Parquet.

One row per sampled answer (what KServe's payload logger keeps, as a table): when, the
request id, the version, the top classes and their probabilities, the latency, the input's
size and format, the SHA-256 of the decoded 32x32 image and, only where the operator has
consent to keep inputs (`payload_log_images`), that image as PNG bytes. One row per
feedback label, against its request id. `feedback.py` turns the labelled images into
training data.

The Rollout deployment writes it (rollout.py), off every request's path: rows wait in a
bounded buffer, flushed every FLUSH_S or FLUSH_ROWS as one Parquet file, partitioned by
date, that pyarrow and Ray Data read as one dataset:

    <payload_log_path>/date=2026-12-06/part-<time>-<id>.parquet
    pyarrow.dataset.dataset(path, partitioning="hive"); ray.data.read_parquet(path)

Nothing waits for it: when the buffer is full or the storage fails, rows are dropped and
counted (`dropped`, a log line, the metric cifar_ray_payload_rows_dropped). A killed
Rollout replica loses at most its unflushed rows.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
import uuid
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from cifar_ray.config import IMAGE_SHAPE
from cifar_ray.errors import first_line
from cifar_ray.storage import write_file

logger = logging.getLogger("ray.serve")
FLUSH_S = 2.0
FLUSH_ROWS = 5_000
MAX_BUFFERED = 100_000
SCHEMA = pa.schema([
    ("time", pa.timestamp("ms", tz="UTC")),
    ("kind", pa.string()),  # "answer" or "feedback"
    ("request_id", pa.string()),
    ("model_version", pa.string()),
    ("top_classes", pa.list_(pa.string())),
    ("top_probabilities", pa.list_(pa.float32())),
    ("latency_ms", pa.float32()),
    ("input_bytes", pa.int64()),
    ("input_format", pa.string()),  # the upload's content type, or "json"
    ("image_sha256", pa.string()),  # of the decoded 32x32x3 uint8 pixels
    ("image", pa.binary()),  # those pixels as PNG, with payload_log_images only
    ("label", pa.int64()),  # feedback rows: the true class index
])


def describe_input(image: np.ndarray, keep_image: bool) -> dict:
    """The payload columns of one decoded image: its hash, and its PNG bytes if kept."""
    row = {"image_sha256": hashlib.sha256(np.ascontiguousarray(image, np.uint8).tobytes()).hexdigest()}
    if keep_image:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
        row["image"] = buffer.getvalue()
    return row


def answer_row(answer: dict, latency_ms: float, source: tuple[int, str], image: np.ndarray,
               keep_image: bool) -> dict:
    """The row of one answer, as a replica sends it: `source` is (request body bytes, content
    type or "json"). Its image travels as raw pixels; the writer hashes them and encodes the
    PNG when it flushes (`_described`), off the replica's event loop."""
    return {"kind": "answer", "request_id": answer["request_id"], "model_version": answer["model_version"],
            "top_classes": [t["class_name"] for t in answer["top_k"]],
            "top_probabilities": [t["probability"] for t in answer["top_k"]], "latency_ms": latency_ms,
            "input_bytes": source[0], "input_format": source[1], "pixels": np.ascontiguousarray(image).tobytes(),
            "keep_image": keep_image}


def _described(row: dict) -> dict:
    """A row as written: raw pixels (answer_row) become their SHA-256 and, if kept, a PNG."""
    if "pixels" not in row:
        return row
    row = dict(row)
    image = np.frombuffer(row.pop("pixels"), np.uint8).reshape(IMAGE_SHAPE)
    return {**row, **describe_input(image, row.pop("keep_image"))}


def recent_answers(path: str, days: int = 2) -> list[tuple[str, str, int, int | None]]:
    """(request id, version, class index, the label fed back or None) of the answers logged
    in the last `days` date partitions, oldest first: what the Rollout deployment remembers
    again when its replica restarts (answers.AnswerBook.remember)."""
    import pyarrow.dataset as ds

    from cifar_ray.config import CLASS_NAMES
    from cifar_ray.storage import subfolders

    fs, folders = subfolders(path, "date=")
    latest = sorted(f.path for f in folders)[-days:]
    if not latest:
        return []
    table = ds.dataset([ds.dataset(folder, filesystem=fs, format="parquet") for folder in latest]).to_table(
        columns=["time", "kind", "request_id", "model_version", "top_classes", "label"]).sort_by("time")
    labels = {r["request_id"]: r["label"] for r in table.to_pylist() if r["kind"] == "feedback"}
    return [(r["request_id"], r["model_version"], CLASS_NAMES.index(r["top_classes"][0]), labels.get(r["request_id"]))
            for r in table.to_pylist() if r["kind"] == "answer" and r["top_classes"]]


class PayloadLog:
    """Buffered rows of SCHEMA, written to `path` (a folder or a URI) by `flush`."""

    def __init__(self, path: str, on_drop=None):
        self.path = path
        self.rows: list[dict] = []
        self.dropped = self.written = 0
        self.on_drop = on_drop  # called with the count of rows dropped (a metric)
        self.lock = threading.Lock()
        self.last_flush = time.monotonic()
        self._warned = ""

    def add(self, row: dict) -> None:
        """Buffer one row (`time` set here); past MAX_BUFFERED it is dropped and counted."""
        with self.lock:
            if len(self.rows) >= MAX_BUFFERED:
                self._drop(1, "the buffer is full")
                return
            self.rows.append({"time": datetime.now(timezone.utc), **row})

    def due(self) -> bool:
        return len(self.rows) >= FLUSH_ROWS or (bool(self.rows) and time.monotonic() - self.last_flush >= FLUSH_S)

    def flush(self) -> int:
        """Write the buffered rows as one Parquet file per date; the number written. A write
        that fails drops its rows (counted) rather than keeping the buffer growing."""
        with self.lock:
            rows, self.rows = self.rows, []
            self.last_flush = time.monotonic()
        if not rows:
            return 0
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([_described(r) for r in rows], schema=SCHEMA)
        dates = [r["time"].strftime("%Y-%m-%d") for r in rows]
        for date in sorted(set(dates)):
            part = table.filter(pa.array([d == date for d in dates])) if len(set(dates)) > 1 else table
            name = f"part-{datetime.now(timezone.utc):%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
            try:
                sink = pa.BufferOutputStream()
                pq.write_table(part, sink)
                # whole or not at all (storage.write_file): a writer killed mid-file leaves no
                # half a Parquet file to break every later read of the log
                write_file(f"{self.path.rstrip('/')}/date={date}", name, sink.getvalue().to_pybytes())
                self.written += part.num_rows
            except Exception as e:
                with self.lock:
                    self._drop(part.num_rows, f"cannot write to {self.path}: {first_line(e)}")
        return len(rows)

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        if self.on_drop:
            self.on_drop(count)
        if why != self._warned:  # once per cause, not per row
            logger.error(f"payload log: {why}; dropping rows ({self.dropped} dropped so far)")
            self._warned = why
