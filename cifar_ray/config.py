"""One typed configuration for every stage.

Each field is defined once, here, with its default and help text; `flags.py` turns the
fields into `--kebab-case` flags and reads the same names from YAML, so one name means one
thing in the CLI, in YAML, in Tune's search space and in a checkpoint's `metadata.json`.

Presets: `default` is the real run; `smoke` is tiny and fast (tests and CI use it):

    python -m cifar_ray.train --preset smoke      # about a minute on 2 CPU cores
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
IMAGE_SHAPE = (32, 32, 3)
REGISTERED_MODEL = "cifar10-classifier"
CHAMPION = "champion"  # the registry alias Serve follows
TENSORBOARD_DIR = "tensorboard"  # in each run folder: `tensorboard --logdir <storage-path>`


def _f(default: Any, help: str, choices: Optional[tuple] = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class DataConfig:
    data: str = _f("cifar10", "'cifar10' (Keras archive), 'synthetic', a Parquet folder/URI "
                   "(columns image, label) or an image folder <root>/<class>/*.png")
    val_fraction: float = _f(0.1, "fraction of the training images held out for validation")
    limit: Optional[int] = _f(None, "use only the first N training images (after the split)")
    augment: str = _f("crop_flip", "training augmentation", ("crop_flip", "notebook", "none"))
    crop_padding: int = _f(4, "crop_flip: pixels of reflect padding, the largest shift of a crop")
    synthetic_size: int = _f(2000, "number of images in the 'synthetic' data set")
    skip_bad_rows: bool = _f(False, "count, report and skip undecodable images and out-of-range "
                             "labels instead of stopping at the first")


@dataclass(frozen=True)
class ModelConfig:
    model: str = _f("notebook_cnn", "model architecture (fast_resnet brings its own recipe)",
                    ("notebook_cnn", "shallow_cnn", "fast_resnet"))
    tta: bool = _f(False, "score this model with test-time augmentation (tta.py: six views, six times the "
                   "compute) in evaluate, the gate and Serve")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _f(20, "number of epochs")
    batch_size: int = _f(128, "global batch size, split evenly across workers")
    per_worker_batch_size: Optional[int] = _f(
        None, "batch per worker; sets the global batch to this x --num-workers (wins over --batch-size)")
    optimizer: str = _f("rmsprop", "optimizer (sgd_coupled: PyTorch's Nesterov SGD, per-variable LR scales; optim.py)",
                        ("rmsprop", "adam", "sgd", "sgd_coupled"))
    lr: float = _f(1e-3, "peak learning rate")
    lr_batch_size: Optional[int] = _f(
        None, "global batch size --lr is meant for; the LR is scaled linearly to the actual "
        "global batch (default: --lr as given)")
    schedule: str = _f("constant", "LR schedule (triangle: 0.2x -> 1x at 23% of the steps -> 0.07x, airbench's)",
                       ("constant", "cosine", "triangle"))
    warmup_epochs: float = _f(0.0, "linear warmup before the schedule (epochs)")
    momentum: float = _f(0.9, "momentum for sgd (Nesterov)")
    weight_decay: float = _f(0.0, "weight decay (0 disables): decoupled; sgd_coupled adds it to the gradient")
    bias_lr_scale: float = _f(1.0, "sgd_coupled: LR multiplier for BatchNorm biases (not for their decay)")
    whitening_bias_epochs: Optional[int] = _f(None, "fast_resnet: epochs its whitening bias trains (default: all)")
    lookahead: bool = _f(False, "every 5 steps the weights become their running average (optim.Lookahead)")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy loss")
    seed: int = _f(0, "seed for the split, weights and shuffling")
    mixed_precision: bool = _f(True, "mixed precision: float16 on GPUs, bfloat16 on CPUs with "
                               "native bf16 (AMX/AVX512-BF16), float32 elsewhere")
    jit_compile: bool = _f(False, "XLA-compile the train step (pays on GPUs; slower on CPUs)")
    steps_per_execution: int = _f(1, "train steps per tf.function call (raise on a single GPU; "
                                  "1 with 2+ workers)")


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = _f(1, "number of Ray Train workers")
    use_gpu: bool = _f(False, "give each worker one GPU")
    cpus_per_worker: Optional[float] = _f(
        None, "CPUs reserved per worker (default: what the cluster has, less --data-cpus)")
    data_cpus: float = _f(0.5, "CPUs kept free for Ray Data's augmentation tasks")


@dataclass(frozen=True)
class RunConfig:
    name: Optional[str] = _f(None, "run name; rerunning a name resumes it (default: a timestamp)")
    storage_path: str = _f("./runs", "where runs are written: a local path or a URI (s3://, gs://)")
    max_failures: int = _f(2, "restarts allowed when a worker dies, each from the last checkpoint (tune: restarts "
                           "of the trial)")
    keep_checkpoints: int = _f(2, "best checkpoints kept, by validation accuracy")


@dataclass(frozen=True)
class TuneConfig:
    num_samples: int = _f(8, "trials to run (each a full training run)")
    scheduler: str = _f("asha", "asha stops poor trials early; pbt (Population Based Training) has poor "
                        "trials copy a better one's weights and perturb its --lr and --weight-decay",
                        ("asha", "fifo", "pbt"))
    perturbation_interval: int = _f(2, "pbt: epochs between two copy-and-perturb steps")
    pbt_sync: bool = _f(False, "pbt: rank the trials once all have reached the step, so that each compares "
                        "the same epoch (those that get there first pause, then restart from their checkpoint)")
    search: str = _f("random", "how trials are sampled: at random, or by Optuna's TPE from the results so far",
                     ("random", "tpe"))
    max_concurrent_trials: Optional[int] = _f(None, "trials at once (default: what the cluster's CPUs fit)")
    search_space: Optional[str] = _f(None, "YAML file with the full search space (replaces the flags below)")
    models: Optional[tuple[str, ...]] = _f(None, "models to compare (default: all registered)")
    optimizers: Optional[tuple[str, ...]] = _f(None, "optimizers to compare (default: rmsprop adam sgd)")
    augments: Optional[tuple[str, ...]] = _f(None, "augmentations to compare (default: none notebook crop_flip)")
    batch_sizes: Optional[tuple[int, ...]] = _f(None, "global batch sizes to compare (default: 64 128 256)")
    lr_range: Optional[tuple[float, ...]] = _f(None, "learning-rate bounds, sampled log-uniformly (default: 1e-4 1e-1)")


@dataclass(frozen=True)
class RegistryConfig:
    tracking_uri: Optional[str] = _f(
        None, "MLflow tracking URI (default: env MLFLOW_TRACKING_URI, else sqlite:///<storage-path>/mlflow.db)")
    promote: str = _f("auto", "champion after this run: 'auto' if it passes the gate, 'never', or 'force'",
                      ("auto", "never", "force"))
    min_improvement: float = _f(0.002, "accuracy a new version must gain over the champion on the fixed "
                                "evaluation set to take its place")
    max_class_drop: float = _f(0.05, "largest drop of any class's accuracy against the champion that the "
                               "gate allows")
    eval_data: Optional[str] = _f(
        None, "the gate's evaluation set, a data source (default: the champion's; for a first version, "
        "the images held out of --data by a hash of their pixels)")


@dataclass(frozen=True)
class ServeConfig:
    checkpoint: str = _f(f"models:/{REGISTERED_MODEL}@{CHAMPION}",
                         "what to serve: models:/NAME@ALIAS or models:/NAME/VERSION from the registry "
                         "(followed live), or a checkpoint folder or URI (env CIFAR_RAY_CHECKPOINT wins)")
    poll_interval_s: float = _f(0.5, "how often the Rollout deployment reads the registry for the champion "
                                "and a canary (seconds); every replica switches when it says")
    max_batch_size: int = _f(16, "requests batched into one model call (1 disables batching)")
    batch_wait_timeout_s: float = _f(0.005, "longest wait for a batch to fill while other requests are in "
                                     "flight (seconds); a lone request never waits")
    max_body_bytes: int = _f(1_000_000, "largest request body accepted (larger: 413)")
    body_timeout_s: float = _f(5.0, "a request body not all received in this many seconds gets 408 and its "
                               "connection closed (slow clients)")
    max_model_requests: int = _f(96, "requests per replica waiting for or in a model call; more get a fast 503 "
                                 "with Retry-After: 1")
    top_k: int = _f(3, "class probabilities returned per image, unless ?top_k= says otherwise")
    tta: Optional[bool] = _f(None, "test-time augmentation, 6x the compute per image (default: the checkpoint's)")
    payload_log_path: Optional[str] = _f(None, "where answers are logged as Parquet (payload_log.py), a folder or "
                                         "URI (default: <storage-path>/payload_log)")
    payload_log_sample: float = _f(0.01, "share of answers logged (0: no payload log)")
    payload_log_images: bool = _f(False, "log the image of each logged answer (32x32 PNG), not only its SHA-256: "
                                  "only with consent to keep what users send")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    @property
    def run_dir(self) -> str:
        """The run's (or Tune experiment's) folder: <storage-path>/<name>, local or a URI."""
        return f"{self.run.storage_path.rstrip('/')}/{self.run.name}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Build a Config from nested sections, rejecting unknown sections and keys."""
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown config section(s): {sorted(unknown)}")
        return cls(**{name: _section_from_dict(SECTIONS[name], d.get(name, {})) for name in SECTIONS})

    def with_overrides(self, overrides: dict) -> "Config":
        """Return a copy with flat `{field: value}` overrides applied, e.g. {"lr": 0.01}."""
        by_section: dict = {}
        for key, value in overrides.items():
            section = section_of(key)
            field_ = next(f for f in fields(SECTIONS[section]) if f.name == key)
            by_section.setdefault(section, {})[key] = _coerce(SECTIONS[section], field_, value)
        return replace(self, **{s: replace(getattr(self, s), **kv) for s, kv in by_section.items()})


SECTIONS = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]

PRESETS = {
    "default": Config(),
    "smoke": Config(
        data=DataConfig(data="synthetic", synthetic_size=512, augment="crop_flip"),
        model=ModelConfig(model="shallow_cnn"),
        train=TrainConfig(epochs=2, batch_size=64, optimizer="adam", lr=2e-3),
    ),
}


# The training fields Population Based Training changes in the middle of a trial (search.make_scheduler).
PBT_MUTATIONS = ("lr", "weight_decay")

# Defaults a model brings with it, applied when it is chosen, under YAML and flags.
MODEL_RECIPES = {
    # airbench94's recipe in Keras' units: LR 11.5 and decay 0.0153 "per 1024 examples" of a summed
    # loss become lr 11.5 x 1024 / (1024 x (1 + 1/(1 - 0.85))) = 1.5 on the mean loss and a coupled
    # decay 0.0153 / 11.5. Parity with airbench94.py and time to accuracy: benchmarks/README.md.
    "fast_resnet": {"epochs": 10, "batch_size": 1024, "optimizer": "sgd_coupled", "lr": 1.5,
                    "lr_batch_size": 1024, "momentum": 0.85, "schedule": "triangle",
                    "weight_decay": 0.0153 / 11.5, "bias_lr_scale": 64.0, "whitening_bias_epochs": 3,
                    "lookahead": True, "label_smoothing": 0.2, "augment": "crop_flip", "crop_padding": 2,
                    "tta": True},
}


def choices_of(key: str) -> tuple:
    """The allowed values of a config field, as declared on it."""
    return next(f for f in fields(SECTIONS[section_of(key)]) if f.name == key).metadata["choices"]


def section_of(key: str) -> str:
    for name, cls in SECTIONS.items():
        if key in {f.name for f in fields(cls)}:
            return name
    raise ValueError(f"unknown config key: {key!r}")


def field_type(section: type, name: str) -> type:
    """The concrete type of a field: Optional[int] -> int, Optional[tuple[int, ...]] -> tuple."""
    hint = typing.get_type_hints(section)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    hint = args[0] if args else hint
    return tuple if typing.get_origin(hint) is tuple else hint


def item_type(section: type, name: str) -> type:
    """The element type of a tuple field: Optional[tuple[int, ...]] -> int."""
    hint = next(a for a in typing.get_args(typing.get_type_hints(section)[name]) if a is not type(None))
    return typing.get_args(hint)[0]


def _coerce(section: type, f: dataclasses.Field, value: Any) -> Any:
    kind = field_type(section, f.name)
    if value is None:
        return None
    if kind is tuple:
        item = item_type(section, f.name)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{f.name}: expected a list, got {value!r}")
        return tuple(float(v) if item is float and isinstance(v, int) else v for v in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{f.name}: expected {kind.__name__}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{f.name}: {value!r} is not one of {', '.join(choices)}")
    return value


def _section_from_dict(cls: type, d: dict) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"unknown key(s) in {cls.__name__}: {sorted(unknown)}")
    return cls(**{k: _coerce(cls, known[k], v) for k, v in d.items()})


def flatten(nested: dict) -> dict:
    return {k: v for section in nested.values() for k, v in section.items()}


def with_recipe(cfg: Config, model: str) -> Config:
    """`cfg` training `model` with that model's recipe (MODEL_RECIPES), if it has one."""
    return cfg.with_overrides({"model": model, **MODEL_RECIPES.get(model, {})})
