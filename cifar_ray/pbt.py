"""How a trial trains under Population Based Training (`cifar-ray tune --scheduler pbt`).

PBT copies trials: every few epochs a trial in the bottom quarter stops, takes a top
trial's latest checkpoint and perturbed settings, and goes on from there. Tune does the
bookkeeping, from checkpoints reported to it. A trial here is one or more Ray Train runs
("parts"), each started from the checkpoint Tune hands the trial, and every epoch's
checkpoint goes to Tune as it is saved (Ray's TuneReportCallback reports only its path).
The search space is search.py's, and so is the scheduler, PBT without a step at the last
epoch (NoStepAtTheEnd, here because it needs Ray Tune imported).
"""

from __future__ import annotations

import threading
from pathlib import Path

from ray import tune
from ray.train import UserCallback
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.util.queue import Empty, Queue

from cifar_ray.checkpoint import read_metadata
from cifar_ray.config import Config
from cifar_ray.data import DataInfo
from cifar_ray.run_folder import checkpoints_of
from cifar_ray.storage import replace_folder, subfolders
from cifar_ray.train import make_trainer


def fit_pbt_part(cfg: Config, train, val, info: DataInfo, logger) -> tuple[Config, tuple[str, str, str]]:
    """One part of a PBT trial: a Ray Train run from the checkpoint Tune hands the trial (its
    own when resumed; after an exploit step, the better trial's it copies), in its own folder
    <trial>/part_N. Every epoch goes to Tune with its checkpoint, for others to copy.

    Returns the part's config and (run folder, latest checkpoint, best checkpoint).
    """
    start, history, origin = tune.get_checkpoint(), [], "from scratch"
    if start is not None:
        with start.as_directory() as directory:
            metadata = read_metadata(directory)
        history = metadata["history"]
        origin = f"from trial {Path(metadata['config']['run']['storage_path']).name}'s epoch {len(history)}"
    # A new folder for every part: Ray Train resumes a run folder it finds from that run's
    # own checkpoints, not from the one handed over.
    part = cfg.with_overrides({"storage_path": cfg.run_dir,
                               "name": f"part_{len(subfolders(cfg.run_dir, 'part_')[1]) + 1}"})
    print(f"trial {cfg.run.name}, {part.run.name}: {origin}, lr {cfg.train.lr:.3g}, "
          f"weight decay {cfg.train.weight_decay:.3g}", flush=True)
    # Handed its last epoch (a trial resumed after its final report): that checkpoint is the part.
    if len(history) >= cfg.train.epochs:
        checkpoint = f"{part.run_dir}/epoch_{len(history):04d}"
        with start.as_directory() as directory:
            replace_folder(str(directory), checkpoint)
        tune.report({**history[-1], "checkpoint_path": checkpoint})
        return part, (part.run_dir, checkpoint, checkpoint)
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = make_trainer(part, train, val, info, callbacks=(logger, ReportToTrial(queue)), start_from=start)
    return part, checkpoints_of(fit_reporting_to_tune(trainer, queue))


class ReportToTrial(UserCallback):
    """Runs in Ray Train's controller: hands each epoch's metrics and checkpoint path to the
    trial's process (fit_reporting_to_tune), waiting until it took the last one. Ray's
    TuneReportCallback passes the path only as a metric, and PBT copies Tune checkpoints."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put((metrics[0], checkpoint.path if checkpoint else None))


def fit_reporting_to_tune(trainer, queue):
    """trainer.fit() in a thread while this one, the trial's, reports each epoch to Tune with
    its checkpoint (tune.report must run in the trial's thread); fit's result or error."""
    outcome = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive() or not queue.empty():
        try:
            metrics, path = queue.get(timeout=1)
        except Empty:
            continue
        checkpoint = tune.Checkpoint.from_directory(path) if path else None
        tune.report({**metrics, "checkpoint_path": path}, checkpoint=checkpoint)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class NoStepAtTheEnd(PopulationBasedTraining):
    """Tune's PopulationBasedTraining, without a copy-and-perturb step at the last epoch.

    Tune perturbs at every multiple of the interval, the last epoch included. A trial copied
    there has no epoch left to train: it ends as a copy of another trial's final checkpoint,
    and its leaderboard row shows that accuracy beside settings it never trained with. Under
    --pbt-sync, every trial that got there first would also pause and restart for nothing.
    """

    def __init__(self, last_epoch: int, time_attr: str = "epoch", **kwargs):
        super().__init__(time_attr=time_attr, **kwargs)
        self.last_epoch, self.epoch_attr = last_epoch, time_attr

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self.epoch_attr, 0) >= self.last_epoch:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)
