"""Batch inference: predict every row of a data source and write Parquet.

    python -m cifar_ray.predict --checkpoint runs/best --data ../shared/data/cifar10/train --out predictions/

A pool of model actors (the same `Predictor` as evaluate.py) runs over the source with
Ray Data; each output row holds the label from the source, the predicted class index and
name, its confidence, and all class probabilities.
"""

from __future__ import annotations

import numpy as np

from cifar_ray import storage
from cifar_ray.config import CLASS_NAMES


def to_prediction_rows(batch: dict) -> dict:
    probabilities = batch["probabilities"]
    predicted = probabilities.argmax(1)
    return {
        "label": batch["label"],
        "predicted": predicted,
        "predicted_class": np.array([CLASS_NAMES[i] for i in predicted]),
        "confidence": probabilities.max(1),
        "probabilities": probabilities,
    }


def predict(checkpoint: str, data: str, out: str, num_actors: int = 1) -> int:
    """Write predictions for every row of `data` as Parquet under `out`; return the row count."""
    from cifar_ray.evaluate import open_source_for, predict_dataset

    predictions = predict_dataset(open_source_for(checkpoint, data), checkpoint, num_actors)
    predictions = predictions.map_batches(to_prediction_rows, batch_format="numpy").materialize()
    predictions.write_parquet(storage.absolute(out))
    return predictions.count()


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    from cifar_ray.cli import parse_args, run_cli

    args = parse_args("predict", argv, prog)
    run_cli(lambda: print(f"wrote {predict(args.checkpoint, args.data, args.out, args.num_actors)} "
                          f"predictions to {args.out}"))


if __name__ == "__main__":
    main()
