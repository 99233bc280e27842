"""A live rollout under 32 labelled clients: a bad candidate rolled back, a better one promoted.

    python benchmarks/rollout_live.py --data ../shared/data/cifar10/train \
        [--clients 32] [--percent 10] [--limit 20000] [--epochs 1,4] [--min-labels 200]

Trains three notebook_cnn versions on the data folder less its last Parquet file, into a
throwaway MLflow store: the champion (the first --epochs), a candidate trained on the same
images with their labels shuffled, and a candidate trained longer (the second --epochs).
Serves the champion as serve_config.yaml does (HAProxy ingress, its deployment options).
Then --clients loopback clients each post a JPEG from the held-out last file, back to back,
and post its true label to /feedback after every answer, while:

1. `registry canary SHUFFLED --percent P`: must be rolled back automatically, on feedback;
2. `registry canary LONGER --percent P`: must be promoted automatically.

Reported per rollout: the decision and its reason, seconds from `registry canary` to the
decision, the candidate's share of the answers while it took traffic (goal: within 0.15
of P/100), answers from the version that lost the alias to requests sent more than 2 s
after the move (goal 0, the move seen by polling the store every 0.1 s), and over the run
failed requests and failed feedback calls (goal 0). Loops are bounded; nothing leaves the
machine.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def split_data(data: Path, work: Path) -> tuple[Path, Path, list[tuple[bytes, int]]]:
    """(training folder, the same with shuffled labels, held-out (jpeg, label) pairs)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(data.glob("*.parquet"))
    train, shuffled = work / "train", work / "shuffled"
    train.mkdir()
    shuffled.mkdir()
    rng = np.random.default_rng(0)
    for part in parts[:-1]:
        os.symlink(part.resolve(), train / part.name)
        table = pq.read_table(part)
        labels = rng.permutation(table.column("label").to_numpy())
        pq.write_table(table.set_column(1, "label", pa.array(labels, pa.int64())), shuffled / part.name)
    held = pq.read_table(parts[-1]).to_pylist()
    return train, shuffled, [(row["image"], int(row["label"])) for row in held]


def train_versions(train: Path, shuffled: Path, store: Path, limit: int, epochs: tuple[int, int]) -> dict:
    from cifar_ray.config import Config
    from cifar_ray.train import run

    base = Config().with_overrides({"model": "notebook_cnn", "storage_path": str(store), "limit": limit,
                                    "epochs": epochs[0], "augment": "crop_flip"})
    versions = {}
    for name, overrides in (("champion", {"data": str(train)}),
                            ("shuffled", {"data": str(shuffled), "promote": "never"}),
                            ("longer", {"data": str(train), "epochs": epochs[1], "promote": "never"})):
        started = time.perf_counter()
        summary = run(base.with_overrides({**overrides, "name": name}))
        versions[name] = summary["registry"]["version"]
        print(f"  {name}: version {versions[name]}, evaluation accuracy "
              f"{summary['registry']['eval_accuracy']:.3f}, {time.perf_counter() - started:.0f} s", flush=True)
    return versions


class Clients:
    """Clients posting held-out JPEGs and their labels; every answer recorded as (sent s,
    answered s, model_version or None), every feedback call as ok or not."""

    def __init__(self, url: str, held: list[tuple[bytes, int]], clients: int):
        self.url, self.held, self.clients = url, held, clients
        self.answers: list[tuple[float, float, str | None]] = []
        self.feedback_failed = 0
        self.started = time.perf_counter()
        self.stop = False

    def now(self) -> float:
        return time.perf_counter() - self.started

    async def run(self) -> None:
        import aiohttp

        async def client(session, rng):
            while not self.stop and len(self.answers) < 2_000_000:
                jpeg, label = self.held[rng.randrange(len(self.held))]
                sent = self.now()
                answer = None
                try:
                    async with session.post(f"{self.url}/predict", data=jpeg,
                                            headers={"content-type": "image/jpeg"}) as r:
                        answer = await r.json() if r.status == 200 else None
                    if answer:
                        async with session.post(f"{self.url}/feedback", json={"request_id": answer["request_id"],
                                                                              "label": label}) as r:
                            self.feedback_failed += r.status != 200
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    pass
                self.answers.append((sent, self.now(), answer["model_version"] if answer else None))

        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout,
                                         connector=aiohttp.TCPConnector(limit=self.clients)) as session:
            await asyncio.gather(*(client(session, random.Random(i)) for i in range(self.clients)))


async def rollout(clients: Clients, registry, version: str, percent: float, rule: dict, timeout_s: float) -> dict:
    """Start a canary of `version`, wait for its decision, then 5 s more; what happened."""
    from cifar_ray.canary import Rule

    champion = str(registry.champion().version)
    started = clients.now()
    await asyncio.to_thread(registry.start_canary, version, percent, False, {**vars(Rule()), **rule})
    while clients.now() - started < timeout_s:
        await asyncio.sleep(0.1)
        if await asyncio.to_thread(registry.canary) is None:
            break
    decided = clients.now()
    await asyncio.sleep(5.0)
    tags = (await asyncio.to_thread(registry.version, version)).tags
    winner = str((await asyncio.to_thread(registry.champion)).version)
    loser = champion if winner == version else version
    during = [v for sent, _, v in clients.answers if started + 1.0 <= sent < decided and v]
    late = [v for sent, _, v in clients.answers if sent > decided + 2.0 and v == loser]
    return {"decision": tags.get("canary_decision", "none within the timeout"), "seconds": decided - started,
            "share": during.count(version) / max(1, len(during)), "answers_during": len(during),
            "late_answers_from_loser": len(late), "champion_now": winner}


async def run_rollouts(url, held, args, registry, versions) -> None:
    clients = Clients(url, held, args.clients)
    load = asyncio.create_task(clients.run())
    await asyncio.sleep(3.0)
    rule = {"min_labels": args.min_labels}
    results = []
    for name in ("shuffled", "longer"):
        print(f"\ncanary of the {name} candidate (version {versions[name]}) at {args.percent:g}%", flush=True)
        result = await rollout(clients, registry, versions[name], args.percent, rule, args.timeout_s)
        results.append((name, result))
        print(f"  {result['decision']}", flush=True)
        print(f"  decided after {result['seconds']:.1f} s; candidate share {result['share']:.3f} of "
              f"{result['answers_during']} answers; answers from the losing version to requests sent > 2 s "
              f"after the move: {result['late_answers_from_loser']}; champion now version "
              f"{result['champion_now']}", flush=True)
    clients.stop = True
    await load
    failed = sum(v is None for _, _, v in clients.answers)
    elapsed = clients.now()
    print(f"\n{len(clients.answers)} requests in {elapsed:.0f} s ({len(clients.answers) / elapsed:.0f}/s, each followed "
          f"by its feedback), failed {failed}, failed feedback calls {clients.feedback_failed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Parquet folder of the training schema (image, label)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--percent", type=float, default=10.0)
    parser.add_argument("--limit", type=int, default=20000, help="training images per version")
    parser.add_argument("--epochs", default="1,4", help="the champion's and the longer candidate's")
    parser.add_argument("--min-labels", type=int, default=200)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="longest wait for one decision")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    from cifar_ray.serve import FAST_INGRESS_ENV

    os.environ.update(FAST_INGRESS_ENV)  # read when Ray starts, below
    import ray
    from ray import serve

    from cifar_ray.model_registry import Registry
    from cifar_ray.serve import application, serve_config_from_args
    from serve_load import deployment_options

    work = Path(tempfile.mkdtemp(prefix="cifar-ray-rollout-"))
    try:
        train, shuffled, held = split_data(Path(args.data), work)
        ray.init(logging_level="ERROR", log_to_driver=False)
        print(f"training three versions on {args.limit} images each ({len(held)} held out for the clients)")
        epochs = tuple(int(e) for e in args.epochs.split(","))
        versions = train_versions(train, shuffled, work / "runs", args.limit, epochs)
        cfg, uri = serve_config_from_args({"storage_path": str(work / "runs")})
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(application(cfg, uri, deployment_options()), name="cifar", route_prefix="/")
        print(f"serving version {versions['champion']} to {args.clients} clients", flush=True)
        asyncio.run(run_rollouts(f"http://127.0.0.1:{args.port}", held, args, Registry(uri), versions))
        serve.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
