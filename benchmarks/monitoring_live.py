"""The monitoring loop, live: payload log, drift, feedback exported and scored.

    python benchmarks/monitoring_live.py --data ../shared/data/cifar10/train [--limit 20000] [--epochs 2]

Trains one notebook_cnn on the data folder less its last Parquet file (its end fits the
temperature and keeps the drift reference), serves that checkpoint as serve_config.yaml
does (HAProxy ingress, one replica) with the payload log at sample 1.0 and images on, then:

1. 1,200 held-out CIFAR-10 images (the last file), 8 clients: how many answered request ids
   are in the Parquet log after a flush (goal >= 95%), and /drift (goal: quiet);
2. feedback on 300 of those answers; `feedback export`; `evaluate` of the checkpoint on
   the export: its accuracy against the accuracy the feedback said (goal: equal);
3. 800 images of uniform noise, /drift asked every 50: when it alarms (goal: by 800).

Loops are bounded; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def ask_all(url: str, bodies: list[bytes], clients: int) -> list[dict | None]:
    """Each body posted once to /predict by `clients` concurrent clients; the answers in order."""
    import aiohttp

    answers: list[dict | None] = [None] * len(bodies)
    queue = list(range(len(bodies)))

    async def client(session):
        while queue:
            i = queue.pop()
            async with session.post(f"{url}/predict", data=bodies[i], headers={"content-type": "image/jpeg"}) as r:
                answers[i] = await r.json() if r.status == 200 else None

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return answers


def jpeg(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    from cifar_ray.serve import FAST_INGRESS_ENV

    os.environ.update(FAST_INGRESS_ENV)
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    import ray
    import requests
    from ray import serve

    from cifar_ray.config import Config
    from cifar_ray.evaluate import evaluate
    from cifar_ray.feedback import export
    from cifar_ray.serve import application, serve_config_from_args
    from cifar_ray.train import run
    from serve_load import deployment_options

    work = Path(tempfile.mkdtemp(prefix="cifar-ray-monitoring-"))
    try:
        parts = sorted(Path(args.data).glob("*.parquet"))
        (work / "train").mkdir()
        for part in parts[:-1]:
            os.symlink(part.resolve(), work / "train" / part.name)
        held = pq.read_table(parts[-1]).to_pylist()
        random.Random(0).shuffle(held)
        ray.init(logging_level="ERROR", log_to_driver=False)
        started = time.perf_counter()
        summary = run(Config().with_overrides({"model": "notebook_cnn", "data": str(work / "train"), "limit": args.limit,
                                               "epochs": args.epochs, "storage_path": str(work / "runs"),
                                               "name": "monitored", "promote": "never"}))
        print(f"trained notebook_cnn, {args.epochs} epochs on {args.limit} images: {time.perf_counter() - started:.0f} s")

        log = work / "payload_log"
        cfg, uri = serve_config_from_args({"checkpoint": summary["best_checkpoint"], "payload_log_path": str(log),
                                           "payload_log_sample": 1.0, "payload_log_images": True})
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        options = {**deployment_options(), "autoscaling_config": None, "num_replicas": 1}
        serve.run(application(cfg, uri, options), name="cifar", route_prefix="/")
        url = f"http://127.0.0.1:{args.port}"

        real = held[:1200]
        answers = asyncio.run(ask_all(url, [row["image"] for row in real], 8))
        ids = [a["request_id"] for a in answers if a]
        quiet = requests.get(f"{url}/drift", timeout=30).json()
        print(f"\n1,200 held-out CIFAR-10 images: {len(ids)} answered; /drift: {quiet}")

        correct = 0
        for row, a in zip(real[:300], answers[:300]):
            response = requests.post(f"{url}/feedback", json={"request_id": a["request_id"], "label": row["label"]},
                                     timeout=30)
            correct += response.json()["correct"]
        time.sleep(3.0)  # the payload log flushes every 2 s
        logged = set(ds.dataset(log, format="parquet", partitioning="hive").to_table(
            columns=["request_id"]).column("request_id").to_pylist())
        print(f"answered request ids in the payload log: {len(logged & set(ids))} of {len(ids)} "
              f"({len(logged & set(ids)) / len(ids):.3f})")
        counts = export(str(log), str(work / "feedback"))
        scored = evaluate(summary["best_checkpoint"], str(work / "feedback"))
        print(f"feedback on 300 answers: live accuracy {correct / 300:.4f}; export: {counts}; evaluate on the "
              f"export: accuracy {scored['accuracy']:.4f} on {scored['examples']} images")

        rng = np.random.default_rng(0)
        noise = [jpeg(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(800)]
        alarm_at = None
        for sent in range(50, 801, 50):
            asyncio.run(ask_all(url, noise[sent - 50:sent], 8))
            drift = requests.get(f"{url}/drift", timeout=30).json()
            if drift["drifting"] and alarm_at is None:
                alarm_at = sent
        print(f"800 noise images: /drift alarmed after {alarm_at} of them; at the end: {drift}")
        serve.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
