"""The gate's fixed evaluation set: which images every version is scored on, and the scoring.

The set is --eval-data; else the current champion's, fetched from the registry where its
first version stored it; else, for a first version, the images held out of the training
source by a hash of their pixels (split.in_holdout), which no run trains on. Its
fingerprint travels with every score, so the gate never compares scores from two sets.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from cifar_ray import tracking
from cifar_ray.config import RegistryConfig
from cifar_ray.errors import RegistryError
from cifar_ray.gate import Scores


@dataclass
class EvalSet:
    """The gate's evaluation set: decoded images in Ray's object store, and where it is kept."""

    dataset: object
    fingerprint: str
    description: str
    uri: str | None = None  # its artifact URI once the registry keeps a copy


def choose_eval_set(cfg: RegistryConfig, tracking_uri: str, champion, holdout=None, source: str = "") -> EvalSet:
    """--eval-data, else the champion's evaluation set, else `holdout` (held out of `source`)."""
    from cifar_ray.data import read_source
    from cifar_ray.split import data_fingerprint

    if cfg.eval_data:
        ds = read_source(cfg.eval_data, split="test").materialize()
        return EvalSet(ds, data_fingerprint(ds), f"--eval-data {cfg.eval_data}")
    if champion is not None and champion.tags.get("eval_set_uri"):
        with tempfile.TemporaryDirectory(prefix="cifar-ray-evalset-") as tmp:
            ds = read_source(str(tracking.download(tracking_uri, champion.tags["eval_set_uri"], tmp))).materialize()
        fingerprint = data_fingerprint(ds)
        if fingerprint != champion.tags.get("eval_set"):
            raise RegistryError(f"the champion's evaluation set at {champion.tags['eval_set_uri']} has changed "
                                f"(fingerprint {fingerprint}, registered {champion.tags.get('eval_set')})")
        return EvalSet(ds, fingerprint, champion.tags.get("eval_set_description", ""), champion.tags["eval_set_uri"])
    if holdout is None or holdout.count() == 0:
        raise RegistryError("no evaluation set for a first version: pass --eval-data")
    return EvalSet(holdout, data_fingerprint(holdout),
                   f"{holdout.count()} images held out of {source} by pixel hash, never trained on")


def write_eval_set(ds, folder: Path) -> None:
    """The evaluation set as a Parquet folder in the input schema (image: PNG bytes, label)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cifar_ray.images import encode_png

    images, labels = [], []
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        images += [encode_png(x) for x in batch["image"]]
        labels += [int(y) for y in batch["label"]]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": images, "label": pa.array(labels, pa.int64())}), folder / "part-0.parquet")


def score(checkpoint: str, eval_set: EvalSet) -> Scores:
    return audit_and_score(checkpoint, eval_set, audit=None)[1]


def audit_and_score(checkpoint: str, eval_set: EvalSet, audit: tuple | None) -> tuple[dict | None, Scores]:
    """(the audit's metrics, the gate's scores): `audit` is evaluate_dataset's (ds, data,
    outs) for the checkpoint's own audit on the validation split, done in the same model
    pass as the scoring. Its images first fit the checkpoint's temperature (calibration.py):
    the audit and the scores are of calibrated probabilities."""
    from cifar_ray.evaluate import evaluate_datasets

    scoring = (eval_set.dataset, {"source": eval_set.description, "split": "all rows"}, ())
    parts = [audit, scoring] if audit else [scoring]
    *audited, scored = evaluate_datasets(checkpoint, parts, total=sum(ds.count() for ds, _, _ in parts),
                                         calibrate=audit is not None)
    return (audited[0] if audited else None), Scores.from_metrics(eval_set.fingerprint, scored)
