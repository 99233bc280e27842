"""The model a Serve replica answers with: loaded, warmed up, and swapped when the champion moves.

What to serve (`source`):
- `models:/NAME@ALIAS` (the default, `models:/cifar10-classifier@champion`): the registry
  version the alias points to, followed: `follow` loads the versions the Rollout deployment
  names (rollout.py) beside the one being served, warmed up, and switches with one
  assignment when it says, so requests in flight finish on the model they started with and
  none fail. During a rollout, `route` picks the candidate for its share of the requests.
- `models:/NAME/VERSION`: one registry version, pinned.
- a checkpoint folder or URI: loaded once.

A version that fails to load leaves the current one serving; `error` says why, and the same
version is not tried again until the alias moves on.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cifar_ray.calibration import apply_temperature, temperature_of
from cifar_ray.config import IMAGE_SHAPE
from cifar_ray.errors import first_line
from cifar_ray.model_registry import REGISTRY_URI
from cifar_ray.tta import predict_with_tta, tta_of

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Loaded:
    """One loaded model, warmed up and ready to answer."""

    forward: Callable
    metadata: dict
    audit: dict | None  # the training audit (metrics.json) the checkpoint carries
    model_card: str | None  # its MODEL_CARD.md
    version: str  # the registry version number; for a checkpoint path, its last two folders

    def predict(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """uint8 NHWC images -> class probabilities, scaled by the checkpoint's temperature;
        with test-time augmentation (tta.py) if `tta`, or if None and the checkpoint says so."""
        def forward(x: np.ndarray) -> np.ndarray:
            return self.forward(x.astype(np.float32)).numpy()

        use_tta = tta_of(self.metadata) if tta is None else tta
        raw = predict_with_tta(forward, images) if use_tta else forward(images)
        return apply_temperature(raw, temperature_of(self.metadata))


def load(folder: Path, version: str) -> Loaded:
    """Load a checkpoint folder, trace its forward pass and run it once."""
    import tensorflow as tf

    from cifar_ray.checkpoint import load_checkpoint

    model, metadata = load_checkpoint(folder, compile=False)
    audit_file = folder / "metrics.json"  # written by training's audit (evaluate.py)
    audit = json.loads(audit_file.read_text()) if audit_file.is_file() else None
    card_file = folder / "MODEL_CARD.md"
    model_card = card_file.read_text() if card_file.is_file() else None
    forward = tf.function(lambda x: model(x, training=False),
                          input_signature=[tf.TensorSpec([None, *IMAGE_SHAPE], tf.float32)])
    forward(np.zeros((1, *IMAGE_SHAPE), np.float32))  # trace and warm up before taking traffic
    return Loaded(forward, metadata, audit, model_card, version)


class LiveModel:
    """What one replica serves now (`current`, and during a rollout `candidate`), kept in step
    with `source`: by `refresh`, or by the routes the Rollout deployment sends (`use`)."""

    def __init__(self, source: str, tracking_uri: str | None = None):
        self.source, self.tracking_uri = source, tracking_uri
        self.reference = REGISTRY_URI.match(source)
        self.current: Loaded | None = None
        self.candidate: Loaded | None = None
        self.percent, self.shadow = 0.0, False
        self.loaded: dict[str, Loaded] = {}  # registry versions ready to answer, current's included
        self.failed: dict[str, str] = {}  # versions that could not be loaded, and why: not tried again
        self.error = ""  # why the version `source` points to is not the one served ("" when it is)
        self._registry = None  # an MlflowClient, made on first use

    @property
    def follows_registry(self) -> bool:
        """True when `source` is an alias, whose version can change while serving."""
        return bool(self.reference and self.reference["alias"])

    def refresh(self) -> bool:
        """Serve what `source` points to now; True when a new model was swapped in."""
        try:
            version, location = self._resolve()
        except Exception as e:
            self._fail(None, f"cannot look up {self.source} in {self.tracking_uri} ({first_line(e)})")
            return False
        if self.current is not None and version == self.current.version:
            self.error = ""
            return False
        if version in self.failed:
            return False
        try:
            loaded = self._load(version, location)
        except Exception as e:
            what = f"version {version}" if self.reference else f"checkpoint {location}"
            self._fail(version, f"cannot load {what}: {first_line(e)}")
            return False
        self.current, self.error, self.failed = loaded, "", {}
        self.loaded[version] = loaded
        logger.info(f"serving {self.source}: version {version}")
        return True

    def load_versions(self, versions: list[str]) -> None:
        """Load, beside what is served, each registry version not loaded or tried yet."""
        for version in versions:
            if version in self.loaded or version in self.failed:
                continue
            try:
                location = self._registry_client().get_model_version(self.reference["name"], version).source
                self.loaded[version] = self._load(version, location)
                logger.info(f"loaded version {version}")
            except Exception as e:
                self.failed[version] = f"cannot load version {version}: {first_line(e)}"
                logger.error(self.failed[version])

    def follow(self, rollout, stop: threading.Event) -> None:
        """Load the versions the Rollout deployment (a handle to it) names, then answer as its
        routes say, switching when it tells every replica to (rollout.py). Runs until `stop`."""
        from cifar_ray.rollout import WATCH_S, Routes

        replica, generation = uuid.uuid4().hex, -1
        # A watch answers within WATCH_S; the 30 s more are for a Rollout replica that is busy.
        while not stop.is_set():
            try:
                news = rollout.watch.remote(replica, generation, sorted(self.tried)).result(timeout_s=WATCH_S + 30)
                self.load_versions(news["load"])
                if news["generation"] != generation:
                    self.use(Routes(**news["active"]), keep=set(news["load"]))
                    generation = news["generation"]
            except Exception:  # never let the follower die: the next watch tries again
                logger.exception("following the rollout")
                stop.wait(1.0)

    def route(self) -> tuple[Loaded, Loaded | None]:
        """(the model that answers a request, the shadow that answers a copy of it or None):
        during a canary the candidate answers `percent` of the requests."""
        if self.candidate is None:
            return self.current, None
        if self.shadow:
            return self.current, self.candidate
        return (self.candidate if random.random() * 100 < self.percent else self.current), None

    @property
    def tried(self) -> set[str]:
        """Versions loaded or found unloadable: nothing more to do for them."""
        return set(self.loaded) | set(self.failed)

    def use(self, routes, keep: set[str]) -> None:
        """Answer as `routes` (rollout.Routes) say, with the versions loaded; forget the loaded
        versions neither they nor `keep` name. A champion that could not be loaded leaves the
        current one serving and `error` saying why."""
        champion = self.loaded.get(routes.champion)
        if champion is not None:
            self.current, self.error = champion, ""
        elif routes.champion in self.failed:
            self.error = self.failed[routes.champion] + self._still_serving()
        self.candidate = self.loaded.get(routes.candidate)
        self.percent, self.shadow = routes.percent, routes.shadow
        keep = keep | routes.versions | {self.current.version if self.current else None}
        self.loaded = {v: m for v, m in self.loaded.items() if v in keep}
        self.failed = {v: why for v, why in self.failed.items() if v in keep}

    def _resolve(self) -> tuple[str, str]:
        """(version, where its checkpoint is) of what `source` names now."""
        if not self.reference:
            return "/".join(self.source.rstrip("/").split("/")[-2:]), self.source
        registry = self._registry_client()
        name, alias = self.reference["name"], self.reference["alias"]
        found = (registry.get_model_version_by_alias(name, alias) if alias
                 else registry.get_model_version(name, self.reference["version"]))
        return str(found.version), found.source

    def _registry_client(self):
        from cifar_ray.tracking import client

        self._registry = self._registry or client(self.tracking_uri)
        return self._registry

    def _load(self, version: str, location: str) -> Loaded:
        from cifar_ray.checkpoint import local_checkpoint

        if not self.reference:
            with local_checkpoint(location) as folder:
                return load(folder, version)
        from cifar_ray.tracking import download

        with tempfile.TemporaryDirectory(prefix="cifar-ray-serve-") as tmp:
            return load(download(self.tracking_uri, location, tmp), version)

    def _fail(self, version: str | None, reason: str) -> None:
        """`refresh` could not serve what `source` names: say why once, and do not try that
        version again until the alias has moved on (a failed lookup forgets it)."""
        if reason + self._still_serving() != self.error:  # once, not at every poll
            logger.error(reason + self._still_serving())
        self.error, self.failed = reason + self._still_serving(), {version: reason} if version else {}

    def _still_serving(self) -> str:
        return f"; still serving version {self.current.version}" if self.current else ""
