"""What keeping answers costs: every answer kept for /feedback, and the payload log at
sample 1.0 with images, against the same Classifier with no Rollout deployment to send
answers to; interleaved (A, B, C, A, B, C).

    python benchmarks/answer_cost.py --checkpoint runs/NAME/epoch_0002 [--clients 32] [--seconds 8] [--rounds 2]

Both serve the checkpoint with serve_config.yaml's deployment options, one replica, on a
local Ray with the HAProxy ingress, driven over loopback by serve_load.py's client (one JPEG
per request, back to back). With the Rollout deployment, each replica records every
answer (request id, version, top class, confidence, latency) and sends them every 250 ms
(answers.py); with the payload log at 1.0, each answer also carries its row (top classes,
the image's SHA-256 and PNG) and the Rollout deployment writes them as Parquet
(payload_log.py); without the Rollout deployment, /feedback is unavailable and nothing is
recorded. Printed: req/s and p50/p99 per run, then the medians and their ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_load import deployment_options, load, sample_jpeg  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    from cifar_ray.serve import FAST_INGRESS_ENV

    os.environ.update(FAST_INGRESS_ENV)
    import ray
    from ray import serve

    from cifar_ray.serve import application, serve_config_from_args
    from cifar_ray.serve_deployment import Classifier

    ray.init(logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    log = tempfile.mkdtemp(prefix="cifar-ray-payload-")
    cfg, uri = serve_config_from_args({"checkpoint": str(Path(args.checkpoint).resolve()), "payload_log_path": log,
                                       "payload_log_sample": 0.0})
    logged = replace(cfg, payload_log_sample=1.0, payload_log_images=True)
    options = {**deployment_options(), "autoscaling_config": None, "num_replicas": 1}
    variants = {"answers kept": lambda: application(cfg, uri, options),
                "log at 1.0": lambda: application(logged, uri, options),
                "not kept": lambda: Classifier.options(**options).bind(cfg, uri)}
    url, body = f"http://127.0.0.1:{args.port}/predict", sample_jpeg()
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    print(f"{args.clients} clients, {args.seconds:g} s per run, 1 replica, HAProxy ingress")
    for _ in range(args.rounds):
        for name, build in variants.items():
            serve.run(build(), name="cifar", route_prefix="/")
            asyncio.run(load(url, body, args.clients, 2.0))  # warm-up, not measured
            r = asyncio.run(load(url, body, args.clients, args.seconds))
            runs[name].append(r)
            print(f"  {name:>12}: {r['rps']:7.1f} req/s, p50 {r['p50']:6.1f} ms, p99 {r['p99']:6.1f} ms, "
                  f"errors {r['errors']}", flush=True)
            serve.delete("cifar")
    median = {name: statistics.median(r["rps"] for r in rs) for name, rs in runs.items()}
    print("\nmedian req/s: " + ", ".join(f"{name} {rps:.1f}" for name, rps in median.items()))
    print(f"answers kept / not kept {median['answers kept'] / median['not kept']:.3f}; "
          f"log at 1.0 / answers kept (log off) {median['log at 1.0'] / median['answers kept']:.3f}")
    written = sum(1 for _ in Path(log).rglob("*.parquet"))
    print(f"payload log: {written} Parquet files under {log}")
    serve.shutdown()


if __name__ == "__main__":
    main()
