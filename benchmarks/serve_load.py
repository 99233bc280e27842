"""Load benchmark for the Serve endpoint: throughput and latency, batching on vs off, autoscaling.

    python benchmarks/serve_load.py [--checkpoint CKPT] [--seconds 8] [--levels 1,8,32]
                                    [--sustained-seconds 60] [--kill-seconds 30]

Deploys cifar_ray.serve with the deployment options of serve_config.yaml on a local Ray,
then drives it from this process over loopback (127.0.0.1 only) with a bounded asyncio
client posting one JPEG per request:

1. For each concurrency level, batching on (user_config max_batch_size from the YAML)
   and off (max_batch_size 1), interleaved on the same deployment: on, off, on, off.
   Only user_config changes between runs, so Serve applies it live through reconfigure.
2. Sustained load (60 s by default) at the highest level while replica counts are
   sampled, then idle, to show the autoscaler adding a replica and removing it again.
3. A replica killed under load: two fixed replicas, one SIGKILLed (its PID from Ray's
   state API) a third of the way in; failed requests, when Serve had replaced it, and
   throughput per 2 s window before and after.

Every loop is bounded by time and by request count; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
MAX_REQUESTS_PER_RUN = 100_000


def sample_jpeg() -> bytes:
    """One real CIFAR-10 JPEG when ../shared has it, else a generated image."""
    import pyarrow.parquet as pq
    from PIL import Image

    shared = ROOT.parent / "shared/data/cifar10/train/part-000.parquet"
    if shared.is_file():
        return pq.read_table(shared, columns=["image"]).column("image")[0].as_py()
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


async def load(url: str, body: bytes, concurrency: int, seconds: float) -> dict:
    """`concurrency` clients posting back to back for `seconds`; latency percentiles in ms.

    `events` lists (seconds since start, succeeded) for every request, for timelines.
    """
    import aiohttp

    latencies: list[float] = []
    events: list[tuple[float, bool]] = []
    errors = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def client(session):
        nonlocal errors
        while time.perf_counter() < deadline and len(events) < MAX_REQUESTS_PER_RUN:
            start = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"content-type": "image/jpeg"}) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            events.append((time.perf_counter() - started, ok))
            if ok:
                latencies.append((time.perf_counter() - start) * 1000)
            else:
                errors += 1

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    q = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    return {"rps": len(latencies) / elapsed, "p50": q[0], "p95": q[1], "p99": q[2], "errors": errors,
            "requests": len(events), "events": events}


def replica_pids(app: str, address: str | None = None) -> set[int]:
    """PIDs of the app's live Classifier replicas, from Ray's state API."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("class_name", "=", f"ServeReplica:{app}:Classifier"),
                                  ("state", "=", "ALIVE")], detail=True)
    return {a.pid for a in actors if a.pid}


async def load_with_replica_kill(url: str, body: bytes, concurrency: int, seconds: float,
                                 app: str, kill_at: float, address: str | None = None) -> dict:
    """Load for `seconds`; SIGKILL one replica after `kill_at` s; note when it was replaced."""
    task = asyncio.create_task(load(url, body, concurrency, seconds))
    await asyncio.sleep(kill_at)
    before = replica_pids(app, address)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    killed = time.perf_counter()
    replaced_after = None
    while not task.done() or replaced_after is None:
        if replaced_after is None and replica_pids(app, address) - before \
                and running_replicas(app) == len(before):
            replaced_after = time.perf_counter() - killed
        if time.perf_counter() - killed > 120:  # bounded: report it as never replaced
            break
        await asyncio.sleep(0.5)
    result = await task
    return {**result, "killed_pid": victim, "killed_at_s": kill_at, "replaced_after_s": replaced_after}


def throughput_windows(events: list[tuple[float, bool]], width: float = 2.0) -> list[tuple[float, int, int]]:
    """(window start s, succeeded, failed) per `width`-second window."""
    if not events:
        return []
    n = int(max(t for t, _ in events) // width) + 1
    ok, failed = [0] * n, [0] * n
    for t, success in events:
        (ok if success else failed)[int(t // width)] += 1
    return [(i * width, ok[i], failed[i]) for i in range(n)]


def deployment_options() -> dict:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    options = dict(config["applications"][0]["deployments"][0])
    options.pop("name")
    return options


def deploy(checkpoint: str, options: dict, max_batch_size: int, app: str = "cifar") -> None:
    from ray import serve

    from cifar_ray.serve import Classifier, serve_config_from_args

    cfg, uri = serve_config_from_args({"checkpoint": checkpoint, "storage_path": str(ROOT / "runs")})
    user_config = {**options["user_config"], "max_batch_size": max_batch_size}
    serve.run(Classifier.options(**{**options, "user_config": user_config}).bind(asdict(cfg), uri),
              name=app, route_prefix="/")


def running_replicas(app: str = "cifar") -> int:
    from ray import serve

    status = serve.status().applications[app].deployments["Classifier"]
    return status.replica_states.get("RUNNING", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="models:/cifar10-classifier@champion",
                        help="a checkpoint folder, or a registry URI in ./runs/mlflow.db (default: %(default)s)")
    parser.add_argument("--levels", default="1,8,32", help="client concurrency levels")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measured run")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--sustained-seconds", type=float, default=60.0, help="autoscaling phase")
    parser.add_argument("--kill-seconds", type=float, default=30.0, help="replica-kill phase")
    args = parser.parse_args()

    import ray
    from ray import serve

    ray.init(logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}/predict"
    body = sample_jpeg()
    options = deployment_options()
    on_size = options["user_config"]["max_batch_size"]
    # Pin one replica for the batching comparison; autoscaling is measured afterwards.
    fixed = {**options, "autoscaling_config": None, "num_replicas": 1}
    levels = [int(x) for x in args.levels.split(",")]

    print(f"checkpoint {args.checkpoint}, {len(body)}-byte JPEG, {args.seconds:g} s per run, 1 replica")
    print(f"{'clients':>7} {'batching':>9} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}")
    medians = {}
    for level in levels:
        runs = {True: [], False: []}
        for batching in (True, False, True, False):
            deploy(args.checkpoint, fixed, on_size if batching else 1)
            asyncio.run(load(url, body, level, 1.0))  # warm-up, not measured
            result = asyncio.run(load(url, body, level, args.seconds))
            runs[batching].append(result)
            print(f"{level:>7} {('on' if batching else 'off'):>9} {result['rps']:>8.1f} {result['p50']:>8.1f} "
                  f"{result['p95']:>8.1f} {result['p99']:>8.1f} {result['errors']:>6}")
        medians[level] = {b: statistics.median(r["rps"] for r in runs[b]) for b in runs}
    print("\nmedian req/s, batching on / off:")
    for level, m in medians.items():
        print(f"  {level:>3} clients: {m[True]:.1f} / {m[False]:.1f} = {m[True] / m[False]:.2f}x")

    top = max(levels)
    deploy(args.checkpoint, options, on_size)  # serve_config.yaml's autoscaling
    print(f"\nautoscaling ({options['autoscaling_config']}):")
    timeline = []

    async def sustained_then_idle():
        start = time.perf_counter()
        task = asyncio.create_task(load(url, body, top, args.sustained_seconds))
        while not task.done():
            timeline.append((time.perf_counter() - start, "load", running_replicas()))
            await asyncio.sleep(2)
        result = task.result()
        for _ in range(25):  # up to 50 s idle
            timeline.append((time.perf_counter() - start, "idle", running_replicas()))
            if timeline[-1][2] <= options["autoscaling_config"]["min_replicas"] and len(timeline) > 20:
                break
            await asyncio.sleep(2)
        return result

    result = asyncio.run(sustained_then_idle())
    print(f"  {top} clients for {args.sustained_seconds:g} s: {result['rps']:.1f} req/s, p50 {result['p50']:.1f} ms, "
          f"p99 {result['p99']:.1f} ms, {result['errors']} errors")
    print("  t (s)  phase  running replicas")
    for t, phase, replicas in timeline:
        print(f"  {t:5.0f}  {phase:>5}  {replicas}")
    print(f"  peak {max(r for _, _, r in timeline)} replicas under load, {timeline[-1][2]} after idling")

    two = {**options, "autoscaling_config": None, "num_replicas": 2}
    deploy(args.checkpoint, two, on_size)
    asyncio.run(load(url, body, top, 2.0))  # warm-up
    kill_at = args.kill_seconds / 3
    result = asyncio.run(load_with_replica_kill(url, body, top, args.kill_seconds, "cifar", kill_at))
    share = 100 * result["errors"] / max(1, result["requests"])
    replaced = result["replaced_after_s"]
    print(f"\nreplica kill: 2 replicas, {top} clients for {args.kill_seconds:g} s, replica pid "
          f"{result['killed_pid']} SIGKILLed at {kill_at:.0f} s")
    print(f"  {result['requests']} requests, {result['errors']} failed ({share:.2f}%), "
          f"replaced after {'never' if replaced is None else f'{replaced:.1f} s'}")
    print("  t (s)   ok  failed")
    for t, ok, failed in throughput_windows(result["events"]):
        print(f"  {t:5.0f} {ok:>4} {failed:>7}")
    serve.shutdown()


if __name__ == "__main__":
    main()
