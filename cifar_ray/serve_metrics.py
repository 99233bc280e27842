"""Prometheus metrics of the prediction endpoint, through `ray.serve.metrics`.

Ray exports them with every other Ray metric on each node's metrics port (Prometheus
text at http://NODE:METRICS_EXPORT_PORT/metrics), prefixed `ray_`, tagged with the
deployment, replica and application. README.md lists the names for a dashboard.

Ray Serve already exports request counts and latency at the proxy
(`ray_serve_num_http_requests_total`, `ray_serve_http_request_latency_ms`) and the
batcher's own figures (`ray_serve_actual_batch_size`, `ray_serve_batch_wait_time_ms`).
These add what only the model's code knows: which endpoint answered with which status,
what was predicted, where a request's time went, and which model version is served.
"""

from __future__ import annotations

import collections
import time

from ray.serve.metrics import Counter, Gauge, Histogram

MS_BOUNDARIES = [0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]
IMAGE_COUNT_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class ServeMetrics:
    """The metrics one replica records; made inside the replica, where Serve's tags are known."""

    def __init__(self):
        self.requests = Counter("cifar_ray_requests", "HTTP requests answered, by endpoint and status",
                                tag_keys=("endpoint", "status"))
        self.predictions = Counter("cifar_ray_predictions", "images classified, by top-1 class and model version",
                                   tag_keys=("class_name", "model_version"))
        self.stage_ms = Histogram("cifar_ray_stage_ms", "time a request spends in each stage: read the body, "
                                  "decode, wait for its batch, model call", boundaries=MS_BOUNDARIES,
                                  tag_keys=("stage",))
        self.latency_ms = Histogram("cifar_ray_latency_ms", "a prediction request's time from its first byte to its "
                                    "answer, by the model version that answered", boundaries=MS_BOUNDARIES,
                                    tag_keys=("model_version",))
        self.batch_images = Histogram("cifar_ray_batch_images", "images per model call",
                                      boundaries=IMAGE_COUNT_BOUNDARIES)
        self.model_version = Gauge("cifar_ray_model_version", "1 for the model version this replica serves",
                                   tag_keys=("model_version", "model"))
        self.drift_score = Gauge("cifar_ray_drift_score", "Kolmogorov-Smirnov statistic of the last answers' top-1 "
                                 "probability against the version's reference (drift.py): 0 alike, 1 unlike",
                                 tag_keys=("model_version",))
        self.drift_alarm = Gauge("cifar_ray_drift_alarm", "1 while the last answers drift from the version's "
                                 "reference", tag_keys=("model_version",))
        self._served: dict | None = None

    def observe(self, stage: str, since: float) -> float:
        """Record the time from `since` (perf_counter) to now in `stage`; returns now."""
        now = time.perf_counter()
        self.stage_ms.observe((now - since) * 1000, tags={"stage": stage})
        return now

    def answered(self, endpoint: str, status: int) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})

    def predicted(self, class_names: list[str], model_version: str) -> None:
        for name, count in collections.Counter(class_names).items():  # one call per class, not per image
            self.predictions.inc(count, tags={"class_name": name, "model_version": model_version})

    def drifted(self, model_version: str, score: float, drifting: bool) -> None:
        self.drift_score.set(score, tags={"model_version": model_version})
        self.drift_alarm.set(float(drifting), tags={"model_version": model_version})

    def serving(self, model_version: str, model: str) -> None:
        """Mark the version now served (1) and the one it replaced (0). The replica calls it
        every second: Ray drops a gauge value not set again within its TTL."""
        tags = {"model_version": model_version, "model": model}
        if self._served and tags != self._served:
            self.model_version.set(0, tags=dict(self._served))
        self.model_version.set(1, tags=dict(tags))  # copies: Ray adds its own tags to the dict
        self._served = tags


class CountAnswers:
    """ASGI middleware: every HTTP answer counted by endpoint and status, 422s from FastAPI's
    own validation included. The replica puts its ServeMetrics on `app.state.metrics`."""

    ENDPOINTS = {"/predict", "/predict/json", "/healthz", "/metadata"}

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.ENDPOINTS else "other"

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                metrics = getattr(scope["app"].state, "metrics", None)
                if metrics:
                    metrics.answered(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, send_and_count)
