"""The Classifier deployment: Ray Serve replicas behind a FastAPI ingress (serve.py starts it).

Endpoints (OpenAPI docs at /docs):
    GET  /               a page to try the model: drop an image, see the top classes
    POST /predict        an image: multipart upload (field `file`) or raw bytes (image/*)
    POST /predict/json   {"image": HxWx3 nested lists of 0-255} or {"images": [...]}
    GET  /healthz        200 once a model is loaded and warmed up, else 503 and why
    GET  /metadata       class names, model, training metrics, data source, model card
    GET  /model-card     the served model's MODEL_CARD.md

Every answer names its `model_version`. A replica serving `models:/...@champion` follows the
alias by itself (live_model.py). With CIFAR_RAY_API_TOKEN set on the nodes, /predict,
/predict/json, /metadata and /model-card answer 401 unless the request carries
`Authorization: Bearer <token>`; the page and /healthz (for probes) stay open.

Concurrent requests share one model call through `@serve.batch`; `user_config` sets the
batch size, wait and TTA live (`reconfigure`). Decoding and model calls run on compute
threads, off the replica's event loop. Bad input gets a 4xx JSON error and never takes the
replica down (serve_input.py). Prometheus metrics: serve_metrics.py.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations, and
# as strings, under Serve's ingress wrapper, `request: Request` was taken for a query field.
import asyncio
import hmac
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse
from ray import serve

from cifar_ray.config import ServeConfig
from cifar_ray.live_model import LiveModel
from cifar_ray.serve_input import decode_upload, parse_json_images, read_body, read_image_bytes
from cifar_ray.serve_metrics import CountAnswers, ServeMetrics

logger = logging.getLogger("ray.serve")
# Set on every node (a Kubernetes Secret in cluster/kuberay/rayservice.yaml) to require
# `Authorization: Bearer <token>` on the prediction and metadata routes; /healthz stays open.
TOKEN_ENV = "CIFAR_RAY_API_TOKEN"
COMPUTE_THREADS = 2  # batches in flight per replica: one computing while the next one forms

PAGE_HTML = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")  # GET /
# A file path or a URI in an error message: "/a/b/model.keras", "sqlite:////a/mlflow.db",
# "s3://b/runs/x" (not "models:/name@alias", which names a registry version).
PATH_OR_URI = re.compile(r"(?:\b[a-z][a-z0-9+.-]*://|(?<![\w.:])/)[^\s'\",:;()]*")


def without_paths(message: str) -> str:
    """An error as an HTTP body gives it: each path or URI cut to its last part. Clients
    learn what failed, not where the cluster keeps its files; the replica's log has it all."""
    return PATH_OR_URI.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], message)

api = FastAPI(title="cifar-ray", description="CIFAR-10 image classification")


@dataclass
class Pending:
    """One request's images on their way into a batch, and when they joined the queue."""

    images: np.ndarray
    queued_at: float


api.add_middleware(CountAnswers)


# As serve_config.yaml deploys it, which says why: requests reading their bodies are cheap,
# the model's own limit is ServeConfig.max_model_requests.
@serve.deployment(name="Classifier", max_ongoing_requests=1000, max_queued_requests=64)
@serve.ingress(api)
class Classifier:
    def __init__(self, cfg: ServeConfig, tracking_uri: str | None = None):
        self.cfg = cfg
        self.token = os.environ.get(TOKEN_ENV) or None
        self.metrics = api.state.metrics = ServeMetrics()
        # Decoding and model calls run on these threads, never on the replica's event loop:
        # while one batch computes, the loop keeps reading requests and forming the next.
        self.compute = ThreadPoolExecutor(max_workers=COMPUTE_THREADS, thread_name_prefix="compute")
        self.batch_wait_s, self.in_flight, self.tta = self.cfg.batch_wait_timeout_s, 0, self.cfg.tta
        # A model that cannot be loaded keeps the replica up, saying why on /healthz: a
        # replica that raised here would be restarted forever, the reason lost in the logs.
        self.live = LiveModel(self.cfg.checkpoint, tracking_uri)
        self.live.refresh()
        self.stop = threading.Event()
        if self.live.follows_registry:
            threading.Thread(target=self._follow_registry, name="follow-registry", daemon=True).start()

    def _follow_registry(self) -> None:
        """Swap in the version the alias points to, whenever it moves (live_model.py)."""
        while not self.stop.wait(self.cfg.poll_interval_s):
            try:
                self.live.refresh()
            except Exception:  # never let the follower die: the next poll tries again
                logger.exception("following the registry")

    def __del__(self):
        self.stop.set()

    def reconfigure(self, user_config: dict) -> None:
        """Batching knobs and TTA from serve_config.yaml's user_config, applied without a restart."""
        if "max_batch_size" in user_config:
            self.predict_batch.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self.batch_wait_s = float(user_config["batch_wait_timeout_s"])
        self.tta = user_config.get("tta", self.tta)  # None: as the served checkpoint says

    async def _classify(self, images: np.ndarray, queued_at: float) -> tuple:
        """(probabilities, model) for `images`, through the batcher.

        The batcher waits up to batch_wait_s for a batch to fill only while other requests
        are in flight: a lone client never waits, a busy replica still batches. Past
        max_model_requests waiting, a request gets a fast 503: the replica's own
        max_ongoing_requests is set high, for requests still reading their bodies are cheap.
        """
        if self.in_flight >= self.cfg.max_model_requests:
            raise HTTPException(503, "the model is busy; retry in a second", headers={"Retry-After": "1"})
        self.predict_batch.set_batch_wait_timeout_s(self.batch_wait_s if self.in_flight else 0.0)
        self.in_flight += 1
        try:
            return await self.predict_batch(Pending(images, queued_at))
        finally:
            self.in_flight -= 1

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0, max_concurrent_batches=COMPUTE_THREADS)
    async def predict_batch(self, requests: list[Pending]) -> list[tuple]:
        """One model call for all images of all concurrent requests; each request gets its
        probabilities and the model that computed them (a swap may land between batches)."""
        model = self.live.current
        started = time.perf_counter()
        for r in requests:
            self.metrics.observe("queue", r.queued_at)
        images = np.concatenate([r.images for r in requests])
        probabilities = await self._off_loop(model.predict, images, self.tta)
        self.metrics.observe("model", started)
        self.metrics.batch_images.observe(len(images))
        self.metrics.serving(model.version, model.metadata["model"])
        counts = np.cumsum([len(r.images) for r in requests])[:-1]
        return [(p, model) for p in np.split(probabilities, counts)]

    # --- HTTP endpoints -----------------------------------------------------------------

    @api.post("/predict")
    async def predict(self, request: Request, top_k: int | None = Query(None, ge=1, le=10)) -> dict:
        """Classify one image, uploaded as multipart form field `file` or as raw bytes."""
        self._require_token(request)
        self._require_ready()
        start = time.perf_counter()
        data = await read_image_bytes(request, self.cfg.max_body_bytes, self.cfg.body_timeout_s)
        start = self.metrics.observe("read", start)
        image = await self._off_loop(decode_upload, data)
        queued_at = self.metrics.observe("decode", start)
        return self._answer(*await self._classify(image[None], queued_at), top_k)[0]

    @api.post("/predict/json")
    async def predict_json(self, request: Request, top_k: int | None = Query(None, ge=1, le=10)) -> Any:
        """Classify `{"image": HxWx3 lists}` (one answer) or `{"images": [...]}` (a list)."""
        self._require_token(request)
        self._require_ready()
        start = time.perf_counter()
        body = await read_body(request, self.cfg.max_body_bytes, self.cfg.body_timeout_s)
        start = self.metrics.observe("read", start)
        images, single = await self._off_loop(parse_json_images, body)
        queued_at = self.metrics.observe("decode", start)
        answers = self._answer(*await self._classify(images, queued_at), top_k)
        return answers[0] if single else answers

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        """A page to try the model in a browser; it calls /predict like any other client."""
        return PAGE_HTML

    @api.get("/model-card", response_class=PlainTextResponse)
    async def model_card(self, request: Request) -> str:
        """The served model's MODEL_CARD.md (Markdown): data, metrics per class, limits."""
        self._require_token(request)
        self._require_ready()
        if not self.live.current.model_card:
            raise HTTPException(404, "this model's checkpoint carries no MODEL_CARD.md")
        return self.live.current.model_card

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """200 while a model serves (with `warning` when a newer version failed to load)."""
        self._require_ready()
        model = self.live.current
        self.metrics.serving(model.version, model.metadata["model"])
        health = {"status": "ok", "model": model.metadata["model"], "model_version": model.version,
                  "source": without_paths(self.cfg.checkpoint)}
        return {**health, "warning": without_paths(self.live.error)} if self.live.error else health

    @api.get("/metadata")
    async def get_metadata(self, request: Request) -> dict:
        self._require_token(request)
        self._require_ready()
        model = self.live.current
        m = model.metadata
        return {"model": m["model"], "model_version": model.version, "source": self.cfg.checkpoint,
                "registry_error": without_paths(self.live.error) or None, "class_names": m["class_names"],
                "input_shape": m["input_shape"], "epoch": m["epoch"], "training_metrics": m["metrics"],
                "data": m["data"], "config": m["config"], "versions": m["versions"], "evaluation": model.audit}

    # --- helpers ------------------------------------------------------------------------

    def _require_token(self, request: Request) -> None:
        """401, before anything is read or computed, unless the request carries the API token
        (when one is set). Compared in constant time."""
        if self.token is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {self.token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def _require_ready(self) -> None:
        if self.live.current is None:
            raise HTTPException(503, without_paths(self.live.error) or "loading")

    async def _off_loop(self, function, *args):
        """Run `function(*args)` on the compute threads, so the event loop stays free."""
        return await asyncio.get_running_loop().run_in_executor(self.compute, function, *args)

    def _answer(self, probabilities: np.ndarray, model, top_k: int | None) -> list[dict]:
        names = model.metadata["class_names"]
        k = top_k or self.cfg.top_k
        answers = []
        for p in probabilities:
            ranked = np.argsort(-p)[:k]
            answers.append({
                "class_name": names[int(ranked[0])], "class_index": int(ranked[0]),
                "top_k": [{"class_name": names[int(i)], "probability": float(p[i])} for i in ranked],
                "model": model.metadata["model"], "model_version": model.version,
            })
        self.metrics.predicted([a["class_name"] for a in answers], model.version)
        return answers
