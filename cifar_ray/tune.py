"""Compare model and training variants with Ray Tune and export the winner.

    python -m cifar_ray.tune --data ../shared/data/cifar10/train --limit 5000 --epochs 2 --num-samples 4
    python -m cifar_ray.tune --models notebook_cnn shallow_cnn --optimizers adam sgd --num-samples 6
    python -m cifar_ray.tune --search-space space.yaml --name my-study     # rerun the name to resume

Each trial is a full Ray Train run made by train.make_trainer, with the same training
loop, config and checkpoints as `python -m cifar_ray.train`. The data is read, decoded and
split once and shared by every trial. ASHA stops poor trials early (--scheduler fifo to
run all of them to the end).

Each model brings its recipe into the search (search.py): fast_resnet keeps its
optimizer, schedule and regularization and searches near its own learning rate, while the
notebook's CNNs search optimizer, LR, augmentation and batch. Optuna samples that space at
random or, with --search tpe, by TPE from the trials so far. With --scheduler pbt,
Population Based Training evolves one model's population instead (pbt.py).

A search-space YAML maps config field names (the CLI's, without dashes) to a sampler, or
to a plain value to fix it:

    model: {choice: [notebook_cnn, shallow_cnn]}
    lr: {loguniform: [0.0001, 0.1]}
    batch_size: {choice: [64, 128]}
    epochs: 3

The experiment folder <storage-path>/<name>/ ends with leaderboard.csv, leaderboard.md,
comparison.png and best/: the best trial's best checkpoint, with best.json and its audit
(MODEL_CARD.md). The experiment is an MLflow run with one child run per trial, and best/
goes through the registry's promotion gate, as a train run's best checkpoint does.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import yaml

from cifar_ray.config import Config, choices_of
from cifar_ray.flags import config_from_args
from cifar_ray.data import DataInfo
from cifar_ray.leaderboard import write_experiment_outputs
from cifar_ray.run_folder import SCORE_METRIC, with_global_batch
from cifar_ray.search import make_scheduler, make_search, parse_search_space, trial_config


def trial_run_config(params: dict, trial_id: str, *, base: Config, trials_dir: str) -> Config:
    """The Config a trial trains with: trial_config, named for the trial, under trials/.

    Its Ray Train run never restarts a running worker group (max_failures 0; a group that
    fails to start, Ray Train still retries): Tune restarts a failed trial instead
    (experiment_run_config), and Ray Train resumes the trial's run folder from its last
    checkpoint. Why: when Tune stops a trial, Ray kills the trial's Ray Train controller,
    and a controller allowed to restart can see its workers die first and make a new
    placement group as it goes. Ray 2.60 never removes that group: it held 1.5 of a 2-CPU
    test cluster's CPUs, and the next trial waited for them forever.
    """
    return with_global_batch(trial_config(params, base).with_overrides(
        {"name": trial_id, "storage_path": trials_dir, "max_failures": 0}))


def run_trial(params: dict, base: dict, train, val, info: DataInfo, trials_dir: str, tracking_uri: str,
              parent_run_id: str) -> None:
    """One Tune trial: a Ray Train run with the sampled fields, reporting every epoch to Tune
    and to the trial's MLflow run, a child of the experiment's (EpochLogger, TrialRuns)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cifar_ray.tracking import EpochLogger
    from cifar_ray.run_folder import checkpoints_of, write_run_outputs
    from cifar_ray.train import make_trainer

    cfg = trial_run_config(params, tune.get_context().get_trial_id(), base=Config.from_dict(base), trials_dir=trials_dir)
    started = time.perf_counter()
    # MLflow first: Tune may stop the trial on the report to Tune, and the epoch it stopped
    # on must still be logged.
    logger = EpochLogger(tracking_uri, trial=cfg, parent_run_id=parent_run_id)
    if cfg.tune.scheduler == "pbt":
        from cifar_ray.pbt import fit_pbt_part

        cfg, checkpoints = fit_pbt_part(cfg, train, val, info, logger)
    else:
        checkpoints = checkpoints_of(make_trainer(cfg, train, val, info, callbacks=(logger, TuneReportCallback())).fit())
    write_run_outputs(cfg, *checkpoints, wall_time_s=time.perf_counter() - started)


def trial_resources(cfg: Config, cluster_cpus: float) -> tuple[int, float]:
    """(concurrent trials, CPUs per worker) so that trials never starve each other or Ray Data."""
    per_trial_data = cfg.scaling.data_cpus
    concurrent = cfg.tune.max_concurrent_trials or max(1, int(cluster_cpus // 4))
    cpus = cfg.scaling.cpus_per_worker or (cluster_cpus / concurrent - per_trial_data) / cfg.scaling.num_workers
    if cpus <= 0:
        raise ValueError(f"{concurrent} concurrent trials do not fit in {cluster_cpus:g} CPUs; "
                         "lower --max-concurrent-trials or --num-workers")
    return concurrent, round(cpus, 3)


def run(cfg: Config) -> dict:
    """Run (or resume) the experiment; return the best trial's summary."""
    import ray
    from ray import tune

    from cifar_ray import tracking
    from cifar_ray.lifecycle import finish_run, tracked_run
    from cifar_ray.run_folder import resolve_run

    cfg = resolve_run(cfg, kind="tune")
    concurrent, cpus_per_worker = trial_resources(cfg, ray.cluster_resources().get("CPU", 1))
    cfg = cfg.with_overrides({"cpus_per_worker": cpus_per_worker})
    experiment_dir = cfg.run_dir
    with tracked_run(cfg, "tune") as run:
        trials_dir = f"{experiment_dir}/trials"
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=cfg.to_dict(), train=run.train, val=run.val, info=run.info,
                                 trials_dir=trials_dir, tracking_uri=run.tracking_uri, parent_run_id=run.run_id),
            {"CPU": 0.01},  # the trial's driver only waits; its Ray Train workers hold the CPUs
        )
        trial_runs = tracking.TrialRuns(run.tracking_uri, run.run_id,
                                        partial(trial_run_config, base=cfg, trials_dir=trials_dir))
        results = make_tuner(cfg, experiment_dir, trainable, concurrent, trial_runs).fit()
        remove_tune_copies(results)
        tracking.close_trial_runs(run.tracking_uri, run.run_id,
                                  {r.metrics.get("trial_id"): r.error is not None for r in results if r.metrics})
        best = write_experiment_outputs(cfg, experiment_dir, results)
        # The winner carries its audit, as a train run's best checkpoint does; then the gate.
        summary = {**{k: v for k, v in best.items() if k != "leaderboard"}, "run_dir": experiment_dir}
        best["registry"] = finish_run(run, best["best_dir"], summary, (best["best_dir"],))["registry"]
    return best


def make_tuner(cfg: Config, experiment_dir: str, trainable, concurrent: int, trial_runs):
    """The experiment's Tuner, or the one restored from `experiment_dir` on a rerun of its name."""
    from ray import tune

    if tune.Tuner.can_restore(experiment_dir):
        print(f"resuming experiment {experiment_dir}", flush=True)
        return tune.Tuner.restore(experiment_dir, trainable=trainable, resume_errored=True)
    param_space, search_alg = make_search(cfg)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=concurrent,
            search_alg=search_alg,
            scheduler=make_scheduler(cfg, param_space),
            metric=SCORE_METRIC,
            mode="max",
        ),
        run_config=experiment_run_config(cfg, callbacks=[trial_runs]),
    )


def experiment_run_config(cfg: Config, callbacks: list):
    """Tune's RunConfig: a failed trial restarts up to --max-failures times (its Ray Train
    run does not: trial_run_config says why).

    Tune holds checkpoints only under PBT (fit_pbt_part), for trials to copy, and keeps them
    all while trials run: PBT's save of a top trial registers its latest checkpoint a second
    time, so num_to_keep=N kept about N/2, and a copy decided one or two epochs earlier could
    be deleted before the copying trial read it. remove_tune_copies frees them at the end.
    """
    from ray import tune

    return tune.RunConfig(name=cfg.run.name, storage_path=cfg.run.storage_path, verbose=1, callbacks=callbacks,
                          failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures))


def remove_tune_copies(results) -> None:
    """Delete Tune's copies of PBT checkpoints (<experiment>/run_trial_*/checkpoint_*) once
    the experiment is over: each is a copy of an epoch checkpoint under trials/, which stay.
    A trial that failed keeps them: rerunning the experiment's name resumes it from there."""
    import pyarrow.fs

    for result in results:
        if result.error is not None:
            continue
        fs = result.filesystem
        for entry in fs.get_file_info(pyarrow.fs.FileSelector(result.path, allow_not_found=True)):
            if entry.type == pyarrow.fs.FileType.Directory and entry.base_name.startswith("checkpoint_"):
                fs.delete_dir(entry.path)


def describe(cfg: Config) -> str:
    """What an experiment will do, in the first lines a user sees."""
    t = cfg.tune
    space = t.search_space or f"models {', '.join(t.models or choices_of('model'))}"
    return (f"tune {t.num_samples} trials ({space}; {t.search} search, {t.scheduler} scheduler) on {cfg.data.data}, "
            f"up to {cfg.train.epochs} epochs each\nresults: {cfg.run.storage_path}/{cfg.run.name}")


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    from cifar_ray.cli import init_ray, parse_args, run_cli
    from cifar_ray.data import check_source
    from cifar_ray.run_folder import resolve_run

    args = parse_args("tune", argv, prog)

    def tune() -> None:
        cfg = resolve_run(config_from_args(args), kind="tune")
        print(describe(cfg), flush=True)
        check_source(cfg.data.data)
        if cfg.tune.search_space:
            parse_search_space(yaml.safe_load(Path(cfg.tune.search_space).read_text()) or {})
        init_ray()
        best = run(cfg)
        print(f"best trial {best['trial']}: val_accuracy {best['best_val_accuracy']:.4f} "
              f"(epoch {best['best_epoch']}) with {best['config']}")
        print(f"experiment folder: {best['experiment_dir']}")

    run_cli(tune)


if __name__ == "__main__":
    # Run the copy imported as cifar_ray.tune: Tune pickles the experiment's functions (the
    # trainable, the callbacks' trial config) for a resume, and they must name cifar_ray.tune,
    # not __main__, for a resume from any other entry point (`cifar-ray tune`, a test).
    from cifar_ray.tune import main as tune_main

    tune_main()
