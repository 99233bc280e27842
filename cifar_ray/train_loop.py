"""What runs on each Ray Train worker: build or restore the model, fit it on the worker's
shard (under MultiWorkerMirroredStrategy with 2+ workers), and report metrics and a
checkpoint every epoch.

Ray Train runs `train.train_loop_per_worker`, which imports this module on the worker and
calls `fit_on_this_worker`; Tune's trials run the same loop. This is the only training
module that imports Keras at the top: the driver, each Tune trial's process, and `--help`
never need it.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import keras

from cifar_ray.config import PBT_MUTATIONS, TENSORBOARD_DIR, Config
from cifar_ray.data import DataInfo, training_steps_per_epoch
from cifar_ray.progress import format_duration
from cifar_ray.worker_input import training_input, validation_input


def fit_on_this_worker(loop_config: dict, callbacks: tuple = ()) -> keras.Model:
    """Build or restore the model, fit it on this worker's shard, return it.

    `callbacks` run before the reporting one (benchmarks/epoch_timeline.py times steps).
    """
    import ray
    import ray.train

    cfg = Config.from_dict(loop_config["config"])
    info = DataInfo(**loop_config["data_info"])
    context = ray.train.get_context()
    policy = precision_policy(cfg.train.mixed_precision, cfg.scaling.use_gpu)
    per_worker_batch = cfg.train.batch_size // context.get_world_size()
    print(f"worker {context.get_world_rank()}/{context.get_world_size()} on node "
          f"{ray.get_runtime_context().get_node_id()}, batch {per_worker_batch}, {policy}",
          file=sys.__stdout__, flush=True)
    configure_tensorflow(loop_config["threads"])
    # Keras on a tf.data input of unknown length: true, and nothing to act on.
    warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    keras.mixed_precision.set_global_policy(policy)
    strategy = worker_strategy(context.get_world_size())

    steps_per_epoch = training_steps_per_epoch(info.num_train, cfg.train.batch_size, context.get_world_size())
    with strategy.scope():
        checkpoint = ray.train.get_checkpoint() or loop_config["start_from"]
        model, history = restore_or_build_model(cfg, info, checkpoint, steps_per_epoch)
    if len(history) >= cfg.train.epochs:
        # Restored after its last epoch (a run or Tune trial interrupted as it finished):
        # report the final metrics again, since Tune may not have seen them.
        ray.train.report(history[-1])
        return model

    model.fit(
        training_input(strategy, ray.train.get_dataset_shard("train"), per_worker_batch, steps_per_epoch,
                       augmented=cfg.data.augment != "none"),
        validation_data=validation_input(strategy, ray.train.get_dataset_shard("val"), per_worker_batch),
        epochs=cfg.train.epochs,
        initial_epoch=len(history),
        callbacks=[*callbacks, *lookahead(cfg, steps_per_epoch), *tensorboard_on_chief(cfg, context.get_world_rank()),
                   ReportEpoch(cfg, info, history)],
        verbose=0,
    )
    return model


def worker_strategy(world_size: int):
    """MultiWorkerMirroredStrategy (with compat.py's fixes) when there are workers to keep in
    step; TensorFlow's default strategy for a single worker, whose collectives would only
    cost time (notebook_cnn: about 10% of an epoch, benchmarks/README.md)."""
    import tensorflow as tf

    from cifar_ray.compat import patch_multi_worker_fit

    if world_size == 1:
        return tf.distribute.get_strategy()
    patch_multi_worker_fit()
    return tf.distribute.MultiWorkerMirroredStrategy()


def lookahead(cfg: Config, steps_per_epoch: int) -> list:
    """optim.Lookahead over the whole run, where the recipe asks for it (before ReportEpoch, so
    that the last epoch's checkpoint holds the averaged weights)."""
    from cifar_ray.optim import Lookahead

    return [Lookahead(cfg.train.epochs * steps_per_epoch)] if cfg.train.lookahead else []


def tensorboard_on_chief(cfg: Config, rank: int) -> list:
    """Keras's TensorBoard callback, on rank 0 only, writing into the run folder: loss,
    accuracy and learning rate per epoch, and the model graph. `tensorboard --logdir
    <storage-path>` shows every run and Tune trial. None where TF cannot write there."""
    import tensorflow as tf

    if rank != 0:
        return []
    log_dir = f"{cfg.run_dir}/{TENSORBOARD_DIR}"
    try:
        tf.io.gfile.makedirs(log_dir)
    except Exception as e:  # a storage URI TF has no file system for (s3:// without tensorflow-io)
        print(f"TensorBoard logs off: cannot write {log_dir} ({str(e).splitlines()[0]})", file=sys.__stdout__)
        return []
    return [keras.callbacks.TensorBoard(log_dir, write_graph=True, profile_batch=0)]


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
    from cifar_ray.models import build_model, build_optimizer, set_hyperparameters

    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            model, metadata = load_checkpoint(directory)
        saved = Config.from_dict(metadata["config"]).train
        if any(getattr(saved, k) != getattr(cfg.train, k) for k in PBT_MUTATIONS):  # PBT's explore step
            set_hyperparameters(model.optimizer, cfg.train, steps_per_epoch)
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
            mean_epoch_s = sum(m["epoch_time_s"] for m in self.history) / len(self.history)
            eta_s = mean_epoch_s * (self.cfg.train.epochs - epoch - 1)
            print(format_epoch(metrics, self.cfg.train.epochs, eta_s), file=sys.__stdout__, flush=True)
        # Every worker saves (saving may need collectives), only rank 0's copy is kept.
        with tempfile.TemporaryDirectory() as directory:
            metadata = make_metadata(self.cfg, self.info, epoch=epoch + 1, metrics=metrics,
                                     history=self.history)
            save_checkpoint(directory, self.model, metadata)
            checkpoint = ray.train.Checkpoint.from_directory(directory) if is_chief else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch + 1:04d}")


def format_epoch(m: dict, epochs: int, eta_s: float) -> str:
    return (f"epoch {m['epoch']}/{epochs}  loss {m['loss']:.4f}  acc {m['accuracy']:.4f}  "
            f"val_loss {m['val_loss']:.4f}  val_acc {m['val_accuracy']:.4f}  "
            f"lr {m['lr']:.2e}  {m['epoch_time_s']:.1f}s  {m['images_per_s']:.0f} img/s  "
            f"ETA {format_duration(eta_s)}")

