"""Evaluate a checkpoint on any data source, as a Ray Data batch job.

    python -m cifar_ray.evaluate --checkpoint runs/NAME/epoch_0020 --data ../shared/data/cifar10/train
    python -m cifar_ray.evaluate --checkpoint s3://bucket/runs/NAME/epoch_0020 --data cifar10 --out report/

A pool of model actors predicts every row of --data (for `cifar10`, the test split);
the driver turns the predictions into metrics and prints them as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cifar_ray.checkpoint import load_checkpoint, local_checkpoint


class Predictor:
    """A Ray Data actor holding one loaded model: a batch of images -> class probabilities."""

    def __init__(self, checkpoint: str):
        with local_checkpoint(checkpoint) as directory:
            self.model, self.metadata = load_checkpoint(directory, compile=False)

    def __call__(self, batch: dict) -> dict:
        probabilities = self.model.predict_on_batch(batch["image"])
        return {"label": batch["label"], "probabilities": np.asarray(probabilities, np.float32)}


def predict_dataset(ds, checkpoint: str, num_actors: int = 1, batch_size: int = 512):
    """Lazily map a dataset of images to (label, probabilities) rows."""
    return ds.map_batches(Predictor, fn_constructor_kwargs={"checkpoint": checkpoint},
                          concurrency=num_actors, batch_size=batch_size, batch_format="numpy")


def collect_predictions(ds) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of a predicted dataset, gathered on the driver."""
    labels, probabilities = [], []
    for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        labels.append(batch["label"])
        probabilities.append(batch["probabilities"])
    if not labels:
        raise ValueError("the evaluation data has no rows")
    return np.concatenate(labels), np.concatenate(probabilities)


def compute_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    eps = 1e-7
    true_class_p = probabilities[np.arange(len(labels)), labels]
    return {
        "examples": int(len(labels)),
        "accuracy": float(np.mean(probabilities.argmax(1) == labels)),
        "loss": float(np.mean(-np.log(np.clip(true_class_p, eps, 1.0)))),
    }


def evaluate(checkpoint: str, data: str, num_actors: int = 1) -> dict:
    from cifar_ray.cli import init_ray
    from cifar_ray.data import read_source

    with local_checkpoint(checkpoint) as directory:  # fail fast, before starting Ray
        load_checkpoint(directory, compile=False)
    init_ray()
    ds = read_source(data, split="test")
    labels, probabilities = collect_predictions(predict_dataset(ds, checkpoint, num_actors))
    return {"checkpoint": checkpoint, "data": data, **compute_metrics(labels, probabilities)}


def main(argv: list[str] | None = None) -> None:
    from cifar_ray.cli import run_cli

    parser = argparse.ArgumentParser(prog="python -m cifar_ray.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or URI")
    parser.add_argument("--data", required=True,
                        help="'cifar10' (its test split), 'synthetic', a Parquet folder/URI or an image folder")
    parser.add_argument("--out", help="also write metrics.json into this folder")
    parser.add_argument("--num-actors", type=int, default=1, help="model replicas predicting in parallel")
    args = parser.parse_args(argv)

    def run() -> None:
        metrics = evaluate(args.checkpoint, args.data, args.num_actors)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps(metrics, indent=2))

    run_cli(run)


if __name__ == "__main__":
    main()
