"""Experiment tracking on MLflow: every training run and Tune trial is an MLflow run.

Where runs go: --tracking-uri, else MLflow's own MLFLOW_TRACKING_URI (a shared server on a
cluster), else an embedded store beside the runs that needs no server:
sqlite:///<storage-path>/mlflow.db, with artifacts in <storage-path>/mlartifacts. Look at it with

    mlflow ui --backend-store-uri sqlite:///runs/mlflow.db

A run logs its config as params when it starts, its metrics as each epoch is reported
(`EpochLogger`, a Ray Train callback), and its curves, history, summary and audit when it
ends. Rerunning a --name reopens its MLflow run, so a resumed run stays one run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
from pathlib import Path

from ray.train import UserCallback
from ray.tune import Callback

from cifar_ray.config import Config, flatten
from cifar_ray.errors import TrackingUnavailable, first_line
from cifar_ray.storage import is_uri

EXPERIMENT = "cifar-ray"
RUN_TAG = "cifar_ray.run"  # the cifar-ray run name, to find a run again on resume
KIND_TAG = "cifar_ray.kind"  # train, tune, trial or register
ARTIFACTS = ("summary.json", "history.csv", "curves.png", "MODEL_CARD.md", "metrics.json",
             "confusion_matrix.png", "per_class.png", "reliability.png", "errors.png",
             "leaderboard.csv", "leaderboard.md", "comparison.png")


def tracking_uri(cfg: Config) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else sqlite beside the runs."""
    if cfg.registry.tracking_uri:
        return cfg.registry.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    storage = cfg.run.storage_path
    if is_uri(storage):
        raise ValueError(f"--storage-path {storage} is remote, so the embedded MLflow store cannot live "
                         "beside it: point --tracking-uri or MLFLOW_TRACKING_URI at an MLflow server")
    return f"sqlite:///{Path(storage).expanduser().resolve()}/mlflow.db"


def client(uri: str):
    """An MlflowClient for `uri`, with MLflow's start-up logging and long retries turned down."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a down server fails in seconds
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_reachable(uri: str) -> None:
    """Fail before training, not after, when runs could not be tracked."""
    try:
        experiment_id(client(uri), uri)
    except Exception as e:
        raise TrackingUnavailable(f"cannot reach the MLflow tracking store {uri} ({first_line(e)})") from None


def experiment_id(mlflow_client, uri: str) -> str:
    """The `cifar-ray` experiment, created on first use; an embedded store keeps its
    artifacts beside mlflow.db rather than in the working directory."""
    experiment = mlflow_client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
    return mlflow_client.create_experiment(EXPERIMENT, artifact_location=location)


def start_run(uri: str, cfg: Config, kind: str, parent_run_id: str | None = None) -> str:
    """Open the MLflow run of the cifar-ray run cfg.run.name (reopen it when resuming)."""
    from mlflow.entities import Param

    c = client(uri)
    exp = experiment_id(c, uri)
    existing = c.search_runs([exp], filter_string=f"tags.`{RUN_TAG}` = '{cfg.run.name}' "
                                                  f"and tags.`{KIND_TAG}` = '{kind}'", max_results=1)
    if existing:
        run_id = existing[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id
    tags = {"mlflow.runName": cfg.run.name, RUN_TAG: cfg.run.name, KIND_TAG: kind}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if git_commit():
        tags["mlflow.source.git.commit"] = git_commit()
    run_id = c.create_run(exp, run_name=cfg.run.name, tags=tags).info.run_id
    params = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(cfg.to_dict()).items())]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per call
        c.log_batch(run_id, params=params[i:i + 100])
    return run_id


def log_data_info(uri: str, run_id: str, info) -> None:
    """What the run trained on: source, sizes and the data fingerprint (a DataInfo)."""
    c = client(uri)
    for key in ("source", "num_train", "num_val", "num_holdout", "fingerprint", "skipped_rows"):
        c.set_tag(run_id, f"data.{key}", str(getattr(info, key)))


def log_epoch(uri: str, run_id: str, metrics: dict) -> None:
    """One epoch's numbers, at step = epoch."""
    import time

    from mlflow.entities import Metric

    now, step = int(time.time() * 1000), int(metrics["epoch"])
    client(uri).log_batch(run_id, metrics=[
        Metric(k, float(v), now, step) for k, v in metrics.items()
        if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)])


def unlogged_epochs(uri: str, run_id: str, history: list[dict]) -> list[dict]:
    """The epochs of `history` that the run has no metrics for."""
    logged = {m.step for m in client(uri).get_metric_history(run_id, "loss")}
    return [row for row in history if int(row["epoch"]) not in logged]


def history_of(checkpoint) -> list[dict]:
    """Every epoch's metrics so far, from a Ray Train checkpoint's metadata.json (local or
    remote storage alike; the model stays where it is)."""
    import json

    from cifar_ray.checkpoint import METADATA_FILE

    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{METADATA_FILE}") as f:
        return json.loads(f.read())["history"]


def log_outputs(uri: str, run_id: str, folder: str) -> None:
    """The files of a run folder (local or URI) that people look at, as the run's artifacts."""
    import tempfile

    from cifar_ray.storage import read_file

    c = client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ARTIFACTS:
            try:
                data = read_file(folder, name)
            except (FileNotFoundError, OSError):
                continue
            Path(tmp, name).write_bytes(data)
        c.log_artifacts(run_id, tmp)


def download(uri: str, artifact_uri: str, destination: str) -> Path:
    """Fetch artifacts (a version's checkpoint, an evaluation set) from the store at `uri`."""
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=destination,
                                                    tracking_uri=uri))


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status)


def close_trial_runs(uri: str, parent_run_id: str, failed: dict[str, bool]) -> None:
    """Set each trial's run status from Tune's verdict ({trial id: failed}). Tune stops
    trials from outside (ASHA, and at max_t), which a trial's own run sees as an error."""
    c = client(uri)
    parent = c.get_run(parent_run_id)
    for child in c.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"):
        trial = child.data.tags.get(RUN_TAG)
        if trial in failed:
            c.set_terminated(child.info.run_id, "FAILED" if failed[trial] else "FINISHED")


@contextlib.contextmanager
def run_status(uri: str, run_id: str):
    """Mark the MLflow run FINISHED when the body ends, FAILED or KILLED when it raises."""
    try:
        yield
    except BaseException as e:
        try:
            end_run(uri, run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        except Exception:
            pass  # the store is what failed: the body's error says more
        raise
    end_run(uri, run_id)


@functools.cache
def git_commit() -> str | None:
    """The commit of the cifar-ray checkout this runs from, when it is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


class EpochLogger(UserCallback):
    """Logs every epoch's metrics to the MLflow run as Ray Train reports them.

    Runs in Ray Train's controller, so it carries the URI and run id, not a client. A Tune
    trial's logger carries the trial's Config and its parent run instead, and opens the
    trial's run (or reopens it, when resumed) at the first epoch: the trial's own process
    then never imports mlflow, which costs 2-3 s of every trial. A tracking store that stops
    answering costs a warning, never the training run.
    """

    def __init__(self, uri: str, run_id: str | None = None, trial: Config | None = None,
                 parent_run_id: str | None = None):
        self.uri, self.run_id, self.trial, self.parent_run_id, self.warned = uri, run_id, trial, parent_run_id, False
        self.first_report = True

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics or "epoch" not in metrics[0]:
            return
        try:
            if self.run_id is None:
                self.run_id = start_run(self.uri, self.trial, kind="trial", parent_run_id=self.parent_run_id)
            log_epoch(self.uri, self.run_id, metrics[0])  # first: whatever the catch-up below meets
            resumed = self.first_report and metrics[0]["epoch"] > 1 and checkpoint is not None
            self.first_report = False
            if resumed:
                # A crash between an epoch's checkpoint and its log kept that epoch from
                # MLflow. The checkpoint's history holds every epoch so far.
                for epoch in unlogged_epochs(self.uri, self.run_id, history_of(checkpoint)):
                    log_epoch(self.uri, self.run_id, epoch)
        except Exception as e:
            if not self.warned:
                print(f"warning: cannot log metrics to MLflow ({first_line(e)}); training goes on",
                      flush=True)
                self.warned = True


class TrialRuns(Callback):
    """The rest of Tune trials' tracking, from the experiment's driver (mlflow is imported
    there already): a finished trial's files go to its run, which ends FINISHED (also when a
    scheduler stopped it early), and an errored trial's run ends FAILED (opened first, if the
    trial failed before its first epoch). `trial_cfg(config, trial_id)` is a trial's Config."""

    def __init__(self, uri: str, parent_run_id: str, trial_cfg):
        self.uri, self.parent_run_id, self.trial_cfg = uri, parent_run_id, trial_cfg

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._open(trial)
        # the files sit beside the checkpoints of the trial's last Ray Train run
        checkpoint = (trial.last_result or {}).get("checkpoint_path")
        if checkpoint:
            log_outputs(self.uri, run_id, checkpoint.rsplit("/", 1)[0])
        end_run(self.uri, run_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        end_run(self.uri, self._open(trial), "FAILED")

    def _open(self, trial) -> str:
        return start_run(self.uri, self.trial_cfg(trial.config, trial.trial_id), kind="trial",
                         parent_run_id=self.parent_run_id)
