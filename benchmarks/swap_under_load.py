"""Hot swap under load: the champion moves twice while 32 clients keep asking.

    python benchmarks/swap_under_load.py --checkpoints runs/A/epoch_0002 runs/B/epoch_0002 \
        [--clients 32] [--seconds 40] [--moves-at 10,25] [--poll-interval-s 0.5]

Registers the two checkpoints as versions 1 and 2 of cifar10-classifier in a throwaway
MLflow store (no gate: this measures serving, not judging), makes 1 champion, and serves
`models:/cifar10-classifier@champion` with serve_config.yaml's deployment options on a
local Ray. Then `--clients` loopback clients post one JPEG each, back to back, while the
alias moves 1 -> 2 and later back 2 -> 1 (as `registry promote` and `registry rollback` do).

Reported: failed requests (goal 0), and for each move the seconds until the first answer
from the new version and until every answer carries it (the last old-version answer to a
request sent after the move and before the next one). Every loop is bounded in time; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import deployment_options, sample_jpeg  # noqa: E402


async def load_recording_versions(url: str, body: bytes, clients: int, seconds: float) -> list[tuple]:
    """(sent s, answered s, ok, model_version) of every request, times since the start."""
    import aiohttp

    started = time.perf_counter()
    deadline = started + seconds
    records: list[tuple] = []

    async def client(session):
        while time.perf_counter() < deadline and len(records) < 200_000:
            sent = time.perf_counter() - started
            try:
                async with session.post(url, data=body, headers={"content-type": "image/jpeg"}) as r:
                    answer = await r.json() if r.status == 200 else None
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                answer = None
            version = answer.get("model_version") if answer else None
            records.append((sent, time.perf_counter() - started, version is not None, version))

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return records


async def run_with_moves(url, body, clients, seconds, moves: list[tuple[float, str]], registry) -> list[tuple]:
    """Load for `seconds`; at each (time, version) of `moves`, move the champion alias."""
    task = asyncio.create_task(load_recording_versions(url, body, clients, seconds))
    started = time.perf_counter()
    for at, version in moves:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - started)))
        await asyncio.to_thread(registry.set_champion, version)
        print(f"  t={time.perf_counter() - started:5.1f} s: champion -> version {version}", flush=True)
    return await task


def switch_times(records: list[tuple], at: float, until: float, old: str, new: str) -> tuple:
    """(s until the first `new` answer, s until the last `old` answer) among requests sent
    between this move (`at`) and the next (`until`)."""
    window = [r for r in records if at <= r[0] < until]
    first_new = min((r[1] for r in window if r[3] == new), default=None)
    last_old = max((r[1] for r in window if r[3] == old), default=at)
    return (first_new - at if first_new is not None else None), last_old - at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs=2, required=True, metavar=("V1", "V2"))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--moves-at", default="10,25", help="seconds into the load of the two moves")
    parser.add_argument("--poll-interval-s", type=float, default=0.5, help="the Rollout deployment's registry poll")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    import ray
    from ray import serve

    from cifar_ray.model_registry import Registry
    from cifar_ray.serve import application, serve_config_from_args

    store = tempfile.mkdtemp(prefix="cifar-ray-swap-")
    registry = Registry(f"sqlite:///{store}/mlflow.db")
    registry.ensure_model()
    for checkpoint in args.checkpoints:
        registry.client.create_model_version(registry.name, source=Path(checkpoint).resolve().as_uri())
    registry.set_champion("1")

    ray.init(logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    options = {**deployment_options(), "autoscaling_config": None, "num_replicas": 1}
    cfg, uri = serve_config_from_args({"tracking_uri": registry.uri, "poll_interval_s": args.poll_interval_s})
    serve.run(application(cfg, uri, options), name="cifar", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}/predict"
    body = sample_jpeg()
    asyncio.run(load_recording_versions(url, body, args.clients, 2.0))  # warm-up, not measured

    first, second = (float(x) for x in args.moves_at.split(","))
    print(f"{args.clients} clients for {args.seconds:g} s, 1 replica, poll every {args.poll_interval_s:g} s")
    records = asyncio.run(run_with_moves(url, body, args.clients, args.seconds,
                                         [(first, "2"), (second, "1")], registry))
    failed = sum(not ok for _, _, ok, _ in records)
    latencies = np.array([(done - sent) * 1000 for sent, done, ok, _ in records if ok])
    print(f"\nrequests {len(records)}, failed {failed}, {len(latencies) / args.seconds:.1f} req/s, "
          f"p50 {np.percentile(latencies, 50):.1f} ms, p99 {np.percentile(latencies, 99):.1f} ms")
    for at, until, old, new in ((first, second, "1", "2"), (second, args.seconds, "2", "1")):
        first_new, all_new = switch_times(records, at, until, old, new)
        shown = f"{first_new:.1f}" if first_new is not None else "never"
        print(f"  move {old} -> {new} at {at:g} s: first answer from {new} after {shown} s, "
              f"every answer from {new} after {all_new:.1f} s")
    serve.shutdown()


if __name__ == "__main__":
    main()
