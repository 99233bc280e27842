"""Evaluate a checkpoint on any data source, as a Ray Data batch job, and audit it.

    python -m cifar_ray.evaluate --checkpoint runs/NAME/epoch_0020 --data ../shared/data/cifar10/train
    python -m cifar_ray.evaluate --checkpoint s3://bucket/runs/NAME/epoch_0020 --data cifar10 --out report/

A pool of model actors predicts every row of --data (for `cifar10`, its test split); up to
IN_DRIVER_ROWS rows with one actor asked for, the driver predicts them itself, which starts
faster. The driver turns the predictions into metrics and prints them as JSON. With --out
it also writes the audit: metrics.json, confusion_matrix.png, per_class.png,
reliability.png, errors.png and MODEL_CARD.md.
"""

from __future__ import annotations

import heapq
import itertools
import json

import numpy as np

from cifar_ray import report
from cifar_ray.calibration import TEMPERATURE_KEY, apply_temperature, cross_fitted, fit_temperature, temperature_of
from cifar_ray.checkpoint import METADATA_FILE, load_checkpoint, local_checkpoint, read_metadata
from cifar_ray.drift import REFERENCE_KEY, reference_of
from cifar_ray.storage import write_file
from cifar_ray.tta import predict_with_tta, tta_of

ERRORS_SHOWN = 16
# Up to this many rows are scored by the driver itself, not by a pool of model actors: a
# pool costs 5-6 s to start (a process, TensorFlow, the model), and the driver scored
# 10,000 images 2-5x faster than one actor (benchmarks/scoring.py, benchmarks/README.md).
IN_DRIVER_ROWS = 10_000


class Predictor:
    """A Ray Data actor holding one loaded model: a batch of images -> class probabilities,
    scaled by the checkpoint's temperature (calibration.py) unless `raw`.

    With `tta` (None: as the checkpoint says), each image's six views (tta.py) are combined
    before the temperature is applied, as the temperature was fitted.
    """

    def __init__(self, checkpoint: str, tta: bool | None = None, raw: bool = False):
        with local_checkpoint(checkpoint) as directory:
            self.model, metadata = load_checkpoint(directory, compile=False)
        self.tta = tta_of(metadata) if tta is None else tta
        self.temperature = 1.0 if raw else temperature_of(metadata)

    def __call__(self, batch: dict) -> dict:
        images = batch["image"]
        raw = predict_with_tta(self.predict, images) if self.tta else self.predict(images)
        return {**batch, "probabilities": apply_temperature(raw, self.temperature)}

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(images), np.float32)


def predict_dataset(ds, checkpoint: str, num_actors: int = 1, batch_size: int = 512, tta: bool | None = None,
                    raw: bool = False):
    """Lazily add a `probabilities` column to a dataset of images and labels."""
    import ray.data

    return ds.map_batches(Predictor, fn_constructor_kwargs={"checkpoint": checkpoint, "tta": tta, "raw": raw},
                          compute=ray.data.ActorPoolStrategy(size=num_actors), batch_size=batch_size,
                          batch_format="numpy")


class Collected:
    """What evaluation keeps of predicted batches: labels and probabilities of every row,
    images only for the running top `errors_kept` confidently wrong predictions."""

    def __init__(self, errors_kept: int = ERRORS_SHOWN):
        self.errors_kept = errors_kept
        self.labels, self.probabilities, self.worst = [], [], []
        self.order = itertools.count()  # breaks confidence ties without comparing dicts

    def add(self, batch: dict) -> None:
        self.labels.append(batch["label"])
        self.probabilities.append(batch["probabilities"])
        predicted = batch["probabilities"].argmax(1)
        confidence = batch["probabilities"].max(1)
        for i in np.flatnonzero(predicted != batch["label"]):
            item = (float(confidence[i]), next(self.order),
                    {"image": batch["image"][i], "label": int(batch["label"][i]),
                     "predicted": int(predicted[i]), "probabilities": batch["probabilities"][i]})
            heapq.heappush(self.worst, item)
            if len(self.worst) > self.errors_kept:
                heapq.heappop(self.worst)

    def result(self):
        """(labels, probabilities, most confident errors first)."""
        if not self.labels:
            raise ValueError("the evaluation data has no rows")
        errors = [e for _, _, e in sorted(self.worst, key=lambda t: -t[0])]
        return np.concatenate(self.labels), np.concatenate(self.probabilities), errors


def collect_predictions(ds, errors_kept: int = ERRORS_SHOWN, total: int | None = None):
    """(labels, probabilities, most confident errors) of a predicted dataset. Progress goes
    to stderr, towards `total` rows when it is known."""
    return collect_parts(ds.iter_batches(batch_size=4096, batch_format="numpy"), 1, errors_kept, total)[0]


def collect_parts(batches, num_parts: int, errors_kept: int = ERRORS_SHOWN, total: int | None = None) -> list:
    """collect_predictions for each part of predicted batches whose `part` column
    (0..num_parts-1) says which dataset a row came from; batches without it are one part."""
    from cifar_ray.progress import Progress

    parts = [Collected(errors_kept) for _ in range(num_parts)]
    progress = Progress("evaluate", total)
    for batch in batches:
        progress.update(len(batch["label"]))
        if "part" not in batch:
            parts[0].add(batch)
            continue
        for i, collected in enumerate(parts):
            rows = batch["part"] == i
            if rows.any():
                collected.add({k: v[rows] for k, v in batch.items()})
    progress.close()
    return [collected.result() for collected in parts]


def _tag_part(batch: dict, part: int) -> dict:
    return {"image": batch["image"], "label": batch["label"], "part": np.full(len(batch["label"]), part, np.int8)}


def evaluate_dataset(ds, checkpoint: str, data: dict, outs: tuple[str, ...] = (),
                     num_actors: int = 1, tta: bool | None = None, total: int | None = None) -> dict:
    """Metrics of `checkpoint` on `ds` (`total` rows, if known); the full audit is written
    into each folder of `outs`.

    `data` describes what `ds` is, for the model card: {"source": ..., "split": ...}.
    """
    return evaluate_datasets(checkpoint, [(ds, data, outs)], num_actors, tta, total)[0]


def evaluate_datasets(checkpoint: str, parts: list[tuple], num_actors: int = 1, tta: bool | None = None,
                      total: int | None = None, calibrate: bool = False) -> list[dict]:
    """evaluate_dataset for each (ds, data, outs) of `parts`, in one pass of the model
    (predicted_batches): the checkpoint is loaded once, however many datasets it is scored on
    (the end of a training run audits on the validation split and scores on the gate's
    evaluation set).

    With `calibrate` (the end of a training run), the first part fits the checkpoint's
    temperature, which is stored in its metadata.json before any part is audited. `tta`
    None scores as the checkpoint says (tta.py).
    """
    with local_checkpoint(checkpoint) as directory:
        metadata = read_metadata(directory)
    tta = tta_of(metadata) if tta is None else tta
    ds = parts[0][0]
    if len(parts) > 1:  # one stream, each row tagged with the dataset it came from
        tagged = [ds.map_batches(_tag_part, fn_kwargs={"part": i}, batch_format="numpy")
                  for i, (ds, _, _) in enumerate(parts)]
        ds = tagged[0].union(*tagged[1:])
    batches = predicted_batches(ds, checkpoint, num_actors, tta, raw=calibrate, total=total)
    collected = collect_parts(batches, len(parts), total=total)
    calibration = None
    if calibrate:
        metadata, calibration = calibrate_checkpoint(checkpoint, metadata, *collected[0][:2])
        collected = [calibrated(result, metadata) for result in collected]
    return [audit(checkpoint, metadata, data, outs, tta, *result, calibration=calibration if i == 0 else None)
            for i, ((_, data, outs), result) in enumerate(zip(parts, collected))]


def predicted_batches(ds, checkpoint: str, num_actors: int, tta: bool, raw: bool, total: int | None):
    """The dataset's batches with a `probabilities` column. Up to IN_DRIVER_ROWS rows and
    one actor asked for, this process scores them itself; else a pool of model actors."""
    if num_actors == 1 and total is not None and total <= IN_DRIVER_ROWS:
        predictor = Predictor(checkpoint, tta, raw)
        return map(predictor, ds.iter_batches(batch_size=512, batch_format="numpy"))
    return predict_dataset(ds, checkpoint, num_actors, tta=tta, raw=raw).iter_batches(
        batch_size=4096, batch_format="numpy")


def calibrate_checkpoint(checkpoint: str, metadata: dict, labels: np.ndarray,
                         raw: np.ndarray) -> tuple[dict, dict]:
    """Fit the temperature on (labels, raw probabilities) and store it in the checkpoint's
    metadata.json, with the drift reference of the calibrated answers (drift.py). Returns
    (the new metadata, what calibration did to the ECE)."""
    temperature = fit_temperature(labels, raw)
    reference = reference_of(apply_temperature(raw, temperature))  # what Serve's answers look like (drift.py)
    if metadata.get(TEMPERATURE_KEY) != temperature or metadata.get(REFERENCE_KEY) != reference:
        metadata = {**metadata, TEMPERATURE_KEY: temperature, REFERENCE_KEY: reference}
        write_file(checkpoint, METADATA_FILE, json.dumps(metadata, indent=2).encode())
    return metadata, {
        "temperature": temperature,
        "ece_before": report.expected_calibration_error(labels, raw),
        "ece_cross_fitted": report.expected_calibration_error(labels, cross_fitted(labels, raw)),
    }


def calibrated(result: tuple, metadata: dict) -> tuple:
    """(labels, probabilities, errors) with the checkpoint's temperature applied."""
    labels, probabilities, errors = result
    temperature = temperature_of(metadata)
    errors = [{**e, "probabilities": apply_temperature(e["probabilities"][None], temperature)[0]} for e in errors]
    return labels, apply_temperature(probabilities, temperature), errors


def audit(checkpoint: str, metadata: dict, data: dict, outs: tuple[str, ...], tta: bool,
          labels: np.ndarray, probabilities: np.ndarray, errors: list, calibration: dict | None = None) -> dict:
    """The metrics of one evaluated dataset; with `outs`, the audit's files in each folder.
    `calibration`: what fitting the temperature on this dataset did (calibrate_checkpoint)."""
    class_names = metadata["class_names"]
    metrics = report.compute_metrics(labels, probabilities, class_names)
    result = {"checkpoint": checkpoint, "data": data, "tta": tta, "temperature": temperature_of(metadata),
              **metrics, **({"calibration": calibration} if calibration else {})}
    if outs:
        files = {
            "metrics.json": json.dumps(result, indent=2).encode(),
            "confusion_matrix.png": report.plot_confusion_matrix(metrics, class_names),
            "per_class.png": report.plot_per_class_accuracy(metrics, class_names),
            "reliability.png": report.plot_reliability(labels, probabilities, metrics["ece"],
                                                       calibration["ece_before"] if calibration else None),
            "errors.png": report.plot_errors(errors, class_names),
            "MODEL_CARD.md": report.model_card(result, metadata, checkpoint, data).encode(),
        }
        for out in outs:
            for name, content in files.items():
                write_file(out, name, content)
    return result


def open_source_for(checkpoint: str, data: str):
    """Check the checkpoint and the source, start Ray, and open the source's rows.

    The checks come first, so a bad path fails in a second rather than after Ray starts.
    """
    from cifar_ray.cli import init_ray
    from cifar_ray.data import check_source, read_source

    with local_checkpoint(checkpoint) as directory:
        load_checkpoint(directory, compile=False)
    check_source(data)
    init_ray()
    return read_source(data, split="test")


def evaluate(checkpoint: str, data: str, out: str | None = None, num_actors: int = 1,
             tta: bool | None = None) -> dict:
    import ray.data

    from cifar_ray.data import count_rows

    # collect_predictions shows the progress; a dataset takes the setting when it is made
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = open_source_for(checkpoint, data)
    split = "CIFAR-10 test split" if data == "cifar10" else "all rows"
    return evaluate_dataset(ds, checkpoint, {"source": data, "split": split},
                            (out,) if out else (), num_actors, tta, total=count_rows(data))


def summary_line(metrics: dict) -> dict:
    """The headline numbers printed to stdout (metrics.json has everything)."""
    keys = ("checkpoint", "data", "tta", "examples", "accuracy", "loss", "top5_accuracy",
            "mean_class_accuracy", "worst_class", "worst_class_accuracy", "ece", "temperature")
    return {k: metrics[k] for k in keys}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    from cifar_ray.cli import parse_args, run_cli

    args = parse_args("evaluate", argv, prog)
    run_cli(lambda: print(json.dumps(summary_line(evaluate(args.checkpoint, args.data, args.out,
                                                             args.num_actors, args.tta)), indent=2)))


if __name__ == "__main__":
    main()
