"""Distributed data-parallel training of a CIFAR-10 Keras model with Ray Train.

    python -m cifar_ray.train                                   # local Ray, Keras CIFAR-10
    python -m cifar_ray.train --data ../shared/data/cifar10/train --num-workers 2 --epochs 2
    ray job submit --working-dir . -- python -m cifar_ray.train --num-workers 4 --use-gpu

The driver reads, decodes and splits the data once with Ray Data, then a TensorflowTrainer
runs `train_loop_per_worker` on every worker under MultiWorkerMirroredStrategy. Each epoch
every worker streams its shard of freshly augmented images, and rank 0 reports metrics
and a self-describing checkpoint. Rerunning with the same --name resumes from the latest
checkpoint; a dead worker restarts the group from it (up to --max-failures).

A run folder <storage-path>/<name>/ ends with summary.json, history.csv, curves.png and
the Ray Train checkpoints (the best --keep-checkpoints by validation accuracy). The run is
tracked in MLflow (tracking.py), and its best checkpoint becomes a version of the registered
model, which the promotion gate makes champion, the version Serve serves, or not (registry.py).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import keras

from cifar_ray.config import CLASS_NAMES, Config, add_config_flags, config_from_args, with_global_batch
from cifar_ray.data import AUGMENT_TASK_CPUS, DataInfo, check_source

SCORE_METRIC = "val_accuracy"


# ---------------------------------------------------------------------------------------
# On each worker
# ---------------------------------------------------------------------------------------

def train_loop_per_worker(loop_config: dict, callbacks: tuple = ()) -> keras.Model:
    """Build or restore the model, fit it on this worker's shard, return it.

    `callbacks` run before the reporting one (benchmarks/epoch_timeline.py times steps).
    """
    import ray
    import ray.train
    import tensorflow as tf

    from cifar_ray.compat import patch_multi_worker_fit

    cfg = Config.from_dict(loop_config["config"])
    info = DataInfo(**loop_config["data_info"])
    context = ray.train.get_context()
    policy = precision_policy(cfg.train.mixed_precision, cfg.scaling.use_gpu)
    print(f"worker {context.get_world_rank()}/{context.get_world_size()} on node "
          f"{ray.get_runtime_context().get_node_id()}, batch "
          f"{cfg.train.batch_size // context.get_world_size()}, {policy}", file=sys.__stdout__, flush=True)
    configure_tensorflow(loop_config["threads"])
    keras.mixed_precision.set_global_policy(policy)
    patch_multi_worker_fit()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()

    steps_per_epoch = max(1, info.num_train // cfg.train.batch_size)
    with strategy.scope():
        model, history = restore_or_build_model(cfg, info, ray.train.get_checkpoint(), steps_per_epoch)
    if len(history) >= cfg.train.epochs:
        # Restored after its last epoch (a run or Tune trial interrupted as it finished):
        # report the final metrics again, since Tune may not have seen them.
        ray.train.report(history[-1])
        return model

    model.fit(
        make_tf_dataset(ray.train.get_dataset_shard("train"), cfg.train.batch_size, training=True),
        validation_data=make_tf_dataset(ray.train.get_dataset_shard("val"), cfg.train.batch_size),
        epochs=cfg.train.epochs,
        initial_epoch=len(history),
        callbacks=[*callbacks, ReportEpoch(cfg, info, history)],
        verbose=0,
    )
    return model


def configure_tensorflow(threads: int) -> None:
    """One TF thread pool sized to the worker's CPUs: the default oversubscribes cores."""
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # one INFO line per collective op otherwise
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def precision_policy(mixed_precision: bool, use_gpu: bool) -> str:
    """The Keras dtype policy: mixed where the hardware computes in 16 bits natively."""
    if not mixed_precision:
        return "float32"
    if use_gpu:
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_has_native_bf16() else "float32"


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: oneDNN then runs bfloat16 convolutions about 2x faster than float32
    (benchmarks/README.md); without them bfloat16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def restore_or_build_model(cfg: Config, info: DataInfo, checkpoint, steps_per_epoch: int):
    """(model, history so far): from the latest checkpoint when resuming, else fresh."""
    from cifar_ray.checkpoint import load_checkpoint
    from cifar_ray.models import build_model, build_optimizer

    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            model, metadata = load_checkpoint(directory)
        return model, metadata["history"]

    keras.utils.set_random_seed(cfg.train.seed)
    model = build_model(cfg.model.model, info.mean, info.std, info.patch_covariance)
    model.compile(
        optimizer=build_optimizer(cfg.train, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.train.label_smoothing),
        metrics=["accuracy"],
        jit_compile=cfg.train.jit_compile,
        steps_per_execution=cfg.train.steps_per_execution,
    )
    return model, []


def make_tf_dataset(shard, global_batch_size: int, training: bool = False):
    """A worker's Ray Data shard as a tf.data.Dataset of (uint8 images, one-hot labels).

    Batches hold the *global* batch size: under MultiWorkerMirroredStrategy Keras rebatches
    each into global_batch_size / num_workers per worker and step, and every worker reads
    its whole shard. `to_tf` turns TF's auto-sharding off, so no example is dropped.
    Labels are one-hot because Keras smooths labels only in CategoricalCrossentropy.

    tf.data autotuning is off, as in the per-device pipelines (compat.py, point 3): nothing
    here is tunable, and its model thread stalled epoch boundaries by 10-80 s.
    """
    import tensorflow as tf

    from cifar_ray.compat import without_autotuning

    dataset = shard.to_tf(
        feature_columns="image",
        label_columns="label",
        batch_size=global_batch_size,
        drop_last=training,
        local_shuffle_buffer_size=4 * global_batch_size if training else None,
    )
    return without_autotuning(dataset.map(lambda x, y: (x, tf.one_hot(y, len(CLASS_NAMES)))))


class ReportEpoch(keras.callbacks.Callback):
    """After each epoch, report metrics and a checkpoint to Ray Train."""

    def __init__(self, cfg: Config, info: DataInfo, history: list[dict]):
        super().__init__()
        self.cfg, self.info, self.history = cfg, info, history

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        import ray.train

        from cifar_ray.checkpoint import make_metadata, save_checkpoint

        seconds = time.perf_counter() - self.epoch_start
        metrics = {
            "epoch": epoch + 1,
            **{k: float(v) for k, v in logs.items() if k != "learning_rate"},
            "lr": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            "epoch_time_s": round(seconds, 3),
            "images_per_s": round(self.info.num_train / seconds, 1),
        }
        self.history.append(metrics)
        context = ray.train.get_context()
        is_chief = context.get_world_rank() == 0
        if is_chief:
            # Straight to the process's stdout, which Ray streams to the driver: Ray Train's
            # patched print() would also log it, and the line would show twice.
            print(format_epoch(metrics, self.cfg.train.epochs), file=sys.__stdout__, flush=True)
        # Every worker saves (saving may need collectives), only rank 0's copy is kept.
        with tempfile.TemporaryDirectory() as directory:
            metadata = make_metadata(self.cfg, self.info, epoch=epoch + 1, metrics=metrics,
                                     history=self.history)
            save_checkpoint(directory, self.model, metadata)
            checkpoint = ray.train.Checkpoint.from_directory(directory) if is_chief else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch + 1:04d}")


def format_epoch(m: dict, epochs: int) -> str:
    return (f"epoch {m['epoch']}/{epochs}  loss {m['loss']:.4f}  acc {m['accuracy']:.4f}  "
            f"val_loss {m['val_loss']:.4f}  val_acc {m['val_accuracy']:.4f}  "
            f"lr {m['lr']:.2e}  {m['epoch_time_s']:.1f}s  {m['images_per_s']:.0f} img/s")


# ---------------------------------------------------------------------------------------
# On the driver
# ---------------------------------------------------------------------------------------

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


def run(cfg: Config, train_loop=train_loop_per_worker) -> dict:
    """Train as configured, register the best checkpoint through the gate, and return the
    run's summary (also written to summary.json)."""
    from cifar_ray import tracking
    from cifar_ray.data import load_training_data

    cfg = with_global_batch(resolve_run(cfg, default_name=datetime.now().strftime("train-%Y%m%d-%H%M%S")))
    check_storage_writable(cfg.run.storage_path)
    uri = tracking.tracking_uri(cfg)
    tracking.check_reachable(uri)
    started = time.perf_counter()
    train, val, holdout, info = load_training_data(cfg.data, seed=cfg.train.seed)
    print(f"data: {info.num_train} training / {info.num_val} validation images from {info.source}; "
          f"{info.num_holdout} held out for the registry's evaluation set", flush=True)

    run_id = tracking.start_run(uri, cfg, kind="train")
    print(f"tracking: MLflow run {run_id} in {uri}", flush=True)
    with tracking.run_status(uri, run_id):
        tracking.log_data_info(uri, run_id, info)
        trainer = make_trainer(cfg, train, val, info, train_loop, callbacks=(tracking.EpochLogger(uri, run_id),))
        result = fit_or_explain(trainer, cfg)
        summary = write_run_outputs(cfg, result, wall_time_s=time.perf_counter() - started)
        audit_best_checkpoint(summary, val, info)
        register_best(cfg, run_id, summary, holdout, info)
        tracking.log_outputs(uri, run_id, summary["run_dir"])
    return summary


def register_best(cfg: Config, run_id: str, summary: dict, holdout, info: DataInfo) -> None:
    """The registry's decision on the best checkpoint, into `summary` and summary.json; a
    registry that cannot be reached is recorded there too, and its error raised."""
    from cifar_ray.registry import register_run
    from cifar_ray.tracking import TrackingUnavailable

    try:
        summary["registry"] = register_run(cfg, run_id, summary["best_checkpoint"], holdout, info,
                                           summary["run_dir"])
    except TrackingUnavailable as e:
        summary["registry"] = {"error": str(e)}
        raise
    finally:
        write_summary(summary)


def fit_or_explain(trainer, cfg: Config):
    """trainer.fit(), turning a worker group that kept failing into one clear message."""
    import ray.train

    from cifar_ray.checkpoint import checkpoint_names
    from cifar_ray.cli import TrainingFailed, find_user_error, first_line

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        if find_user_error(e) is not None:  # bad data or checkpoint: its own message says more
            raise
        causes = list(getattr(e, "worker_failures", {}).values()) or [e]
        cause = first_line(causes[0], limit=200).rstrip(".")
        run_dir = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
        kept = checkpoint_names(run_dir)
        raise TrainingFailed(
            f"training failed after {cfg.run.max_failures} restart(s) (--max-failures): {cause}. "
            f"{len(kept)} checkpoint(s) kept in {run_dir} (latest {kept[-1] if kept else 'none'}); "
            f"rerun with --name {cfg.run.name} to resume") from None


def resolve_run(cfg: Config, default_name: str) -> Config:
    """Fill in the run name and make a local storage path absolute (Ray needs one)."""
    return cfg.with_overrides({"name": cfg.run.name or default_name,
                               "storage_path": absolute_storage_path(cfg.run.storage_path)})


def make_trainer(cfg: Config, train, val, info: DataInfo, train_loop=train_loop_per_worker,
                 callbacks: tuple = ()):
    """The TensorflowTrainer for one training run; `run` and each Tune trial fit one."""
    import ray
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    from cifar_ray.data import add_augmentation

    cpus_per_worker, threads = plan_resources(cfg, ray.cluster_resources().get("CPU", 1))
    return TensorflowTrainer(
        train_loop,
        train_loop_config={"config": cfg.to_dict(), "data_info": asdict(info), "threads": threads},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
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
            callbacks=list(callbacks),
        ),
        datasets={"train": add_augmentation(train, cfg.data.augment), "val": val},
    )


def audit_best_checkpoint(summary: dict, val, info: DataInfo) -> None:
    """Evaluate the best checkpoint on the validation split: metrics, figures, MODEL_CARD.md.

    Written into the run folder and into the checkpoint itself, so the model carries it.
    """
    from cifar_ray.evaluate import evaluate_dataset

    data = {"source": info.source, "split": f"validation split, {info.num_val} images"}
    evaluate_dataset(val, summary["best_checkpoint"], data,
                     outs=(summary["run_dir"], summary["best_checkpoint"]))


def absolute_storage_path(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def check_storage_writable(storage_path: str) -> None:
    """Fail before training, not after an hour, when results could not be saved."""
    import pyarrow.fs

    probe = f"{storage_path.rstrip('/')}/.cifar-ray-write-test"
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(probe)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(b"ok")
        fs.delete_file(path)
    except Exception as e:
        raise PermissionError(f"--storage-path {storage_path} is not writable ({e})") from None


def write_run_outputs(cfg: Config, result, wall_time_s: float) -> dict:
    """summary.json, history.csv and curves.png next to the checkpoints."""
    from cifar_ray.checkpoint import local_checkpoint, read_metadata, write_file

    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.run.name} reported no checkpoint")
    with local_checkpoint(result.checkpoint.path) as latest:
        history = read_metadata(latest)["history"]
    best_checkpoint = result.get_best_checkpoint(SCORE_METRIC, "max") or result.checkpoint
    best = max(history, key=lambda m: m[SCORE_METRIC])
    summary = {
        "run": cfg.run.name,
        "run_dir": result.path,
        "best_checkpoint": best_checkpoint.path,
        "best_epoch": best["epoch"],
        "best_val_accuracy": best["val_accuracy"],
        "best_val_loss": best["val_loss"],
        "epochs": len(history),
        "wall_time_s": round(wall_time_s, 1),
        "train_images_per_s": round(sum(m["images_per_s"] for m in history) / len(history), 1),
        "config": cfg.to_dict(),
    }
    write_summary(summary)
    write_file(result.path, "history.csv", history_csv(history).encode())
    write_file(result.path, "curves.png", plot_curves(history, title=f"{cfg.model.model} · {cfg.run.name}"))
    return summary


def write_summary(summary: dict) -> None:
    from cifar_ray.checkpoint import write_file

    write_file(summary["run_dir"], "summary.json", json.dumps(summary, indent=2).encode())


def history_csv(history: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def plot_curves(history: list[dict], title: str) -> bytes:
    """The notebook's two plots, accuracy and loss, train vs validation, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [m["epoch"] for m in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("accuracy", "loss")):
        ax.plot(epochs, [m[key] for m in history], "o-", label="train")
        ax.plot(epochs, [m[f"val_{key}"] for m in history], "o-", label="validation")
        ax.set(xlabel="epoch", ylabel=key, title=key)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    from cifar_ray.cli import init_ray, run_cli

    parser = argparse.ArgumentParser(prog="python -m cifar_ray.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, ("data", "model", "train", "scaling", "run", "registry"))
    args = parser.parse_args(argv)

    def train() -> None:
        cfg = config_from_args(args)
        check_source(cfg.data.data)
        init_ray()
        summary = run(cfg)
        print(f"best val_accuracy {summary['best_val_accuracy']:.4f} (epoch {summary['best_epoch']})")
        print(f"run folder: {summary['run_dir']}")

    run_cli(train)


if __name__ == "__main__":
    main()
