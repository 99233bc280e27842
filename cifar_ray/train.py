"""Distributed data-parallel training of a CIFAR-10 Keras model with Ray Train.

    python -m cifar_ray.train                                   # local Ray, Keras CIFAR-10
    python -m cifar_ray.train --data ../shared/data/cifar10/train --num-workers 2 --epochs 2
    ray job submit --working-dir . -- python -m cifar_ray.train --num-workers 4 --use-gpu

The driver reads, decodes and splits the data once with Ray Data, then Ray Train
runs `train_loop_per_worker` (train_loop.py's loop) on every worker under MultiWorkerMirroredStrategy. Each epoch
every worker streams its shard of freshly augmented images, and rank 0 reports metrics
and a self-describing checkpoint. Rerunning with the same --name resumes from the latest
checkpoint; a dead worker restarts the group from it (up to --max-failures).

A run folder <storage-path>/<name>/ (run_folder.py) ends with summary.json, history.csv,
curves.png and the Ray Train checkpoints (the best --keep-checkpoints by validation
accuracy). What every run does before and after training, tracking in MLflow, the best
checkpoint's audit and its registration through the promotion gate, is lifecycle.py's.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict

from cifar_ray.config import Config
from cifar_ray.augment import AUGMENT_TASK_CPUS
from cifar_ray.data import DataInfo, shuffle_every_epoch, training_steps_per_epoch
from cifar_ray.run_folder import (SCORE_METRIC, checkpoints_of, finished_run_checkpoints, resolve_run, with_global_batch,
                                  write_run_outputs)

# Ray Train's controller takes one report per poll of its workers, every 2 s by default, and
# a run ends once every report is taken: with epochs shorter than that, each run's end waited
# 4-7 s for the backlog (2 s after). Polling every 0.5 s costs a few small RPCs a second.
CONTROLLER_POLL_S = "0.5"  # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, unless the user set it


def plan_resources(cfg: Config, cluster_cpus: float) -> tuple[float, int]:
    """(CPUs reserved per worker, TF threads per worker).

    Ray Data's augmentation tasks need CPUs the workers have not reserved, or streaming
    waits forever; so by default the workers share what is left after --data-cpus.
    Threads round fractional CPUs up (1.5 -> 2): augmentation needs little CPU time.
    """
    s = cfg.scaling
    cpus = s.cpus_per_worker or (cluster_cpus - s.data_cpus) / s.num_workers
    if cpus <= 0 or cluster_cpus - s.num_workers * cpus < AUGMENT_TASK_CPUS:
        raise ValueError(
            f"{s.num_workers} workers x {cpus:g} CPUs leave under {AUGMENT_TASK_CPUS} of the "
            f"cluster's {cluster_cpus:g} CPUs for Ray Data; lower --num-workers or --cpus-per-worker")
    return round(cpus, 3), max(1, math.ceil(cpus - 0.25))


def run(cfg: Config, train_loop=None) -> dict:
    """Train as configured, register the best checkpoint through the gate, and return the
    run's summary (also written to summary.json). `train_loop` replaces the per-worker loop
    of train_loop.py (tests wrap it)."""
    from cifar_ray import tracking
    from cifar_ray.lifecycle import finish_run, tracked_run

    cfg = with_global_batch(resolve_run(cfg))
    started = time.perf_counter()
    with tracked_run(cfg, "train") as run:
        checkpoints = finished_run_checkpoints(cfg)
        if checkpoints:
            print(f"all {cfg.train.epochs} epochs of {cfg.run.name} are trained already: no worker group "
                  "starts (raise --epochs to train further)", flush=True)
        else:
            logger = tracking.EpochLogger(run.tracking_uri, run.run_id)
            trainer = make_trainer(cfg, run.train, run.val, run.info, train_loop, callbacks=(logger,))
            checkpoints = checkpoints_of(fit_or_explain(trainer, cfg))
        summary = write_run_outputs(cfg, *checkpoints, wall_time_s=time.perf_counter() - started)
        # The audit goes beside the run's curves and into the checkpoint, which carries it.
        return finish_run(run, summary["best_checkpoint"], summary, (summary["run_dir"], summary["best_checkpoint"]))


def fit_or_explain(trainer, cfg: Config):
    """trainer.fit(), turning a worker group that kept failing into one clear message."""
    import ray.train

    from cifar_ray.checkpoint import checkpoint_names
    from cifar_ray.errors import TrainingFailed, find_user_error, first_line

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        if find_user_error(e) is not None:  # bad data or checkpoint: its own message says more
            raise
        causes = list(getattr(e, "worker_failures", {}).values()) or [e]
        cause = first_line(causes[0], limit=200).rstrip(".")
        run_dir = cfg.run_dir
        kept = checkpoint_names(run_dir)
        raise TrainingFailed(
            f"training failed after {cfg.run.max_failures} restart(s) (--max-failures): {cause}. "
            f"{len(kept)} checkpoint(s) kept in {run_dir} (latest {kept[-1] if kept else 'none'}); "
            f"rerun with --name {cfg.run.name} to resume") from None


def make_trainer(cfg: Config, train, val, info: DataInfo, train_loop=None,
                 callbacks: tuple = (), start_from=None):
    """The Ray Trainer for one training run; `run` and each Tune trial fit one: Ray's
    TensorflowTrainer with the backend config of tf_backend.py.

    `start_from` (a Checkpoint) starts the run from another run's state, as a PBT trial does
    from the trial it copies; the run's own checkpoints, once it has some, take precedence.
    """
    import ray
    import ray.train

    from cifar_ray.augment import add_augmentation
    from cifar_ray.quiet import is_quiet
    from cifar_ray.tf_backend import TensorflowTrainer  # Ray's, with tf_backend's config, without TensorFlow here

    workers = cfg.scaling.num_workers
    if training_steps_per_epoch(info.num_train, cfg.train.batch_size, workers) == 0:
        split = f" (split across {workers} workers)" if workers > 1 else ""
        raise ValueError(f"batch {cfg.train.batch_size} is larger than the {info.num_train} training "
                         f"images{split}: an epoch would take no step; lower --batch-size or train on more images")
    cpus_per_worker, threads = plan_resources(cfg, ray.cluster_resources().get("CPU", 1))
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_S)  # read when fit starts
    return TensorflowTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "data_info": asdict(info), "threads": threads,
                           "start_from": start_from},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints,
                checkpoint_score_attribute=SCORE_METRIC,
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING" if is_quiet() else "INFO"),
            callbacks=list(callbacks),
        ),
        datasets={"train": add_augmentation(shuffle_every_epoch(train), cfg.data.augment,
                                            cfg.data.crop_padding), "val": val},
        # One worker reads the validation split whole: split in one, it cost a coordinator
        # process and 2.1 s a run (benchmarks/train_overhead.py). Training data is split always:
        # its coordinator runs the augmentation outside the training process.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train", "val"] if workers > 1 else ["train"]),
    )


def train_loop_per_worker(loop_config: dict) -> None:
    """What Ray Train runs on every worker: train_loop.py's loop. Imported on the worker, so
    that neither the driver nor a Tune trial's process imports Keras (5 s) to hand it over.
    It returns nothing: Ray Train ships the loop's return value to its controller, and a
    Keras model there cost a pickle and a TensorFlow import."""
    from cifar_ray.train_loop import fit_on_this_worker

    fit_on_this_worker(loop_config)


def describe(cfg: Config) -> str:
    """What a run will do, in the first lines a user sees."""
    s = cfg.scaling
    workers = f"{s.num_workers} worker{'s' if s.num_workers > 1 else ''}{' with a GPU each' if s.use_gpu else ''}"
    return (f"train {cfg.model.model} on {cfg.data.data} for {cfg.train.epochs} epochs, {workers}, "
            f"global batch {with_global_batch(cfg).train.batch_size}\nresults: {cfg.run.storage_path}/{cfg.run.name}")


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    from cifar_ray.cli import init_ray, parse_args, run_cli
    from cifar_ray.flags import config_from_args
    from cifar_ray.data import check_source

    args = parse_args("train", argv, prog)

    def train() -> None:
        cfg = resolve_run(config_from_args(args))
        print(describe(cfg), flush=True)
        check_source(cfg.data.data)
        init_ray()
        summary = run(cfg)
        print(f"best val_accuracy {summary['best_val_accuracy']:.4f} (epoch {summary['best_epoch']})")
        print(f"run folder: {summary['run_dir']}")

    run_cli(train)


if __name__ == "__main__":
    # The module's imported copy, not __main__'s: Ray pickles `train_loop_per_worker` by
    # reference, by this module's name, for workers to import.
    from cifar_ray.train import main as train_main

    train_main()
