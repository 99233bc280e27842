"""Slow clients against a running endpoint: do normal requests still get answered, and does
the server close the connections that trickle their bodies?

    RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=1 \
      CIFAR_RAY_CHECKPOINT=runs/NAME/epoch_0010 serve run serve_config.yaml &   # README's setup
    python benchmarks/slow_clients.py --url http://127.0.0.1:8000 --slow 800

`--slow` connections each send the headers of a POST /predict declaring a 100 kB body, then
one byte a second (a slowloris-style upload). Once they are all open, normal single-image
requests arrive at `--rate` per second for `--duration` seconds, each on its own connection.
Printed: the normal requests' failures and latency (p50, p99), and how many slow connections
the server closed within 60 s of opening them, with the answers they got.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import time

import numpy as np

BODY_DECLARED = 100_000


def png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


async def slow_client(host: str, port: int, run_until: float, out: list) -> None:
    """Headers, then a byte a second until the server closes or the run ends:
    out gets (seconds until closed or None, the status line it got or '')."""
    opened = time.monotonic()
    status, closed = "", None
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        out.append((0.0, f"connect failed: {e.__class__.__name__}"))
        return
    try:
        writer.write(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                     f"Content-Length: {BODY_DECLARED}\r\n\r\n".encode())
        await writer.drain()
        while time.monotonic() < run_until:
            try:
                data = await asyncio.wait_for(reader.read(4096), timeout=1.0)
                if not data:  # the server closed the connection
                    closed = time.monotonic() - opened
                    break
                status = status or data.split(b"\r\n", 1)[0].decode(errors="replace")
            except asyncio.TimeoutError:
                pass
            writer.write(b"x")
            await writer.drain()
    except (ConnectionError, OSError):
        closed = time.monotonic() - opened
    finally:
        writer.close()
    out.append((closed, status))


async def normal_request(host: str, port: int, body: bytes, out: list) -> None:
    """One upload on its own connection: out gets (status or error, seconds)."""
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        writer.write(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        status = response.split(b" ", 2)[1].decode() if response.startswith(b"HTTP/") else "no answer"
    except (OSError, asyncio.TimeoutError) as e:
        status = e.__class__.__name__
    out.append((status, time.monotonic() - started))


async def run(host: str, port: int, slow: int, rate: float, duration: float, watch_s: float) -> dict:
    start = time.monotonic()
    slow_results, normal_results = [], []
    slow_tasks = []
    for _ in range(slow):  # opened over a few seconds, as many clients would
        slow_tasks.append(asyncio.create_task(slow_client(host, port, start + watch_s, slow_results)))
        await asyncio.sleep(min(5.0 / slow, 0.01))
    body, normal_tasks = png(), []
    normal_start = time.monotonic()
    while time.monotonic() - normal_start < duration:
        normal_tasks.append(asyncio.create_task(normal_request(host, port, body, normal_results)))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*normal_tasks)
    await asyncio.gather(*slow_tasks)
    latencies = sorted(s for status, s in normal_results if status == "200")
    closed_in_time = [c for c, _ in slow_results if c is not None and c <= 60]
    return {
        "slow_connections": slow,
        "normal_requests": len(normal_results),
        "normal_failed": len(normal_results) - len(latencies),
        "normal_statuses": dict(collections.Counter(status for status, _ in normal_results)),
        "normal_p50_s": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
        "normal_p99_s": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
        "slow_closed_within_60s": round(len(closed_in_time) / slow, 3),
        "slow_median_close_s": round(float(np.median(closed_in_time)), 1) if closed_in_time else None,
        "slow_answers": dict(collections.Counter(status.split(" ", 2)[1] if status.startswith("HTTP/") else
                                                 (status or "none") for _, status in slow_results)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--slow", type=int, default=800, help="slow connections (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=2.0, help="normal requests per second (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of normal requests (default: %(default)s)")
    parser.add_argument("--watch-s", type=float, default=75.0,
                        help="how long slow clients keep trickling, unless closed (default: %(default)s)")
    args = parser.parse_args()
    host, port = args.url.removeprefix("http://").rstrip("/").split(":")
    print(json.dumps(asyncio.run(run(host, int(port), args.slow, args.rate, args.duration, args.watch_s)),
                     indent=2))


if __name__ == "__main__":
    main()
