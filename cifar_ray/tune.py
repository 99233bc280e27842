"""Compare model and training variants with Ray Tune and export the winner.

    python -m cifar_ray.tune --data ../shared/data/cifar10/train --limit 5000 --epochs 2 --num-samples 4
    python -m cifar_ray.tune --models notebook_cnn shallow_cnn --optimizers adam sgd --num-samples 6
    python -m cifar_ray.tune --search-space space.yaml --name my-study     # rerun the name to resume

Each trial is a full Ray Train run made by train.make_trainer, with the same training
loop, config and checkpoints as `python -m cifar_ray.train`. The data is read, decoded and
split once and shared by every trial. ASHA stops poor trials early (--scheduler fifo to
run all of them to the end).

Each model brings its recipe into the search (conditioned_space): fast_resnet keeps its
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

import csv
import io
import json
import time
from functools import partial
from pathlib import Path

import yaml

from cifar_ray.config import (MODEL_RECIPES, PBT_MUTATIONS, Config, TuneConfig, choices_of, config_from_args,
                              flatten, with_global_batch, with_recipe)
from cifar_ray.data import DataInfo
from cifar_ray.train import SCORE_METRIC

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")
SEARCHED = ("model", "optimizer", "lr", "weight_decay", "augment", "batch_size")


def make_search(cfg: Config) -> tuple[dict, object]:
    """(Tune's param_space, its search algorithm).

    Without a YAML file, Optuna samples the space conditioned on the model (conditioned_space):
    at random, or with TPE (--search tpe). A YAML file's space is sampled by Tune itself (grid
    included), or by TPE.
    """
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    t = cfg.tune
    if t.scheduler == "pbt":
        if t.search == "tpe":
            raise ValueError("--scheduler pbt evolves its population itself: use it with --search random")
        return (parse_search_space(yaml.safe_load(Path(t.search_space).read_text()) or {}) if t.search_space
                else pbt_space(cfg)), None
    sampler = (optuna.samplers.TPESampler(seed=cfg.train.seed) if t.search == "tpe"
               else optuna.samplers.RandomSampler(seed=cfg.train.seed))
    if not t.search_space:
        # metric and mode here too: Tune hands them only to a searcher it gives a space to
        return {}, OptunaSearch(space=partial(conditioned_space, t=t), sampler=sampler,
                                metric=SCORE_METRIC, mode="max")
    space = parse_search_space(yaml.safe_load(Path(t.search_space).read_text()) or {})
    if t.search == "random":
        return space, None
    if any(isinstance(v, dict) and "grid_search" in v for v in space.values()):
        raise ValueError("search space: a grid runs with --search random; TPE samples distributions")
    return space, OptunaSearch(sampler=sampler)


def conditioned_space(trial, t: TuneConfig) -> None:
    """Optuna's define-by-run space: the model first, then what that model searches.

    A model with a recipe (config.MODEL_RECIPES) keeps its optimizer, schedule, batch and
    regularization, and searches its learning rate and weight decay around the recipe's: a
    mixed search compares it at its best, not at settings made for the notebook's CNN. The
    other models search the notebook's space, narrowed by the flags. Fields are named
    <model>/<field> (Ray nests them under the model's name; trial_config reads them), so
    each model's history in the searcher stays its own.
    """
    model = trial.suggest_categorical("model", list(t.models or choices_of("model")))
    ranges = searched_ranges(model, t)
    if model in MODEL_RECIPES:
        for field, (low, high) in ranges.items():
            trial.suggest_float(f"{model}/{field}", low, high, log=True)
        return
    trial.suggest_categorical(f"{model}/optimizer", list(t.optimizers or choices_of("optimizer")))
    trial.suggest_float(f"{model}/lr", *ranges["lr"], log=True)
    trial.suggest_categorical(f"{model}/augment", list(t.augments or choices_of("augment")))
    trial.suggest_categorical(f"{model}/batch_size", list(t.batch_sizes or (64, 128, 256)))


def searched_ranges(model: str, t: TuneConfig) -> dict[str, tuple[float, float]]:
    """Log-uniform bounds of the continuous fields searched for `model`: its recipe's learning
    rate x0.5-2 and weight decay x1/3-3, else --lr-range (the notebook's models)."""
    recipe = MODEL_RECIPES.get(model)
    if recipe:
        return {"lr": (recipe["lr"] / 2, recipe["lr"] * 2),
                "weight_decay": (recipe["weight_decay"] / 3, recipe["weight_decay"] * 3)}
    return {"lr": tuple(t.lr_range or (1e-4, 1e-1))}


def pbt_space(cfg: Config) -> dict:
    """PBT's first population: one model (every trial copies another's weights, so all share
    it), each trial with its own draw of the fields PBT then perturbs (searched_ranges)."""
    from ray import tune

    models = cfg.tune.models or (cfg.model.model,)
    if len(models) > 1:
        raise ValueError(f"--scheduler pbt evolves one model's population; pass one of {', '.join(models)} "
                         "to --models (or compare models with --scheduler asha)")
    ranges = searched_ranges(models[0], cfg.tune)
    return {"model": models[0], **{field: tune.loguniform(*ranges[field]) for field in ranges}}


def trial_config(params: dict, base: Config) -> Config:
    """A trial's config: the experiment's, then the sampled model's recipe, then the sampled
    fields (those of a conditioned space sit under the model's name). The experiment's epochs
    stay unless sampled: ASHA's rungs count them."""
    model = params.get("model", base.model.model)
    sampled = {k: v for k, v in params.items() if not isinstance(v, dict)}
    sampled.update(params.get(model, {}))
    return with_recipe(base, model).with_overrides({"epochs": base.train.epochs, **sampled})


def parse_search_space(spec: dict) -> dict:
    """YAML {field: {sampler: args} | value} -> Tune space; field names and types are checked."""
    space = {}
    for key, value in spec.items():
        if isinstance(value, dict):
            (sampler, args), = value.items()
            if sampler not in SAMPLERS:
                raise ValueError(f"search space {key}: unknown sampler {sampler!r}; use one of {SAMPLERS}")
            Config().with_overrides({key: args[0]})  # unknown field or wrong type: ValueError
            space[key] = make_sampler(sampler, args)
        else:
            Config().with_overrides({key: value})
            space[key] = value
    return space


def make_sampler(name: str, args: list):
    from ray import tune

    if name == "choice":
        return tune.choice(list(args))
    if name == "grid":
        return tune.grid_search(list(args))
    return getattr(tune, name)(*args)  # uniform, loguniform, randint: bounds


def trial_run_config(params: dict, trial_id: str, *, base: Config, trials_dir: str) -> Config:
    """The Config a trial trains with: trial_config, named for the trial, under trials/."""
    return with_global_batch(trial_config(params, base).with_overrides({"name": trial_id, "storage_path": trials_dir}))


def run_trial(params: dict, base: dict, train, val, info: DataInfo, trials_dir: str, tracking_uri: str,
              parent_run_id: str) -> None:
    """One Tune trial: a Ray Train run with the sampled fields, reporting every epoch to Tune
    and to the trial's MLflow run, a child of the experiment's (EpochLogger, TrialRuns)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cifar_ray.tracking import EpochLogger
    from cifar_ray.train import checkpoints_of, make_trainer, write_run_outputs

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
    import ray.data
    from ray import tune

    from cifar_ray import tracking
    from cifar_ray.checkpoint import write_file
    from cifar_ray.data import load_training_data
    from cifar_ray.registry import register_run
    from cifar_ray.train import check_storage_writable, resolve_run

    cfg = resolve_run(cfg, kind="tune")
    # Tune's trial table and each trial's epoch lines say more than a progress bar per dataset.
    ray.data.DataContext.get_current().enable_progress_bars = False
    experiment_dir = cfg.run_dir
    check_storage_writable(cfg.run.storage_path)
    uri = tracking.tracking_uri(cfg)
    tracking.check_reachable(uri)
    concurrent, cpus_per_worker = trial_resources(cfg, ray.cluster_resources().get("CPU", 1))
    cfg = cfg.with_overrides({"cpus_per_worker": cpus_per_worker})

    train, val, holdout, info = load_training_data(cfg.data, seed=cfg.train.seed)
    print(f"data: {info.num_train} training / {info.num_val} validation images from {info.source}; "
          f"{info.num_holdout} held out for the registry's evaluation set", flush=True)
    run_id = tracking.start_run(uri, cfg, kind="tune")
    print(f"tracking: MLflow run {run_id} in {uri} (one child run per trial)", flush=True)
    trials_dir = f"{experiment_dir}/trials"
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), train=train, val=val, info=info,
                             trials_dir=trials_dir, tracking_uri=uri, parent_run_id=run_id),
        {"CPU": 0.01},  # the trial's driver only waits; its Ray Train workers hold the CPUs
    )
    trial_runs = tracking.TrialRuns(uri, run_id, partial(trial_run_config, base=cfg, trials_dir=trials_dir))
    if tune.Tuner.can_restore(experiment_dir):
        print(f"resuming experiment {experiment_dir}", flush=True)
        tuner = tune.Tuner.restore(experiment_dir, trainable=trainable, resume_errored=True)
    else:
        param_space, search_alg = make_search(cfg)
        tuner = tune.Tuner(
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
            # Tune holds checkpoints only under PBT (fit_pbt_part), for trials to copy, and keeps
            # them all while trials run: PBT's save of a top trial registers its latest checkpoint
            # a second time, so num_to_keep=N kept about N/2, and a copy decided one or two epochs
            # earlier could be deleted before the copying trial read it. remove_tune_copies frees
            # them at the end.
            run_config=tune.RunConfig(name=cfg.run.name, storage_path=cfg.run.storage_path, verbose=1,
                                      callbacks=[trial_runs]),
        )
    with tracking.run_status(uri, run_id):
        tracking.log_data_info(uri, run_id, info)
        results = tuner.fit()
        remove_tune_copies(results)
        tracking.close_trial_runs(uri, run_id, {r.metrics.get("trial_id"): r.error is not None for r in results
                                                if r.metrics})
        best = write_experiment_outputs(cfg, experiment_dir, results)
        # The winner's audit (it carries it, as a train run's best checkpoint does), then the gate.
        _, best["registry"] = register_run(cfg, run_id, best["best_dir"], holdout, info, experiment_dir,
                                           audit=(val, info.validation_split(), (best["best_dir"],)))
        summary = {k: v for k, v in best.items() if k != "leaderboard"}
        write_file(experiment_dir, "summary.json", json.dumps(summary, indent=2).encode())
        tracking.log_outputs(uri, run_id, experiment_dir)
    return best


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


def make_scheduler(cfg: Config, param_space: dict):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search.sample import Domain

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    if cfg.tune.scheduler == "pbt":
        # A distribution is redrawn from; a grid's values are stepped through.
        mutations = {k: v["grid_search"] if isinstance(v, dict) else v for k, v in param_space.items()
                     if k in PBT_MUTATIONS and (isinstance(v, Domain) or isinstance(v, dict) and "grid_search" in v)}
        if not mutations:
            raise ValueError(f"--scheduler pbt perturbs {' and '.join(PBT_MUTATIONS)}: the search space must "
                             "sample at least one of them")
        # Every N epochs, a trial in the bottom quarter copies one in the top quarter and
        # multiplies each field by 0.8 or 1.2, or moves it one grid value (or redraws it, one
        # time in four).
        return PopulationBasedTraining(time_attr="epoch", perturbation_interval=cfg.tune.perturbation_interval,
                                       hyperparam_mutations=mutations)
    return ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs,
                         grace_period=1, reduction_factor=2)


def leaderboard_rows(cfg: Config, results) -> list[dict]:
    """One row per trial: the fields it trained with, best val accuracy, epochs, early stop,
    and its overhead (the trial's time less its epochs'); best first, then the trials that
    failed before their first epoch, with their error."""
    rows, failed = [], []
    for result in results:
        history = result.metrics_dataframe
        trained = flatten(trial_config(result.config, cfg).to_dict())
        if history is None or SCORE_METRIC not in history:
            failed.append(failed_trial_row(result, trained))
            continue
        best = history.loc[history[SCORE_METRIC].idxmax()]
        epochs_run = int(history["epoch"].max())
        rows.append({
            "trial": result.metrics["trial_id"],
            **{k: trained[k] for k in SEARCHED},
            "best_val_accuracy": round(float(best[SCORE_METRIC]), 4),
            "best_epoch": int(best["epoch"]),
            "epochs_run": epochs_run,
            "overhead_s": round(float(history["time_total_s"].iloc[-1] - history["epoch_time_s"].sum()), 1),
            "stopped_early": result.error is None and epochs_run < trained["epochs"],
            "status": trial_status(result),
            "val_accuracy_by_epoch": [round(float(v), 4) for v in history[SCORE_METRIC]],
            # the Ray Train run that saved the best epoch: the trial's folder, or under PBT one part of it
            "run_folder": best["checkpoint_path"].rsplit("/", 1)[0],
        })
    return sorted(rows, key=lambda r: -r["best_val_accuracy"]) + failed


def failed_trial_row(result, trained: dict) -> dict:
    """The leaderboard row of a trial that errored before its first epoch: what it tried,
    and why it failed."""
    return {"trial": result.metrics["trial_id"], **{k: trained[k] for k in SEARCHED}, "best_val_accuracy": None,
            "best_epoch": None, "epochs_run": 0, "overhead_s": None, "stopped_early": False,
            "status": trial_status(result) if result.error else "no epoch reported",
            "val_accuracy_by_epoch": [], "run_folder": None}


def trial_status(result) -> str:
    """'done', or 'error: ' and the last line of the trial's error, which names the cause."""
    return f"error: {str(result.error).strip().splitlines()[-1]}" if result.error else "done"


def write_experiment_outputs(cfg: Config, experiment_dir: str, results) -> dict:
    """leaderboard.csv/.md, comparison.png, best/ (the winner's checkpoint, with best.json)."""
    from cifar_ray.checkpoint import best_checkpoint_in, copy_checkpoint, read_file, write_file

    rows = leaderboard_rows(cfg, results)
    if not rows or rows[0]["best_val_accuracy"] is None:
        raise RuntimeError(f"no trial of {experiment_dir} finished an epoch; see the errors above")
    columns = [k for k in rows[0] if k not in ("val_accuracy_by_epoch", "run_folder")]
    write_file(experiment_dir, "leaderboard.csv", leaderboard_csv(rows, columns).encode())
    table = leaderboard_markdown(rows, columns)
    write_file(experiment_dir, "leaderboard.md", table.encode())
    write_file(experiment_dir, "comparison.png", plot_comparison(rows, title=cfg.run.name))

    winner = rows[0]
    checkpoint = best_checkpoint_in(winner["run_folder"])
    best_dir = f"{experiment_dir}/best"
    copy_checkpoint(checkpoint, best_dir)
    metadata = json.loads(read_file(best_dir, "metadata.json"))
    best = {"trial": winner["trial"], "checkpoint": checkpoint,
            "config": {k: v for k, v in winner.items() if k in SEARCHED},
            "best_val_accuracy": metadata["metrics"][SCORE_METRIC], "best_epoch": metadata["epoch"],
            "metrics": metadata["metrics"]}
    write_file(best_dir, "best.json", json.dumps(best, indent=2).encode())
    print("\n" + table, flush=True)
    return {**best, "experiment_dir": experiment_dir, "best_dir": best_dir, "leaderboard": rows}


def leaderboard_csv(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def leaderboard_markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.3g}" if isinstance(v, float) and not isinstance(v, bool) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_comparison(rows: list[dict], title: str) -> bytes:
    """Validation accuracy per epoch, one line per trial, the best one highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(9, 5))
    for i, row in enumerate(r for r in rows if r["val_accuracy_by_epoch"]):  # failed trials have none
        epochs = range(1, len(row["val_accuracy_by_epoch"]) + 1)
        label = f"{row['trial']}: {row.get('model')}, {row.get('optimizer')}, lr {row.get('lr', 0):.2g}"
        style = {"linewidth": 3, "color": "tab:red", "zorder": 3} if i == 0 else {"linewidth": 1, "alpha": 0.7}
        ax.plot(epochs, row["val_accuracy_by_epoch"], "o-", label=("best · " if i == 0 else "") + label, **style)
    ax.set(xlabel="epoch", ylabel="validation accuracy", title=f"Trials of {title}")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def describe(cfg: Config) -> str:
    """What an experiment will do, in the first lines a user sees."""
    t = cfg.tune
    space = t.search_space or f"models {', '.join(t.models or choices_of('model'))}"
    return (f"tune {t.num_samples} trials ({space}; {t.search} search, {t.scheduler} scheduler) on {cfg.data.data}, "
            f"up to {cfg.train.epochs} epochs each\nresults: {cfg.run.storage_path}/{cfg.run.name}")


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    from cifar_ray.cli import init_ray, parse_args, run_cli
    from cifar_ray.data import check_source
    from cifar_ray.train import resolve_run

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
    # Run the copy imported as cifar_ray.tune: Tune pickles the searcher's space with plain
    # pickle, which must name cifar_ray.tune.conditioned_space, not __main__'s, for a resume
    # from any other entry point (`cifar-ray tune`, a test) to load it.
    from cifar_ray.tune import main as tune_main

    tune_main()
