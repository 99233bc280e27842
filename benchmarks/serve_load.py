"""Load benchmark for the Serve endpoint: Serve against a plain uvicorn peer and the model alone,
batching on vs off, overload, autoscaling, a replica killed under load.

    python benchmarks/serve_load.py --checkpoint runs/NAME/epoch_0002 [--ingress haproxy]
        [--seconds 8] [--levels 1,8,32] [--sustained-seconds 60] [--kill-seconds 30]
    # only the cost of test-time augmentation: user_config tta true vs false, interleaved
    python benchmarks/serve_load.py --checkpoint runs/NAME/epoch_0010 --tta-cost --levels 1,32

Deploys cifar_ray.serve with the deployment options of serve_config.yaml on a local Ray,
then drives it from this process over loopback (127.0.0.1 only) with a bounded asyncio
client posting one JPEG per request:

0. The model alone, in this process: one image per call (latency), and the batch size of
   serve_config.yaml back to back (images/s): the limit any server of it can reach here.
1. For each concurrency level, interleaved on, off, peer, on, off, peer: Serve with
   batching (user_config from the YAML), Serve without (max_batch_size 1, switched live
   through reconfigure), and benchmarks/plain_server.py (FastAPI + uvicorn, no Ray, no
   batching) on the same checkpoint, images and client.
2. Overload: 8x the top level for a few seconds; excess requests must get a fast 503 with
   Retry-After (max_queued_requests), the rest their answer.
3. Sustained load (60 s by default) at the top level while replica counts are sampled,
   then idle, to show the autoscaler adding a replica and removing it again.
4. A replica killed under load: two fixed replicas, one SIGKILLed (its PID from Ray's
   state API) a third of the way in; failed requests, when Serve had replaced it, and
   throughput per 2 s window before and after.

--ingress picks what Ray puts in front of the replicas (serve.py FAST_INGRESS_ENV):
Ray Serve's HAProxy ingress (default) or its Python proxy actor. Every loop is bounded by
time and by request count; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import statistics
import subprocess
import sys
import time
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


async def load(url: str, body: bytes, concurrency: int, seconds: float, polite: bool = False) -> dict:
    """`concurrency` clients posting back to back for `seconds`; latency percentiles in ms.
    A `polite` client waits out the Retry-After of a 503 before its next request.

    `errors` counts failed requests, `rejected` the 503s of backpressure (with their
    Retry-After header), neither in the latencies. `events` lists (seconds since start,
    succeeded) for every request, for timelines.
    """
    import aiohttp

    latencies: list[float] = []
    events: list[tuple[float, bool]] = []
    errors = rejected = 0
    retry_after: set[str] = set()
    started = time.perf_counter()
    deadline = started + seconds

    async def client(session):
        nonlocal errors, rejected
        while time.perf_counter() < deadline and len(events) < MAX_REQUESTS_PER_RUN:
            start = time.perf_counter()
            status = 0
            try:
                async with session.post(url, data=body, headers={"content-type": "image/jpeg"}) as r:
                    await r.read()
                    status = r.status
                    if status == 503:
                        retry_after.add(r.headers.get("retry-after", "none"))
                        if polite:
                            await asyncio.sleep(min(float(r.headers.get("retry-after") or 1), deadline - time.perf_counter()))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            events.append((time.perf_counter() - started, status == 200))
            if status == 200:
                latencies.append((time.perf_counter() - start) * 1000)
            elif status == 503:
                rejected += 1
            else:
                errors += 1

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    q = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    return {"rps": len(latencies) / elapsed, "p50": q[0], "p95": q[1], "p99": q[2], "errors": errors + rejected,
            "rejected": rejected, "retry_after": sorted(retry_after), "requests": len(events), "events": events}


def model_alone(checkpoint: str, batch_size: int, seconds: float = 3.0) -> dict:
    """The model in this process, as the replica calls it: ms per 1-image call (median of 200,
    with the JPEG decode), and images/s at `batch_size` back to back for `seconds`."""
    from cifar_ray.images import decode_image
    from cifar_ray.live_model import load as load_model

    model = load_model(Path(checkpoint), version="bench")
    jpeg = sample_jpeg()
    times = []
    for _ in range(200):
        start = time.perf_counter()
        model.predict(decode_image(jpeg, resize=True)[None])
        times.append((time.perf_counter() - start) * 1000)
    batch = np.repeat(decode_image(jpeg, resize=True)[None], batch_size, axis=0)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.predict(batch)
        images += batch_size
    return {"one_image_ms": statistics.median(times), "images_per_s": images / (time.perf_counter() - start)}


def start_peer(checkpoint: str, port: int) -> subprocess.Popen:
    """benchmarks/plain_server.py in its own process, once it answers /healthz (bounded)."""
    import requests

    peer = subprocess.Popen([sys.executable, str(ROOT / "benchmarks/plain_server.py"), "--checkpoint", checkpoint,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok:
                return peer
        except requests.ConnectionError:
            time.sleep(0.5)
    peer.kill()
    raise RuntimeError("the plain uvicorn peer did not start within 120 s")


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


def deploy(checkpoint: str, options: dict, max_batch_size: int, app: str = "cifar", tta=None) -> None:
    from ray import serve

    from cifar_ray.serve import application, serve_config_from_args

    cfg, uri = serve_config_from_args({"checkpoint": checkpoint, "storage_path": str(ROOT / "runs")})
    user_config = {**options["user_config"], "max_batch_size": max_batch_size, "tta": tta}
    serve.run(application(cfg, uri, {**options, "user_config": user_config}), name=app, route_prefix="/")


def running_replicas(app: str = "cifar") -> int:
    from ray import serve

    status = serve.status().applications[app].deployments["Classifier"]
    return status.replica_states.get("RUNNING", 0)


def print_run(level: int, server: str, r: dict) -> None:
    print(f"{level:>7} {server:>10} {r['rps']:>8.1f} {r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f} "
          f"{r['errors']:>6}", flush=True)


def compare_tta(args, url: str, body: bytes, options: dict, batch: int, levels: list[int]) -> None:
    """Serve with test-time augmentation (6 views per image) on and off, interleaved."""
    print(f"{'clients':>7} {'server':>10} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}")
    runs: dict[tuple[int, str], list[dict]] = {}
    for level in levels:
        for server in ("tta on", "tta off") * 2:
            deploy(args.checkpoint, options, batch, tta=server == "tta on")
            asyncio.run(load(url, body, level, 1.0))  # warm-up, not measured
            result = asyncio.run(load(url, body, level, args.seconds))
            runs.setdefault((level, server), []).append(result)
            print_run(level, server, result)
    print("\nmedians of the two runs")
    for level in levels:
        on, off = ({m: statistics.median(r[m] for r in runs[(level, s)]) for m in ("rps", "p50", "p99")}
                   for s in ("tta on", "tta off"))
        print(f"  {level:>3} clients: TTA on {on['rps']:.0f} req/s (p50 {on['p50']:.1f} ms, p99 {on['p99']:.1f} ms), "
              f"off {off['rps']:.0f} (p50 {off['p50']:.1f}, p99 {off['p99']:.1f}): on / off {on['rps'] / off['rps']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a local checkpoint folder (runs/NAME/epoch_NNNN)")
    parser.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy",
                        help="Ray Serve's HAProxy ingress or its Python proxy actor (default: %(default)s)")
    parser.add_argument("--levels", default="1,8,32", help="client concurrency levels")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measured run")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--peer-port", type=int, default=8001)
    parser.add_argument("--sustained-seconds", type=float, default=60.0, help="autoscaling phase")
    parser.add_argument("--kill-seconds", type=float, default=30.0, help="replica-kill phase")
    parser.add_argument("--tta-cost", action="store_true", help="only Serve with TTA on vs off, then stop")
    args = parser.parse_args()

    import ray
    from ray import serve

    from cifar_ray.serve import FAST_INGRESS_ENV

    if args.ingress == "haproxy":
        os.environ.update(FAST_INGRESS_ENV)  # read by Ray when it starts, below
    url = f"http://127.0.0.1:{args.port}/predict"
    body = sample_jpeg()
    options = deployment_options()
    on_size = options["user_config"]["max_batch_size"]
    levels = [int(x) for x in args.levels.split(",")]
    top = max(levels)

    alone = model_alone(args.checkpoint, on_size)
    print(f"checkpoint {args.checkpoint}, {len(body)}-byte JPEG, {args.seconds:g} s per run, 1 replica, "
          f"{args.ingress} ingress")
    print(f"model alone in this process: {alone['one_image_ms']:.2f} ms per 1-image call (with decode), "
          f"{alone['images_per_s']:.0f} images/s at batch {on_size}\n")

    ray.init(logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    # Pin one replica for the comparison; autoscaling is measured afterwards.
    fixed = {**options, "autoscaling_config": None, "num_replicas": 1}
    if args.tta_cost:
        return compare_tta(args, url, body, fixed, on_size, levels)
    peer = start_peer(args.checkpoint, args.peer_port)
    peer_url = f"http://127.0.0.1:{args.peer_port}/predict"
    print(f"{'clients':>7} {'server':>10} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}")
    runs: dict[tuple[int, str], list[dict]] = {}
    try:
        for level in levels:
            for server in ("serve on", "serve off", "uvicorn") * 2:
                if server != "uvicorn":
                    deploy(args.checkpoint, fixed, on_size if server == "serve on" else 1)
                target = peer_url if server == "uvicorn" else url
                asyncio.run(load(target, body, level, 1.0))  # warm-up, not measured
                result = asyncio.run(load(target, body, level, args.seconds))
                runs.setdefault((level, server), []).append(result)
                print_run(level, server, result)
    finally:
        peer.kill()
    median = {key: {m: statistics.median(r[m] for r in rs) for m in ("rps", "p50", "p99")}
              for key, rs in runs.items()}
    print("\nmedians of the two runs; Serve is batching on")
    for level in levels:
        on, off, plain = (median[(level, s)] for s in ("serve on", "serve off", "uvicorn"))
        print(f"  {level:>3} clients: Serve {on['rps']:.0f} req/s (p50 {on['p50']:.1f} ms, p99 {on['p99']:.1f} ms), "
              f"uvicorn {plain['rps']:.0f}: Serve / uvicorn {on['rps'] / plain['rps']:.2f}x, "
              f"batching on / off {on['rps'] / off['rps']:.2f}x, "
              f"{on['rps'] / alone['images_per_s']:.0%} of the model alone")
    lone = median[(min(levels), "serve on")]
    print(f"  {min(levels)} client(s): Serve p50 {lone['p50']:.1f} ms = model alone {alone['one_image_ms']:.1f} ms "
          f"+ {lone['p50'] - alone['one_image_ms']:.1f} ms")
    failed = sum(r["errors"] for rs in runs.values() for r in rs)
    print(f"  failed requests in all runs above: {failed}")

    deploy(args.checkpoint, fixed, on_size)
    overload = asyncio.run(load(url, body, 8 * top, 5.0, polite=True))
    print(f"\noverload: {8 * top} clients that honour Retry-After, for 5 s on 1 replica (max_ongoing_requests "
          f"{options['max_ongoing_requests']}, max_queued_requests {options.get('max_queued_requests', -1)})")
    print(f"  {overload['requests']} requests: {overload['requests'] - overload['errors']} answered "
          f"(p50 {overload['p50']:.1f} ms, p99 {overload['p99']:.1f} ms), {overload['rejected']} got 503 with "
          f"Retry-After {overload['retry_after']}, {overload['errors'] - overload['rejected']} failed otherwise")

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
