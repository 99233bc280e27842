"""What a Tune experiment samples, and how it schedules its trials (tune.py runs them).

Without a YAML space, each model brings its recipe into the search (conditioned_space):
fast_resnet keeps its optimizer, schedule and regularization and searches near its own
learning rate and weight decay; the notebook's CNNs search optimizer, LR, augmentation and
batch. A YAML space maps config field names to a sampler (SAMPLERS) or a fixed value.
Population Based Training perturbs config.PBT_MUTATIONS of one model's population.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import yaml

from cifar_ray.config import MODEL_RECIPES, PBT_MUTATIONS, Config, TuneConfig, choices_of, with_recipe
from cifar_ray.run_folder import SCORE_METRIC

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
    space = parse_search_space(yaml.safe_load(Path(t.search_space).read_text()) or {}) if t.search_space else None
    if space and t.scheduler != "fifo" and "epochs" in space and not isinstance(space["epochs"], int):
        # ASHA's rungs and PBT's steps count up to one number of epochs (epochs_of); PBT's
        # trials also copy each other's checkpoints, schedules and all.
        raise ValueError(f"--scheduler {t.scheduler} trains every trial for one number of epochs: set epochs "
                         "to one value, or sample it with --scheduler fifo")
    if t.scheduler == "pbt":
        if t.search == "tpe":
            raise ValueError("--scheduler pbt evolves its population itself: use it with --search random")
        return (pbt_space(cfg) if space is None else space), None
    sampler = (optuna.samplers.TPESampler(seed=cfg.train.seed) if t.search == "tpe"
               else optuna.samplers.RandomSampler(seed=cfg.train.seed))
    if space is None:
        # metric and mode here too: Tune hands them only to a searcher it gives a space to
        return {}, OptunaSearch(space=partial(conditioned_space, t=t), sampler=sampler,
                                metric=SCORE_METRIC, mode="max")
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


def epochs_of(param_space: dict, cfg: Config) -> int:
    """How many epochs every trial trains: a YAML space's one value, else --epochs
    (trial_config gives trials the same)."""
    return param_space.get("epochs", cfg.train.epochs)


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


def make_scheduler(cfg: Config, param_space: dict):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.sample import Domain

    from cifar_ray.pbt import NoStepAtTheEnd

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
        # time in four). Asynchronous by default: a trial is ranked as it reports, against the
        # others' scores at their last step, so of trials in lockstep only the last to report
        # can be found in the bottom quarter (benchmarks/README.md); --pbt-sync waits for all.
        # No step at the last epoch: a copy there could train no further.
        return NoStepAtTheEnd(epochs_of(param_space, cfg), perturbation_interval=cfg.tune.perturbation_interval,
                              hyperparam_mutations=mutations, synch=cfg.tune.pbt_sync)
    # Rungs at epochs 1, 2, 4, ... up to the trials' epochs.
    return ASHAScheduler(time_attr="training_iteration", max_t=epochs_of(param_space, cfg),
                         grace_period=1, reduction_factor=2)
