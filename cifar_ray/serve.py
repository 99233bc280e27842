"""Online predictions with Ray Serve: `serve run serve_config.yaml` or `cifar-ray serve`.

    serve run serve_config.yaml                         # the registry's champion, followed live
    CIFAR_RAY_CHECKPOINT=runs/NAME/epoch_0010 serve run serve_config.yaml   # a plain checkpoint
    python -m cifar_ray.serve                           # the same as the YAML, without it
    curl -F file=@cat.png localhost:8000/predict

By default replicas serve `models:/cifar10-classifier@champion` from the MLflow registry
(model_registry.py) and all switch to a new champion together, within about
--poll-interval-s, with no redeploy and no failed request: the Rollout deployment
(rollout.py) follows the registry for them, runs canaries, and takes /feedback. The
Classifier deployment, its endpoints and their batching: serve_deployment.py.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

from ray import serve

from cifar_ray.config import Config, ServeConfig
from cifar_ray.flags import config_from_args
from cifar_ray.model_registry import REGISTRY_URI
from cifar_ray.rollout import Rollout
from cifar_ray.serve_deployment import Classifier
from cifar_ray.storage import absolute

logger = logging.getLogger("ray.serve")
CHECKPOINT_ENV = "CIFAR_RAY_CHECKPOINT"
# Ray Serve's HAProxy ingress: HAProxy hands each HTTP request straight to the replica's own
# HTTP server, where Ray's default Python proxy actor relays it, body included, through
# actor calls. 3x the requests/s on 2 cores (benchmarks/README.md). Ray reads these when it
# starts: set them for `ray start` or `serve run`; `python -m cifar_ray.serve` sets them.
FAST_INGRESS_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}


def serve_config_from_args(args: dict) -> tuple[ServeConfig, str | None]:
    """serving_config from serve_config.yaml's `args`: config field names and values."""
    return serving_config(Config().with_overrides(args))


def serving_config(cfg: Config) -> tuple[ServeConfig, str | None]:
    """(ServeConfig, MLflow tracking URI) to serve with.

    CIFAR_RAY_CHECKPOINT overrides the checkpoint. Relative paths are made absolute here,
    where `serve run` was started; the tracking URI is only needed for a models:/ source.
    The payload log goes to <storage-path>/payload_log unless payload_log_path says where.
    """
    from cifar_ray.tracking import tracking_uri

    checkpoint = os.environ.get(CHECKPOINT_ENV) or cfg.serve.checkpoint
    from_registry = bool(REGISTRY_URI.match(checkpoint))
    checkpoint = checkpoint if from_registry else absolute(checkpoint)
    payload_log = absolute(cfg.serve.payload_log_path or f"{cfg.run.storage_path.rstrip('/')}/payload_log")
    return (replace(cfg.serve, checkpoint=checkpoint, payload_log_path=payload_log),
            tracking_uri(cfg) if from_registry else None)


def app(args: dict) -> serve.Application:
    """The application builder that `serve run serve_config.yaml` imports. An HAProxy that an
    earlier Serve left on this machine fails it here, in one line naming the process."""
    from cifar_ray.ingress import check_no_stale_haproxy

    check_no_stale_haproxy()
    return application(*serve_config_from_args(args))


def application(cfg: ServeConfig, tracking_uri: str | None, options: dict | None = None) -> serve.Application:
    """The Classifier replicas and the Rollout deployment they follow and report to;
    `options` override the Classifier's deployment options (benchmarks and tests)."""
    if any(os.environ.get(k) != v for k, v in FAST_INGRESS_ENV.items()):
        logger.warning("serving through Ray's Python proxy; for 3x the requests/s start Ray with "
                       + " ".join(f"{k}={v}" for k, v in FAST_INGRESS_ENV.items()))
    user_config = {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
                   "tta": cfg.tta}
    payload_log = cfg.payload_log_path if cfg.payload_log_sample > 0 else None
    rollout = Rollout.bind(cfg.checkpoint, tracking_uri, cfg.poll_interval_s, payload_log)
    return Classifier.options(**{"user_config": user_config, **(options or {})}).bind(cfg, tracking_uri, rollout)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`cifar-ray serve`: like `serve run serve_config.yaml`, and when stopped (Ctrl-C,
    SIGTERM, SIGHUP) it leaves nothing listening on the port (ingress.py)."""
    from cifar_ray import ingress
    from cifar_ray.cli import init_ray, parse_args, run_cli

    args = parse_args("serve", argv, prog)

    def run() -> None:
        cfg, uri = serving_config(config_from_args(args))
        ingress.check_port_free(args.port)
        if args.ingress == "haproxy":
            ingress.raise_open_file_limit()
            os.environ.update(FAST_INGRESS_ENV)
        init_ray()
        with ingress.stopped_cleanly(args.port):
            serve.start(http_options={"host": args.host, "port": args.port})
            serve.run(application(cfg, uri), blocking=False)
            print(f"serving on http://{args.host}:{args.port} (Ctrl-C or SIGTERM stops it)", flush=True)
            while True:  # short naps: a signal that lands on one of Ray's threads is handled within one
                time.sleep(0.5)

    run_cli(run)


if __name__ == "__main__":
    main()
