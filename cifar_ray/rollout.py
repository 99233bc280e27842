"""The Rollout deployment: one place that owns what every Classifier replica serves, and
remembers the answers they gave.

Why one place: replicas that each polled MLflow switched at their own moments (in a test
switch under 32 clients, answers alternated between the old and new version about 150
times). Here one replica of this deployment reads the registry every `poll_interval_s` and
tells the Classifier replicas through a long poll (`watch`); they load what the routes name
beside what they serve and say so in their next `watch`. The new routes take effect, for
all replicas at the same moment, once every live replica has loaded them (or after
`ACTIVATE_AFTER_S`, so a stuck replica cannot hold a rollback back).

Routes: the alias `champion`, and during a rollout the alias `candidate` with its share of
the traffic or, as a shadow, a copy of it (model_registry.py keeps those settings).

Answers: every answer's request id, version and top class (`record`), the last
`MAX_ANSWERS`, for POST /feedback on any replica (`feedback`); per version the requests,
errors, latency, confidence, labelled answers and agreement with the champion since the
rollout began (`status`), judged at every poll by canary.py's rule, whose decision this
deployment carries out in the registry and keeps as tags on the version.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass

from ray import serve
from ray.serve.metrics import Counter, Gauge

from cifar_ray.answers import Answer, AnswerBook
from cifar_ray.canary import Rule, decide
from cifar_ray.errors import first_line
from cifar_ray.model_registry import REGISTRY_URI, STATUS_TAG
from cifar_ray.payload_log import PayloadLog, recent_answers

logger = logging.getLogger("ray.serve")
# Longest a replica's watch waits for news. Short, for Serve stops this deployment's replica
# only once no watch is open: with 10 s, deleting the app took 11.0 s (3.0 s with 2 s).
WATCH_S = 2.0
WATCH_EVERY_S = 0.1  # how often a waiting watch looks for news
ACTIVATE_AFTER_S = 20.0  # new routes take effect by then even if a replica has not loaded them
REPLICA_GONE_S = 30.0  # a replica not heard from for this long no longer holds routes back
FEEDBACK_WAIT_S = 1.0  # an answer given a moment ago may still be on its way from its replica
STATUS_EVERY_S = 2.0  # how often a rollout's figures are written to the registry (registry canary --status)


@dataclass(frozen=True)
class Routes:
    """Which versions answer: the champion, and a candidate with its share or as a shadow."""

    champion: str | None = None
    candidate: str | None = None
    percent: float = 0.0
    shadow: bool = False
    previous: str | None = None  # the champion before this one: loaded too, for a fast rollback

    @property
    def versions(self) -> set[str]:
        return {v for v in (self.champion, self.candidate, self.previous) if v}


# One replica: it is the one place. No access log: each replica calls `record` 4 times a second.
@serve.deployment(name="Rollout", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0},
                  logging_config={"enable_access_log": False})
class Rollout:
    def __init__(self, source: str, tracking_uri: str | None, poll_interval_s: float = 0.5,
                 payload_log_path: str | None = None):
        reference = REGISTRY_URI.match(source)
        self.follows = bool(reference and reference["alias"] and tracking_uri)
        self.tracking_uri, self.poll_interval_s = tracking_uri, poll_interval_s
        self.lock = threading.Lock()
        self.target = self.active = Routes()
        self.generation, self.target_since = 0, time.monotonic()
        self.replicas: dict[str, tuple[float, set[str]]] = {}  # id -> (last heard, versions loaded)
        self.book = AnswerBook()
        self.canary: dict | None = None
        self.error, self.status_written, self.exported = "", 0.0, set()
        self.share = Gauge("cifar_ray_traffic_share", "share of the prediction requests each model version "
                           "answers (role: champion or candidate; shadow: a copy of every request)",
                           tag_keys=("model_version", "role"))
        self.feedback_count = Counter("cifar_ray_feedback", "labels posted to /feedback, by the version that "
                                      "answered and whether it was right", tag_keys=("model_version", "correct"))
        self.payload = self._open_payload_log(payload_log_path) if payload_log_path else None
        self.stop = threading.Event()
        if self.payload:
            threading.Thread(target=self._write_payloads, name="payload-log", daemon=True).start()
        if self.follows:
            from cifar_ray.model_registry import Registry

            self.registry = Registry(tracking_uri, reference["name"])
            threading.Thread(target=self._follow_registry, name="follow-registry", daemon=True).start()

    def _open_payload_log(self, path: str) -> PayloadLog:
        """The payload log, and the answers it kept read back: a restarted replica takes
        feedback again for them."""
        dropped = Counter("cifar_ray_payload_rows_dropped", "payload log rows dropped: buffer full or storage failing")
        try:
            self.book.remember(recent_answers(path))
        except Exception as e:
            logger.error(f"rollout: cannot read the payload log back ({first_line(e)}); feedback for answers "
                         "given before this replica started gets 404")
        return PayloadLog(path, on_drop=dropped.inc)

    def __del__(self):  # Serve calls it when the replica stops: the payload log's last rows go out
        self.stop.set()
        if self.payload:
            self.payload.flush()

    def _write_payloads(self) -> None:
        while not self.stop.wait(0.5):
            if self.payload.due():
                self.payload.flush()

    # --- routes ---------------------------------------------------------------------------

    def _follow_registry(self) -> None:
        while not self.stop.wait(self.poll_interval_s):
            try:
                self._read_registry()
                self._judge_canary()
                self._export_share()
            except Exception as e:  # the store down: keep serving what was, say why once
                if first_line(e) != self.error:
                    logger.error(f"rollout: cannot read the registry at {self.tracking_uri}: {first_line(e)}")
                self.error = first_line(e)

    def _read_registry(self) -> None:
        champion = self.registry.champion()
        canary = self.registry.canary()
        history = self.registry.history()
        previous = history[-2] if len(history) > 1 else None
        routes = Routes(champion=str(champion.version) if champion else None, previous=previous,
                        candidate=canary["version"] if canary else None,
                        percent=float(canary["percent"]) if canary else 0.0,
                        shadow=bool(canary and canary["shadow"]))
        with self.lock:
            self.error = ""
            if (canary or {}).get("started") != (self.canary or {}).get("started"):
                self.book.start_over()  # a new rollout: figures start from zero
            self.canary = canary
            if routes != self.target:
                logger.info(f"rollout: routes {self.target} -> {routes}")
                self.target, self.target_since = routes, time.monotonic()
            self._activate_when_loaded()

    def _activate_when_loaded(self) -> None:
        """With the lock held: the target routes take effect once every live replica has their
        versions loaded, or after ACTIVATE_AFTER_S."""
        if self.target == self.active:
            return
        now = time.monotonic()
        live = [loaded for heard, loaded in self.replicas.values() if now - heard < REPLICA_GONE_S]
        needed = {v for v in (self.target.champion, self.target.candidate) if v}
        if all(needed <= loaded for loaded in live) or now - self.target_since > ACTIVATE_AFTER_S:
            self.active, self.generation = self.target, self.generation + 1

    def _export_share(self) -> None:
        """The traffic share gauges, renewed each poll (Ray drops a gauge not set within its TTL)."""
        routes, shares = self.active, {}
        if routes.champion:
            shares[routes.champion, "champion"] = 1.0 - (routes.percent / 100 if routes.candidate and
                                                         not routes.shadow else 0.0)
        if routes.candidate:
            shares[routes.candidate, "shadow" if routes.shadow else "candidate"] = (
                1.0 if routes.shadow else routes.percent / 100)
        for (version, role), share in shares.items():
            self.share.set(share, tags={"model_version": version, "role": role})
        for version, role in self.exported - set(shares):
            self.share.set(0.0, tags={"model_version": version, "role": role})
        self.exported = set(shares)

    async def watch(self, replica: str, generation: int, loaded: list[str]) -> dict:
        """A replica's long poll: returns at once when there is news for it (routes to load,
        or new routes in effect), else after WATCH_S. Answers {"generation", "active", "load"}."""
        deadline = time.monotonic() + WATCH_S
        while True:
            with self.lock:
                self.replicas[replica] = (time.monotonic(), set(loaded))
                self._activate_when_loaded()
                news = generation != self.generation or not self.target.versions <= set(loaded)
                if news or time.monotonic() > deadline:
                    return {"generation": self.generation, "active": asdict(self.active),
                            "load": sorted(self.target.versions | self.active.versions), "follows": self.follows}
            await asyncio.sleep(WATCH_EVERY_S)

    # --- answers and feedback -------------------------------------------------------------

    async def record(self, answers: list[Answer]) -> None:
        """Answers from a replica (answers.py)."""
        with self.lock:
            self.book.add(answers)
        if self.payload:
            for a in answers:
                if a.payload:
                    self.payload.add(a.payload)

    async def feedback(self, request_id: str, label: int) -> dict | None:
        """The true label of an answer: {"request_id", "model_version", "correct"}, or None
        for an id not answered here, or forgotten."""
        deadline = time.monotonic() + FEEDBACK_WAIT_S
        while not self.book.knows(request_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        with self.lock:
            found = self.book.label(request_id, label)
        if found is not None:
            self.feedback_count.inc(tags={"model_version": found["model_version"], "correct": str(found["correct"]).lower()})
            if self.payload:
                self.payload.add({"kind": "feedback", "request_id": request_id, "model_version": found["model_version"],
                                  "label": label})
        return found

    # --- the canary's decision ------------------------------------------------------------

    def status(self) -> dict:
        with self.lock:
            return {"routes": asdict(self.active), "canary": self.canary, "registry_error": self.error or None,
                    "versions": self.book.summary()}

    def _judge_canary(self) -> None:
        with self.lock:
            canary, active = self.canary, self.active
            if not canary or active.candidate != canary["version"]:
                return
            rule = Rule(**canary.get("rule", {}))
            candidate, champion = self.book.arm(canary["version"]), self.book.arm(active.champion)
            elapsed = time.time() - canary_started(canary)
        verdict = decide(candidate, champion, rule, elapsed)
        if verdict.action == "continue" and time.monotonic() - self.status_written < STATUS_EVERY_S:
            return
        self.status_written = time.monotonic()
        self.registry.client.set_registered_model_tag(self.registry.name, STATUS_TAG, json.dumps(
            {**self.status(), "verdict": asdict(verdict)}))
        if canary["shadow"] and verdict.action == "promote":
            return  # a shadow's answers reached nobody: it is judged on them, promoted by a person
        if verdict.action == "continue":
            return
        evidence = verdict.evidence(candidate, champion)
        logger.info(f"rollout: version {canary['version']}: {verdict.action}: {verdict.reason}")
        if verdict.action == "promote":
            self.registry.set_champion(canary["version"])
            self.registry.client.set_model_version_tag(self.registry.name, canary["version"], "promoted_by",
                                                       f"canary: {verdict.reason}")
        self.registry.stop_canary(f"{verdict.action}: {verdict.reason}", evidence)


def canary_started(canary: dict) -> float:
    from datetime import datetime

    return datetime.fromisoformat(canary["started"]).timestamp()
