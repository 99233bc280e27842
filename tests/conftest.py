"""Shared fixtures: one local Ray for the whole session, and tiny data made in code."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from cifar_ray.config import CLASS_NAMES


METRICS_EVERY_MS = 2000


@pytest.fixture(scope="session")
def ray_cluster():
    """One local 2-CPU Ray for every test that needs it; its address for subprocesses."""
    import ray

    from cifar_ray.cli import LOCAL_RAY_ENV
    from cifar_ray.serve import FAST_INGRESS_ENV

    # Serve as shipped: Ray Serve's HAProxy ingress, read when Ray starts. A replica being
    # replaced keeps its port 1 s instead of 30 (that wait is for outside load balancers).
    # Idle workers kept and no preemption watcher, as cli.init_ray starts a local Ray (tiny
    # epochs took 2.8 s instead of 0.7 s without the first).
    os.environ.update({**FAST_INGRESS_ENV, **LOCAL_RAY_ENV, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"})
    # Ray Train's controller looks at its workers every 2 s by default: each report, the end
    # of a run and a dead worker wait for that look (measured: kill2 62-64 s -> 53-56 s).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # Metrics exported every 2 s, not 10: test_serve's Prometheus test waits for them. Ray
    # keeps a gauge for 2 intervals, so that test also proves an idle replica renews its own.
    os.environ["RAY_metrics_report_interval_ms"] = str(METRICS_EVERY_MS)
    # With the dashboard, as on a real cluster: without its state API, Ray Train cannot
    # release a finished Tune trial's placement group, and later work waits for CPUs.
    context = ray.init(num_cpus=2, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield context.address_info["address"]
    from ray import serve

    serve.shutdown()  # stops HAProxy with it, which would otherwise outlive Ray and hold its ports
    ray.shutdown()


def make_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable tiny images: each class a colour, plus noise (like data.make_synthetic_batch)."""
    from cifar_ray.data import make_synthetic_batch

    batch = make_synthetic_batch({"id": np.arange(n)}, seed=seed)
    return batch["image"], batch["label"]


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def write_parquet_folder(root: Path, images: np.ndarray, labels: np.ndarray, fmt: str = "PNG",
                         parts: int = 2) -> Path:
    """A Parquet folder in the shared data's schema: image (encoded bytes), label (int64)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(np.array_split(np.arange(len(labels)), parts)):
        table = pa.table({"image": [encode(images[j], fmt) for j in idx],
                          "label": pa.array(labels[idx], pa.int64())})
        pq.write_table(table, root / f"part-{i:03d}.parquet")
    return root


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / CLASS_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.png").write_bytes(encode(image))
    return root


@pytest.fixture
def subprocess_env(ray_cluster) -> dict:
    """Environment for a CLI subprocess that joins the test session's Ray cluster."""
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "RAY_ADDRESS": ray_cluster,
            "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def train_worker_pids(address: str) -> set[int]:
    """PIDs of the live Ray Train workers, from Ray's state API."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"),
                                                   ("state", "=", "ALIVE")], detail=True)
    return {a.pid for a in actors if a.pid}


def saving_weights_loop(weights_dir: str):
    """The real per-worker loop, then each worker saves the weights it ended with."""
    from cifar_ray.train_loop import fit_on_this_worker

    def loop(loop_config):
        import ray.train

        model = fit_on_this_worker(loop_config)
        rank = ray.train.get_context().get_world_rank()
        np.savez(Path(weights_dir) / f"rank{rank}.npz", *model.get_weights())

    return loop


def full_disk_loop(epoch: int):
    """The real per-worker loop, except that uploading checkpoint `epoch` into the storage
    path fails as a full disk does, at pyarrow's file-system call (Ray Train's upload): part
    of the model file is written, then ENOSPC."""
    from cifar_ray.train_loop import fit_on_this_worker

    def loop(loop_config):
        import errno

        import pyarrow.fs

        copy_files = pyarrow.fs.copy_files

        def copy_until_the_disk_is_full(source, destination, *args, **kwargs):
            if str(destination).rstrip("/").endswith(f"epoch_{epoch:04d}"):
                Path(destination).mkdir(parents=True, exist_ok=True)
                (Path(destination) / "model.keras").write_bytes(b"PK\x03\x04" + bytes(1000))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(destination))
            return copy_files(source, destination, *args, **kwargs)

        pyarrow.fs.copy_files = copy_until_the_disk_is_full
        fit_on_this_worker(loop_config)

    return loop


@pytest.fixture(scope="session")
def two_worker_run(ray_cluster, tmp_path_factory):
    """One 2-epoch, 2-worker training run on tiny synthetic data, shared by many tests."""
    from cifar_ray.config import PRESETS
    from cifar_ray.train import run

    root = tmp_path_factory.mktemp("train")
    cfg = PRESETS["smoke"].with_overrides({
        "num_workers": 2, "storage_path": str(root / "runs"), "name": "two-workers",
        "synthetic_size": 400, "val_fraction": 0.2, "epochs": 2, "schedule": "cosine",
        # per-worker batch, exercised on CPU: 2 x 32 = the smoke preset's global batch 64
        "per_worker_batch_size": 32})
    summary = run(cfg, train_loop=saving_weights_loop(str(root)))
    last = Path(summary["run_dir"]) / f"epoch_{cfg.train.epochs:04d}"
    return cfg, {**summary, "last_checkpoint": str(last)}, root


def alter_one_weight(checkpoint: Path) -> None:
    """Change one number of one weight in the checkpoint's model.keras, and save it again:
    still a valid Keras archive, with the metadata.json of the original."""
    import keras

    model = keras.models.load_model(checkpoint / "model.keras", compile=False, safe_mode=True)
    weights = model.get_weights()
    weights[0].flat[0] += 1.0
    model.set_weights(weights)
    model.save(checkpoint / "model.keras")


def unusual_images() -> dict[str, tuple[bytes, np.ndarray]]:
    """Images a user may upload that are not 8-bit RGB 32x32: {kind: (file bytes, the 32x32x3
    uint8 pixels they must decode to)}."""
    from PIL import Image

    def saved(img, fmt: str, **kwargs) -> bytes:
        buffer = io.BytesIO()
        img.save(buffer, format=fmt, **kwargs)
        return buffer.getvalue()

    image = make_images(1, seed=21)[0][0]
    gray = image[..., 0]
    sixteen_bit = gray.astype(np.uint16) * 256 + 3  # the top 8 bits are `gray`
    upright = image
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # EXIF 6: the viewer turns it 90° clockwise
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6
    frames = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (0, 255)]
    return {
        "grayscale png": (saved(Image.fromarray(gray), "PNG"), np.stack([gray] * 3, -1)),
        "16-bit grayscale png": (saved(Image.fromarray(sixteen_bit), "PNG"), np.stack([gray] * 3, -1)),
        "rgba png": (saved(Image.fromarray(np.dstack([image, np.full((32, 32), 255, np.uint8)])), "PNG"), image),
        "exif-rotated png": (saved(Image.fromarray(stored), "PNG", exif=exif), upright),
        "animated gif (first frame)": (saved(frames[0], "GIF", save_all=True, append_images=frames[1:]),
                                       np.zeros((32, 32, 3), np.uint8)),
        "1x1 png": (saved(Image.fromarray(np.full((1, 1, 3), 77, np.uint8)), "PNG"), np.full((32, 32, 3), 77, np.uint8)),
    }


@pytest.fixture(scope="session")
def lifecycle(two_worker_run, tmp_path_factory):
    """The registry test_registry and test_rollout share: the shared good run (version 1,
    the first: champion) and a worse model in the same store (version 2): the good one with
    its output layer zeroed, so that it gives every image the same answer, registered as
    `registry register` registers a checkpoint made elsewhere. (A second training run made
    it before, for 18 s of the suite; the end of a training run takes the same gate in
    two_worker_run, test_faults' reruns and test_tune's experiments.)"""
    from cifar_ray.checkpoint import load_checkpoint, save_checkpoint
    from cifar_ray.registry import register_checkpoint

    cfg, good, _ = two_worker_run
    model, metadata = load_checkpoint(Path(good["best_checkpoint"]), compile=False)
    *hidden, kernel, bias = model.get_weights()
    model.set_weights([*hidden, np.zeros_like(kernel), np.zeros_like(bias)])
    worse = tmp_path_factory.mktemp("worse") / "epoch_0001"
    save_checkpoint(worse, model, metadata)
    return cfg, good, {"registry": register_checkpoint(cfg, str(worse))}
