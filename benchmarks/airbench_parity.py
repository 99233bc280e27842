"""Parity harness: airbench94 (the PyTorch reference) and cifar-ray's fast_resnet recipe, side
by side on this machine's CPU, on the same training and validation images.

The reference is not copied here: `reference` imports the user's own copy of airbench94.py
(legacy/airbench94.py in github.com/KellerJordan/cifar10-airbench) and patches it at run time
to run on the CPU in float32 and to read our split instead of downloading CIFAR-10. It runs
in a scratch virtualenv with PyTorch's CPU wheel, never in the product's:

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 numpy
    # 1. the product's split (same seed, same held-out images as `cifar-ray train`)
    python benchmarks/airbench_parity.py export --data ../shared/data/cifar10/train --out /tmp/split.npz
    # 2. the reference, then the port (plain keras.fit on the product's model, optimizer,
    #    schedule and lookahead, no Ray), on that split
    /tmp/torchenv/bin/python benchmarks/airbench_parity.py reference --airbench airbench94.py \\
        --split /tmp/split.npz --epochs 10 --out /tmp/reference.json
    python benchmarks/airbench_parity.py port --split /tmp/split.npz --epochs 10 --out /tmp/port.json
    # 3. the curves side by side, with any `cifar-ray train` run folders on the same split
    python benchmarks/airbench_parity.py plot /tmp/reference.json /tmp/port.json runs/NAME --out parity.png

`--limit N` on export (e.g. 10000) makes a 2-epoch comparison take minutes. Each side prints
one line per epoch (mean training loss, validation accuracy) and, at the end, validation
accuracy without TTA, with the mirror (level 1) and with mirror + 1-pixel translations
(level 2, what airbench quotes); its JSON also holds the LR applied at every step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types

import numpy as np


def export(args) -> None:
    import ray

    from cifar_ray.config import PRESETS, with_recipe
    from cifar_ray.data import load_training_data

    cfg = with_recipe(PRESETS["default"], "fast_resnet").with_overrides({"data": args.data, "limit": args.limit})
    ray.init(logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    train, val, _, info = load_training_data(cfg.data, seed=0)

    def arrays(ds):
        batches = list(ds.iter_batches(batch_size=4096, batch_format="numpy"))
        return np.concatenate([b["image"] for b in batches]), np.concatenate([b["label"] for b in batches])

    (x_train, y_train), (x_val, y_val) = arrays(train), arrays(val)
    np.savez(args.out, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
             mean=np.array(info.mean), std=np.array(info.std), patch_covariance=np.array(info.patch_covariance))
    print(f"{len(y_train)} training, {len(y_val)} validation images -> {args.out}")


# ---------------------------------------------------------------------------- the reference

def reference(args) -> None:
    """Run airbench94.main once on the CPU, on the split, recording what it does."""
    import importlib.util

    import torch

    torch.set_num_threads(args.threads)
    sys.modules["torchvision"] = fake_torchvision()
    sys.modules["torchvision.transforms"] = sys.modules["torchvision"].transforms
    spec = importlib.util.spec_from_file_location("airbench94", args.airbench)
    airbench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(airbench)

    split = np.load(args.split)
    record = {"side": "reference (airbench94.py, PyTorch CPU float32)", "epochs": [], "lr": []}
    patch_for_cpu(torch, airbench, split, record, args.epochs)
    start = time.perf_counter()
    airbench.main(run=0)
    record["train_s"] = round(time.perf_counter() - start)
    write(record, args.out)


def fake_torchvision() -> types.ModuleType:
    """The one torchvision piece airbench94 uses, T.Normalize, for a CPU-only torch."""
    import torch

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = torch.as_tensor(mean).view(-1, 1, 1), torch.as_tensor(std).view(-1, 1, 1)

        def __call__(self, x):
            return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    module = types.ModuleType("torchvision")
    module.transforms = types.SimpleNamespace(Normalize=Normalize)
    return module


def patch_for_cpu(torch, airbench, split, record: dict, epochs: float) -> None:
    """float32 on the CPU, our split as its data, and hooks that record loss, LR and accuracy."""
    from torch import nn

    nn.Module.half = lambda self: self      # keep float32: CPU float16 convolutions are slow
    nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None

    class Event:  # torch.cuda.Event's timing, on the CPU clock
        def __init__(self, **kwargs):
            self.t = 0.0

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return 1000 * (end.t - self.t)

    torch.cuda.Event = Event
    airbench.hyp["opt"]["train_epochs"] = epochs

    class Loader(airbench.CifarLoader):
        def __init__(self, path, train=True, batch_size=500, aug=None, drop_last=None, shuffle=None, gpu=0):
            x, y = (split["x_train"], split["y_train"]) if train else (split["x_val"], split["y_val"])
            self.images = (torch.tensor(x).float() / 255).permute(0, 3, 1, 2).contiguous(
                memory_format=torch.channels_last)
            self.labels, self.classes = torch.tensor(y).long(), list(range(10))
            self.normalize = airbench.T.Normalize(airbench.CIFAR_MEAN, airbench.CIFAR_STD)
            self.proc_images, self.epoch = {}, 0
            self.aug = aug or {}
            self.batch_size = batch_size
            self.drop_last = train if drop_last is None else drop_last
            self.shuffle = train if shuffle is None else shuffle

    airbench.CifarLoader = Loader

    losses = []

    class CrossEntropyLoss(nn.CrossEntropyLoss):  # the mean loss of every training batch
        def forward(self, outputs, labels):
            loss = super().forward(outputs, labels)
            losses.append(float(loss.detach().mean()))
            return loss

    airbench.nn = types.SimpleNamespace(**{k: getattr(nn, k) for k in dir(nn) if not k.startswith("_")})
    airbench.nn.CrossEntropyLoss = CrossEntropyLoss

    class LambdaLR(torch.optim.lr_scheduler.LambdaLR):  # the LR of the non-bias group, every step
        def step(self, *a, **k):
            super().step(*a, **k)  # also called once on creation: that sets the first step's LR
            record["lr"].append(self.optimizer.param_groups[1]["lr"])

    torch.optim.lr_scheduler.LambdaLR = LambdaLR

    evaluate = airbench.evaluate

    def evaluate_all_levels(model, loader, tta_level=0):
        if tta_level == 0:
            return evaluate(model, loader, 0)
        record.update({f"val_tta{level}": evaluate(model, loader, level) for level in (0, 1, 2)})
        return record["val_tta2"]

    airbench.evaluate = evaluate_all_levels
    print_details = airbench.print_training_details

    def log_epoch(variables, is_final_entry):
        if not is_final_entry:
            epoch = {"epoch": variables["epoch"] + 1, "loss": float(np.mean(losses)),
                     "val_accuracy": variables["val_acc"], "seconds": variables["total_time_seconds"]}
            record["epochs"].append(epoch)
            losses.clear()
            print(json.dumps(epoch), flush=True)
        print_details(variables, is_final_entry)

    airbench.print_training_details = log_epoch


# ---------------------------------------------------------------------------------- the port

def port(args) -> None:
    """The product's fast_resnet recipe with plain keras.fit, in memory, on the split."""
    import os

    import keras
    import tensorflow as tf

    from cifar_ray.augment import crop_flip
    from cifar_ray.compat import without_autotuning
    from cifar_ray.config import PRESETS, with_recipe
    from cifar_ray.models import build_model, build_optimizer
    from cifar_ray.optim import Lookahead
    from cifar_ray.train_loop import configure_tensorflow, precision_policy

    split = np.load(args.split)
    overrides = {"epochs": args.epochs, **json.loads(args.override)}
    cfg = with_recipe(PRESETS["default"], "fast_resnet").with_overrides(overrides)
    t = cfg.train
    configure_tensorflow(os.cpu_count() or 1)
    keras.mixed_precision.set_global_policy(precision_policy(t.mixed_precision, False))
    keras.utils.set_random_seed(t.seed)
    x_train, y_train, x_val, y_val = (split[k] for k in ("x_train", "y_train", "x_val", "y_val"))
    steps = len(y_train) // t.batch_size
    model = build_model("fast_resnet", split["mean"], split["std"], split["patch_covariance"])
    model.compile(optimizer=build_optimizer(t, steps),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=t.label_smoothing), metrics=["accuracy"])
    record = {"side": f"port (cifar-ray fast_resnet, keras.fit, {keras.mixed_precision.global_policy().name})",
              "config": overrides, "epochs": [], "lr": []}

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            record["lr"].append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))

    callbacks = [Record(), *([Lookahead(t.epochs * steps)] if t.lookahead else [])]
    one_hot = keras.utils.to_categorical(y_train, 10)
    rng = np.random.default_rng(t.seed)
    start = time.perf_counter()
    for epoch in range(t.epochs):
        images = crop_flip(x_train, rng, pad=cfg.data.crop_padding)
        ds = tf.data.Dataset.from_tensor_slices((images, one_hot)).shuffle(len(images), seed=epoch)
        history = model.fit(without_autotuning(ds.batch(t.batch_size, drop_remainder=True).prefetch(2)),
                            epochs=epoch + 1, initial_epoch=epoch, verbose=0, callbacks=callbacks)
        row = {"epoch": epoch + 1, "loss": float(history.history["loss"][-1]),
               "val_accuracy": tta_accuracy(model, x_val, y_val, 0), "seconds": time.perf_counter() - start}
        record["epochs"].append(row)
        print(json.dumps(row), flush=True)
    record["train_s"] = round(time.perf_counter() - start)
    record.update({f"val_tta{level}": tta_accuracy(model, x_val, y_val, level) for level in (0, 1, 2)})
    write(record, args.out)


def tta_accuracy(model, images: np.ndarray, labels: np.ndarray, level: int) -> float:
    """airbench's TTA: level 1 averages the image and its mirror, level 2 also (at half the
    weight) the mirror pairs of the image moved one pixel up-left and down-right. Averaging
    log-probabilities picks the class that averaging logits would."""
    def log_probs(x):
        return np.log(np.maximum(model.predict(x, batch_size=1000, verbose=0), 1e-30))

    def mirror(x):
        return log_probs(x) if level == 0 else 0.5 * (log_probs(x) + log_probs(x[:, :, ::-1]))

    scores = mirror(images)
    if level == 2:
        padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        scores = 0.5 * scores + 0.25 * (mirror(padded[:, :32, :32]) + mirror(padded[:, 2:, 2:]))
    return float((scores.argmax(1) == labels).mean())


# ------------------------------------------------------------------------------------ output

def write(record: dict, path: str) -> None:
    summary = {k: v for k, v in record.items() if k not in ("epochs", "lr")}
    print(json.dumps(summary), flush=True)
    with open(path, "w") as fh:
        json.dump(record, fh)


def run_record(folder: str) -> dict:
    """A `cifar-ray train` run folder as a record: its history and its audit's accuracy
    (which the run scored with the TTA its checkpoint asks for)."""
    import csv
    import os

    summary = json.load(open(os.path.join(folder, "summary.json")))
    rows = list(csv.DictReader(open(os.path.join(folder, "history.csv"))))
    audit = json.load(open(os.path.join(summary["best_checkpoint"], "metrics.json")))
    return {"side": f"product ({os.path.basename(folder.rstrip('/'))}, Ray Train)",
            "epochs": [{"epoch": int(r["epoch"]), "loss": float(r["loss"]), "val_accuracy": float(r["val_accuracy"])}
                       for r in rows],
            "lr": [float(r["lr"]) for r in rows], "val_tta2": audit["accuracy"]}


def plot(args) -> None:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run_record(p) if os.path.isdir(p) else json.load(open(p)) for p in args.records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        epochs = [e["epoch"] for e in run["epochs"]]
        label = f"{run['side']}: {run.get('val_tta2', float('nan')):.4f} (TTA)"
        axes[0].plot(epochs, [e["loss"] for e in run["epochs"]], marker="o", label=label)
        axes[1].plot(epochs, [e["val_accuracy"] for e in run["epochs"]], marker="o", label=label)
        steps = np.arange(len(run["lr"])) / max(1, len(run["lr"])) * len(epochs)
        axes[2].plot(steps, np.array(run["lr"]) / max(run["lr"]), label=run["side"])
    for ax, title in zip(axes, ("training loss (mean per epoch)", "validation accuracy (no TTA)",
                                "LR applied per step / its peak")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write the product's split as .npz")
    p.add_argument("--data", default="../shared/data/cifar10/train")
    p.add_argument("--limit", type=int, default=None, help="training images (for a quick comparison)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("reference", help="airbench94.py on the CPU (PyTorch virtualenv)")
    p.add_argument("--airbench", required=True, help="path to airbench94.py")
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("port", help="cifar-ray's fast_resnet recipe with keras.fit")
    p.add_argument("--override", default="{}", help='JSON of config fields to change, e.g. \'{"lookahead": false}\'')
    for name in ("reference", "port"):
        p = sub.choices[name]
        p.add_argument("--split", required=True)
        p.add_argument("--epochs", type=int, default=10)
        p.add_argument("--out", required=True)
    p = sub.add_parser("plot", help="the curves side by side")
    p.add_argument("records", nargs="+")
    p.add_argument("--out", default="parity.png")
    args = parser.parse_args()
    {"export": export, "reference": reference, "port": port, "plot": plot}[args.command](args)


if __name__ == "__main__":
    main()
