"""The Classifier deployment: Ray Serve replicas behind a FastAPI ingress (serve.py starts it).

Endpoints (OpenAPI docs at /docs):
    GET  /               a page to try the model: drop an image, see the top classes
    POST /predict        an image: multipart upload (field `file`) or raw bytes (image/*)
    POST /predict/json   {"image": HxWx3 nested lists of 0-255} or {"images": [...]}
    GET  /healthz        200 once a model is loaded and warmed up, else 503 and why
    GET  /metadata       class names, model, training metrics, data source, model card
    GET  /model-card     the served model's MODEL_CARD.md

    POST /feedback       {"request_id": "...", "label": 3 or "cat"}: the true label of an answer
    GET  /drift          whether the last answers still look like the model's on its own data

Every answer names its `model_version` and its `request_id`. A replica serving
`models:/...@champion` answers as the Rollout deployment says (rollout.py): the champion,
and during a rollout a candidate's share or shadow. With CIFAR_RAY_API_TOKEN set on the
nodes, every route but the page and /healthz (for probes) answers 401 unless the request
carries `Authorization: Bearer <token>`.

Concurrent requests share one model call through `@serve.batch`; `user_config` sets the
batch size, wait and TTA live (`reconfigure`). Decoding and model calls run on compute
threads, off the replica's event loop. Bad input gets a 4xx JSON error and never takes the
replica down (serve_input.py). Prometheus metrics: serve_metrics.py.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations, and
# as strings, under Serve's ingress wrapper, `request: Request` was taken for a query field.
import asyncio
import logging
import random
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse
from ray import serve
from ray.serve.context import _get_serve_request_context

from cifar_ray.config import ServeConfig
from cifar_ray.errors import without_paths
from cifar_ray.live_model import LiveModel
from cifar_ray.answers import Answer, AnswerOutbox, shadow_answers
from cifar_ray.drift import REFERENCE_KEY, DriftWatch
from cifar_ray.payload_log import answer_row
from cifar_ray.serve_input import (check_token, decode_upload, parse_feedback, parse_json_images, read_body,
                                   read_image_bytes)
from cifar_ray.serve_metrics import CountAnswers, ServeMetrics

logger = logging.getLogger("ray.serve")
# Set on every node (a Kubernetes Secret in cluster/kuberay/rayservice.yaml) to require
# `Authorization: Bearer <token>` on the prediction and metadata routes; /healthz stays open.
TOKEN_ENV = "CIFAR_RAY_API_TOKEN"
COMPUTE_THREADS = 2  # batches in flight per replica: one computing while the next one forms
GAUGES_EVERY_S = 1.0  # set again, traffic or not: Ray drops a gauge unset for 2 export intervals (20 s)

PAGE_HTML = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")  # GET /
api = FastAPI(title="cifar-ray", description="CIFAR-10 image classification")


@dataclass
class Pending:
    """One request's images on their way into a batch: when they joined the queue, the model
    chosen to answer them and, during a shadow rollout, the one that answers a copy."""

    images: np.ndarray
    queued_at: float
    model: Any
    shadow: Any = None


api.add_middleware(CountAnswers)


# As serve_config.yaml deploys it, which says why: requests reading their bodies are cheap,
# the model's own limit is ServeConfig.max_model_requests.
@serve.deployment(name="Classifier", max_ongoing_requests=1000, max_queued_requests=64)
@serve.ingress(api)
class Classifier:
    def __init__(self, cfg: ServeConfig, tracking_uri: str | None = None, rollout=None):
        self.cfg, self.rollout = cfg, rollout  # rollout: a handle to the Rollout deployment
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
        self.answers = AnswerOutbox(rollout, self.stop) if rollout is not None else None
        self.drift = DriftWatch()
        threading.Thread(target=self._renew_gauges, name="gauges", daemon=True).start()
        if self.live.follows_registry and rollout is not None:
            threading.Thread(target=self.live.follow, args=(rollout, self.stop), name="follow-rollout",
                             daemon=True).start()

    def _renew_gauges(self) -> None:
        """The version served (not a candidate: its share is the Rollout's gauge), and drift."""
        while not self.stop.wait(GAUGES_EVERY_S):
            if self.live.current is not None:
                self.metrics.serving(self.live.current.version, self.live.current.metadata["model"])
            for model in {id(m): m for m in (self.live.current, self.live.candidate) if m}.values():
                self._drift_of(model)

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
        """(probabilities, the model that answered, the shadow or None) for `images`, through the batcher.

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
            return await self.predict_batch(Pending(images, queued_at, *self.live.route()))
        finally:
            self.in_flight -= 1

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0, max_concurrent_batches=COMPUTE_THREADS)
    async def predict_batch(self, requests: list[Pending]) -> list[tuple]:
        """One model call per model for all images of all concurrent requests (one model but
        during a canary); each request gets its probabilities and the model that computed them."""
        started = time.perf_counter()
        for r in requests:
            self.metrics.observe("queue", r.queued_at)
        answers: list[tuple] = [()] * len(requests)
        for model in {id(r.model): r.model for r in requests}.values():
            mine = [i for i, r in enumerate(requests) if r.model is model]
            images = np.concatenate([requests[i].images for i in mine])
            try:
                probabilities = await self._off_loop(model.predict, images, self.tta)
            except Exception:
                if self.answers is not None:  # counted against the version: the canary's error rate
                    for _ in mine:
                        self.answers.add(Answer("", model.version, -1, 0.0, 0.0, error=True))
                raise
            self.metrics.batch_images.observe(len(images))
            counts = np.cumsum([len(requests[i].images) for i in mine])[:-1]
            for i, p in zip(mine, np.split(probabilities, counts)):
                answers[i] = (p, model, requests[i].shadow)
        self.metrics.observe("model", started)
        return answers

    # --- HTTP endpoints -----------------------------------------------------------------

    @api.post("/predict")
    async def predict(self, request: Request, top_k: int | None = Query(None, ge=1, le=10)) -> dict:
        """Classify one image, uploaded as multipart form field `file` or as raw bytes."""
        check_token(request, self.token)
        self._require_ready()
        start = begun = time.perf_counter()
        data = await read_image_bytes(request, self.cfg.max_body_bytes, self.cfg.body_timeout_s)
        start = self.metrics.observe("read", start)
        image = await self._off_loop(decode_upload, data)
        queued_at = self.metrics.observe("decode", start)
        source = (len(data), request.headers.get("content-type", "").split(";")[0] or "unknown")
        return self._answer(*await self._classify(image[None], queued_at), top_k, image[None], begun, source)[0]

    @api.post("/predict/json")
    async def predict_json(self, request: Request, top_k: int | None = Query(None, ge=1, le=10)) -> Any:
        """Classify `{"image": HxWx3 lists}` (one answer) or `{"images": [...]}` (a list)."""
        check_token(request, self.token)
        self._require_ready()
        start = begun = time.perf_counter()
        body = await read_body(request, self.cfg.max_body_bytes, self.cfg.body_timeout_s)
        start = self.metrics.observe("read", start)
        images, single = await self._off_loop(parse_json_images, body)
        queued_at = self.metrics.observe("decode", start)
        answers = self._answer(*await self._classify(images, queued_at), top_k, images, begun, (len(body), "json"))
        return answers[0] if single else answers

    @api.post("/feedback")
    async def feedback(self, request: Request) -> dict:
        """The true label of an answer: `{"request_id": "...", "label": 3 or "cat"}`. Answers
        whether the model got it right; any replica takes feedback for any replica's answer."""
        check_token(request, self.token)
        body = await read_body(request, 10_000, self.cfg.body_timeout_s)
        request_id, label = parse_feedback(body)
        if self.answers is None:
            raise HTTPException(503, "feedback needs the Rollout deployment (serve.py's application)")
        self.answers.flush()  # this replica's own recent answers first
        found = await self.rollout.feedback.remote(request_id, label)
        if found is None:
            raise HTTPException(404, f"no answer with request_id {request_id!r} is remembered here")
        return found

    @api.get("/drift")
    async def get_drift(self, request: Request) -> dict:
        """Whether the last answers still look like the served model's answers on images like
        its training data: {"drifting", "p_value", "score", "window", "model_version"} (drift.py)."""
        check_token(request, self.token)
        self._require_ready()
        return self._drift_of(self.live.current)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        """A page to try the model in a browser; it calls /predict like any other client."""
        return PAGE_HTML

    @api.get("/model-card", response_class=PlainTextResponse)
    async def model_card(self, request: Request) -> str:
        """The served model's MODEL_CARD.md (Markdown): data, metrics per class, limits."""
        check_token(request, self.token)
        self._require_ready()
        if not self.live.current.model_card:
            raise HTTPException(404, "this model's checkpoint carries no MODEL_CARD.md")
        return self.live.current.model_card

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """200 while a model serves (with `warning` when a newer version failed to load)."""
        self._require_ready()
        model = self.live.current
        health = {"status": "ok", "model": model.metadata["model"], "model_version": model.version,
                  "source": without_paths(self.cfg.checkpoint)}
        return {**health, "warning": without_paths(self.live.error)} if self.live.error else health

    @api.get("/metadata")
    async def get_metadata(self, request: Request) -> dict:
        check_token(request, self.token)
        self._require_ready()
        model, m = self.live.current, self.live.current.metadata
        return {"model": m["model"], "model_version": model.version, "source": self.cfg.checkpoint,
                "registry_error": without_paths(self.live.error) or None, "class_names": m["class_names"],
                "input_shape": m["input_shape"], "epoch": m["epoch"], "training_metrics": m["metrics"],
                "data": m["data"], "config": m["config"], "versions": m["versions"], "evaluation": model.audit}

    # --- helpers ------------------------------------------------------------------------

    def _require_ready(self) -> None:
        if self.live.current is None:
            raise HTTPException(503, without_paths(self.live.error) or "loading")

    async def _off_loop(self, function, *args):
        """Run `function(*args)` on the compute threads, so the event loop stays free."""
        return await asyncio.get_running_loop().run_in_executor(self.compute, function, *args)

    def _drift_of(self, model) -> dict:
        report = self.drift.report(model.version, model.metadata.get(REFERENCE_KEY))
        self.metrics.drifted(model.version, report["score"], report["drifting"])
        return report

    def _answer(self, probabilities: np.ndarray, model, shadow, top_k: int | None, images: np.ndarray,
                begun: float, source: tuple[int, str]) -> list[dict]:
        """The JSON answers, each with its request_id, the id /feedback takes: Serve's own id of
        the HTTP request (its x-request-id header, in its logs), `ID.0`, `ID.1`... for a list.
        Each is recorded for the Rollout deployment (a sample with its payload log row) and
        watched for drift; a shadow's copy is computed after them."""
        names = model.metadata["class_names"]
        k = top_k or self.cfg.top_k
        latency_ms = (time.perf_counter() - begun) * 1000
        # Ray Serve has no public getter for its request id: the Python proxy keeps it only in
        # this context (HAProxy also sets the header), and both send it back as x-request-id.
        request_id = _get_serve_request_context().request_id or uuid.uuid4().hex
        answers = []
        for n, p in enumerate(probabilities):
            ranked = np.argsort(-p)[:k]
            answers.append({
                "class_name": names[int(ranked[0])], "class_index": int(ranked[0]),
                "top_k": [{"class_name": names[int(i)], "probability": float(p[i])} for i in ranked],
                "model": model.metadata["model"], "model_version": model.version,
                "request_id": f"{request_id}.{n}" if len(probabilities) > 1 else request_id,
            })
            if self.answers is not None:
                sampled = random.random() < self.cfg.payload_log_sample
                row = answer_row(answers[-1], latency_ms, source, images[n], self.cfg.payload_log_images) \
                    if sampled else None
                self.answers.add(Answer(answers[-1]["request_id"], model.version, int(ranked[0]), float(p[ranked[0]]),
                                        latency_ms, payload=row))
        self.metrics.predicted([a["class_name"] for a in answers], model.version)
        self.metrics.latency_ms.observe(latency_ms, tags={"model_version": model.version})
        self.drift.observe(model.version, probabilities.max(1).tolist(), probabilities.argmax(1).tolist())
        if shadow is not None and self.answers is not None:
            self.compute.submit(shadow_answers, shadow, images, [a["request_id"] for a in answers], self.tta,
                                self.answers.add)
        return answers
