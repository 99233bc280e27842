"""What the replicas answered: each answer kept by its request id for POST /feedback, and
each version's live figures (requests, errors, latency, confidence, labelled answers,
agreement with the champion), which the canary rule (canary.py) judges.

`AnswerOutbox` runs in each Classifier replica and sends its answers, in batches, off the
request path, to the Rollout deployment (rollout.py), whose `AnswerBook` keeps them: one
book for all replicas, so any replica takes feedback for an answer another one gave.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from cifar_ray.canary import Arm, wilson_interval

logger = logging.getLogger("ray.serve")
MAX_ANSWERS = 100_000  # request ids remembered for feedback
LATENCIES_KEPT = 20_000  # per version, for p50/p99
FLUSH_S = 0.25  # how often a replica sends its answers
MAX_UNSENT = 50_000  # a replica's answers waiting to be sent; more are dropped


class Answer(NamedTuple):
    """One answer a replica gave (or, `shadow`, computed and kept from the client)."""

    request_id: str
    version: str
    label: int
    confidence: float  # its top-1 probability
    latency_ms: float
    error: bool = False
    shadow: bool = False
    payload: dict | None = None  # the payload log's row (payload_log.py), for a sampled answer


@dataclass
class Given:
    """An answer a client got, kept for its feedback; with the shadow's to the same request."""

    version: str
    label: int
    shadow: tuple[str, int] | None = None
    truth: int | None = None  # the label feedback gave


@dataclass
class Record:
    """A version's live figures since the rollout began."""

    requests: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0
    confidence: float = 0.0  # sum of top-1 probabilities
    compared: int = 0  # shadow answers with a champion answer to the same request
    agreed: int = 0
    latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LATENCIES_KEPT))

    def arm(self) -> Arm:
        p99 = float(np.percentile(self.latencies, 99)) if self.latencies else 0.0
        return Arm(self.requests, self.errors, p99, self.labelled, self.correct)

    def summary(self) -> dict:
        low, high = wilson_interval(self.correct, self.labelled)
        return {"requests": self.requests, "errors": self.errors,
                "p50_ms": float(np.percentile(self.latencies, 50)) if self.latencies else None,
                "p99_ms": self.arm().p99_ms or None,
                "mean_confidence": self.confidence / self.requests if self.requests else None,
                "labelled": self.labelled, "live_accuracy": self.correct / self.labelled if self.labelled else None,
                "accuracy_interval": [low, high], "agreement": self.agreed / self.compared if self.compared else None}


class AnswerBook:
    """The answers clients got, by request id (the last MAX_ANSWERS), and each version's
    figures since `start_over`."""

    def __init__(self):
        self.answers: collections.OrderedDict[str, Given] = collections.OrderedDict()
        self.records: dict[str, Record] = collections.defaultdict(Record)

    def start_over(self) -> None:
        self.records.clear()

    def add(self, answers: list[Answer]) -> None:
        """Answers from a replica; a shadow's come after the champion's to the same request."""
        for a in answers:
            record = self.records[a.version]
            record.requests += 1
            record.errors += a.error
            if a.error:
                continue
            record.confidence += a.confidence
            record.latencies.append(a.latency_ms)
            given = self.answers.get(a.request_id)
            if a.shadow and given is not None:
                record.compared += 1
                record.agreed += given.label == a.label
                given.shadow = (a.version, a.label)
            elif not a.shadow:
                self.answers[a.request_id] = Given(a.version, a.label)
        self._forget_the_oldest()

    def remember(self, logged: list[tuple[str, str, int, int | None]]) -> None:
        """Answers read back from the payload log (payload_log.recent_answers), oldest first:
        feedback for them is taken again, and an answer already labelled is not counted twice."""
        for request_id, version, label, truth in logged[-MAX_ANSWERS:]:
            self.answers[request_id] = Given(version, label, truth=truth)
        self._forget_the_oldest()

    def _forget_the_oldest(self) -> None:
        while len(self.answers) > MAX_ANSWERS:
            self.answers.popitem(last=False)

    def knows(self, request_id: str) -> bool:
        return request_id in self.answers

    def label(self, request_id: str, label: int) -> dict | None:
        """Feedback: the answer's true label, counted once however often it is sent (for the
        shadow's answer to the same request too). None for an id not known."""
        given = self.answers.get(request_id)
        if given is None:
            return None
        if given.truth is None:
            given.truth = label
            for version, predicted in (given.version, given.label), given.shadow or (None, None):
                if version is not None:
                    self.records[version].labelled += 1
                    self.records[version].correct += predicted == label
        return {"request_id": request_id, "model_version": given.version, "correct": given.label == label}

    def arm(self, version: str | None) -> Arm:
        return self.records[version].arm() if version in self.records else Arm()

    def summary(self) -> dict:
        return {v: r.summary() for v, r in self.records.items()}


def shadow_answers(model, images: np.ndarray, request_ids: list[str], tta, record) -> None:
    """A shadow's answers to a copy of the requests (on a compute thread, after the client
    got its own): each `record`ed, none ever sent to a client."""
    started = time.perf_counter()
    probabilities = model.predict(images, tta)
    latency_ms = (time.perf_counter() - started) * 1000
    for request_id, p in zip(request_ids, probabilities):
        label = int(np.argmax(p))
        record(Answer(request_id, model.version, label, float(p[label]), latency_ms, shadow=True))


class AnswerOutbox:
    """A replica's answers on their way to the Rollout deployment: sent in one call every
    FLUSH_S from a thread of their own, never on a request's path. When the Rollout
    deployment cannot keep up, answers beyond MAX_UNSENT are dropped and counted."""

    def __init__(self, rollout, stop: threading.Event):
        self.rollout, self.stop = rollout, stop
        self.unsent: list[Answer] = []
        self.dropped = 0
        threading.Thread(target=self._send_regularly, name="answers", daemon=True).start()

    def add(self, answer: Answer) -> None:
        if len(self.unsent) < MAX_UNSENT:
            self.unsent.append(answer)
        else:
            self.dropped += 1

    def flush(self) -> None:
        sending, self.unsent = self.unsent, []  # one swap: add() may run meanwhile on the event loop
        if sending:
            self.rollout.record.remote(sending)  # not awaited: Serve delivers it all the same

    def _send_regularly(self) -> None:
        while not self.stop.wait(FLUSH_S):
            try:
                self.flush()
            except Exception:
                logger.exception("sending answers to the Rollout deployment")
