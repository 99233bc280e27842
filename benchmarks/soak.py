"""Soak under autoscaling: load ramps 1 -> 64 clients and back while Serve scales, one
replica is killed mid-way, and replica memory is watched.

    python benchmarks/soak.py --checkpoint runs/NAME/epoch_0002 [--minutes 10] [--peak 64]

Deploys cifar_ray.serve with serve_config.yaml's deployment options (its autoscaling
included) on a local Ray behind Ray Serve's HAProxy ingress, then drives it from this
process over loopback: the client count steps up 1, 2, 4, ... --peak, holds the peak, and
steps back down to 1, each step the same length, --minutes in all. Halfway through the
peak, one replica is SIGKILLed. Every 2 s it records the running replicas and each
replica's resident memory.

Reported, against issue 18's goals:
- failed requests outside the kill (goal 0: scale-down drains in-flight requests), and
  within it, from the kill until Serve runs as many replicas again (goal <= 0.5% of all
  requests, recovered within 30 s);
- p99 over the whole soak against the p99 of the first half of the peak's second step (the
  steady state at the heaviest load, replicas scaled up, before the kill) (goal within 2x);
- each replica's memory growth from its first sample after warm-up to its last (goal <= 5%
  for the replicas that lived through most of the soak).
Every loop is bounded in time; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import deploy, deployment_options, replica_pids, running_replicas, sample_jpeg  # noqa: E402


def ramp(peak: int) -> list[int]:
    """1, 2, 4, ..., peak, peak, ..., 4, 2, 1: client counts of the soak's equal steps."""
    up = [2 ** i for i in range(int(np.log2(peak)) + 1)]
    return up + [peak] + up[::-1]


async def client_loop(session, url: str, body: bytes, until: float, started: float, records: list) -> None:
    """Post back to back until `until`: (sent s, latency ms, ok) for each request."""
    import aiohttp

    while time.perf_counter() < until and len(records) < 2_000_000:
        sent = time.perf_counter()
        ok = False
        try:
            async with session.post(url, data=body, headers={"content-type": "image/jpeg"}) as r:
                await r.read()
                ok = r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        records.append((sent - started, (time.perf_counter() - sent) * 1000, ok))


async def soak(url: str, body: bytes, steps: list[int], step_s: float, kill_at: float) -> dict:
    """Run the ramp; sample replicas and memory every 2 s; kill one replica at `kill_at` s."""
    import aiohttp
    import psutil

    records: list[tuple] = []
    samples: list[tuple] = []  # (s, running replicas, {pid: RSS bytes})
    kill: dict = {}
    started = time.perf_counter()
    end = started + step_s * len(steps)

    async def watch():
        while time.perf_counter() < end:
            now = time.perf_counter() - started
            pids = await asyncio.to_thread(replica_pids, "cifar")
            rss = {}
            for pid in pids:
                try:
                    rss[pid] = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    pass
            running = await asyncio.to_thread(running_replicas)
            samples.append((now, running, rss))
            if not kill and now >= kill_at and len(pids) > 1:
                victim = min(pids)
                os.kill(victim, signal.SIGKILL)
                kill.update(at=now, pid=victim, pids=pids)
                print(f"  t={now:5.0f} s: killed replica {victim} of {len(pids)}", flush=True)
            if kill and "recovered" not in kill and pids - kill["pids"] and len(pids) >= len(kill["pids"]) \
                    and running >= len(kill["pids"]):
                kill["recovered"] = now  # a new replica runs in its place
            await asyncio.sleep(2)

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=max(steps))) as session:
        watcher = asyncio.create_task(watch())
        for i, clients in enumerate(steps):
            until = started + step_s * (i + 1)
            await asyncio.gather(*(client_loop(session, url, body, until, started, records) for _ in range(clients)))
            print(f"  t={time.perf_counter() - started:5.0f} s: {clients:>3} clients done, "
                  f"{samples[-1][1] if samples else '?'} replicas running", flush=True)
        await watcher
    return {"records": records, "samples": samples, "kill": kill}


def report(result: dict, steps: list[int], step_s: float) -> None:
    records, samples, kill = result["records"], result["samples"], result["kill"]
    t = np.array([r[0] for r in records])
    latency = np.array([r[1] for r in records])
    ok = np.array([r[2] for r in records])
    kill_end = kill.get("recovered", float("inf")) if kill else None
    in_kill = (t >= kill["at"]) & (t <= kill_end) if kill else np.zeros(len(t), bool)
    print(f"\n{len(records)} requests in {step_s * len(steps):.0f} s; failed outside the kill: "
          f"{int((~ok & ~in_kill).sum())} (goal 0)")
    if kill:
        recovered = kill.get("recovered")
        print(f"killed replica at {kill['at']:.0f} s; a new replica running in its place after "
              f"{recovered - kill['at']:.0f} s (goal <= 30 s)" if recovered else "  never recovered")
        print(f"failed from the kill until then: {int((~ok & in_kill).sum())} = "
              f"{100 * (~ok & in_kill).sum() / len(records):.3f}% of all requests (goal <= 0.5%)")
    settled = steps.index(max(steps)) + 1  # the peak's second step, the replicas scaled up by then
    steady = (t >= settled * step_s) & (t < (settled + 0.5) * step_s) & ok
    p99_all, p99_steady = np.percentile(latency[ok], 99), np.percentile(latency[steady], 99)
    print(f"p99 over the soak {p99_all:.1f} ms; steady state ({max(steps)} clients, before the kill) "
          f"{p99_steady:.1f} ms: {p99_all / p99_steady:.2f}x (goal <= 2x)")
    print("\nstep  clients  requests  failed  p50 ms  p99 ms  replicas (max)")
    for i, clients in enumerate(steps):
        inside = (t >= i * step_s) & (t < (i + 1) * step_s)
        good = inside & ok
        replicas = max((s[1] for s in samples if i * step_s <= s[0] < (i + 1) * step_s), default=0)
        p50, p99 = np.percentile(latency[good], [50, 99]) if good.any() else (float("nan"),) * 2
        print(f"{i:>4}  {clients:>7}  {int(inside.sum()):>8}  {int((inside & ~ok).sum()):>6}  {p50:>6.1f}  "
              f"{p99:>6.1f}  {replicas}")
    print(f"\nreplica memory (RSS), from {step_s:.0f} s after a replica first shows (warmed up, serving) "
          "to its last sample")
    lifetimes = {}
    for at, _, rss in samples:
        for pid, size in rss.items():
            lifetimes.setdefault(pid, []).append((at, size))
    for pid, seen in lifetimes.items():
        warm = [(at, size) for at, size in seen if at >= seen[0][0] + step_s]
        if len(warm) < 2:
            print(f"  replica {pid}: lived {seen[-1][0] - seen[0][0]:.0f} s, too short to compare")
            continue
        (first_at, first), (last_at, last) = warm[0], warm[-1]
        print(f"  replica {pid}: {first / 2**20:.0f} MiB at {first_at:.0f} s -> {last / 2**20:.0f} MiB at "
              f"{last_at:.0f} s: {100 * (last - first) / first:+.1f}% over {last_at - first_at:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a local checkpoint folder (runs/NAME/epoch_NNNN)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--peak", type=int, default=64, help="most concurrent clients (a power of 2)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    import ray
    from ray import serve

    from cifar_ray.serve import FAST_INGRESS_ENV

    os.environ.update(FAST_INGRESS_ENV)  # read by Ray when it starts, below
    options = deployment_options()
    steps = ramp(args.peak)
    step_s = 60 * args.minutes / len(steps)
    peak_step = steps.index(args.peak)
    kill_at = (peak_step + 1.5) * step_s  # halfway through the peak's second step
    print(f"checkpoint {args.checkpoint}; autoscaling {options['autoscaling_config']}; "
          f"steps of {step_s:.0f} s: {steps} clients; a replica killed at {kill_at:.0f} s")
    ray.init(logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    deploy(args.checkpoint, options, options["user_config"]["max_batch_size"])
    body = sample_jpeg()
    result = asyncio.run(soak(f"http://127.0.0.1:{args.port}/predict", body, steps, step_s, kill_at))
    report(result, steps, step_s)
    serve.shutdown()


if __name__ == "__main__":
    main()
