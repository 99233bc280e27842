"""The audit every exported model carries: metrics, figures and a model card; and a
training run's own history.csv and curves.png.

`compute_metrics` is a pure function of labels and predicted probabilities; the figure
functions return PNG bytes; `model_card` writes Markdown in the spirit of Mitchell et al.,
"Model Cards for Model Reporting" (2019).
"""

from __future__ import annotations

import csv
import io

import numpy as np

ECE_BINS = 15


def compute_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, loss, top-5, per-class precision/recall/F1, worst class, ECE, confusion."""
    n, k = probabilities.shape
    predicted = probabilities.argmax(1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    true_positives = np.diag(confusion)
    support = confusion.sum(1)
    predicted_counts = confusion.sum(0)
    precision = np.divide(true_positives, predicted_counts, out=np.zeros(k), where=predicted_counts > 0)
    recall = np.divide(true_positives, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k),
                   where=(precision + recall) > 0)
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "accuracy": float(recall[i]), "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    present = support > 0
    mean_class_accuracy = float(recall[present].mean())
    worst = int(np.argmin(np.where(present, recall, np.inf)))
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    return {
        "examples": int(n),
        "accuracy": float(np.mean(predicted == labels)),
        "loss": cross_entropy(labels, probabilities),
        "top5_accuracy": float(np.mean((top5 == labels[:, None]).any(1))),
        "mean_class_accuracy": mean_class_accuracy,
        "worst_class": class_names[worst],
        "worst_class_accuracy": float(recall[worst]),
        "worst_class_gap": mean_class_accuracy - float(recall[worst]),
        "ece": expected_calibration_error(labels, probabilities),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def cross_entropy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean cross-entropy, clipped as Keras clips it (1e-7), so it matches Keras's loss."""
    return float(np.mean(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0))))


def calibration_bins(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS):
    """Per confidence bin [i/bins, (i+1)/bins): (count, mean confidence, accuracy)."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(index, minlength=bins)
    mean_confidence = np.bincount(index, confidence, bins) / np.maximum(count, 1)
    accuracy = np.bincount(index, correct.astype(float), bins) / np.maximum(count, 1)
    return count, mean_confidence, accuracy


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> float:
    count, confidence, accuracy = calibration_bins(labels, probabilities, bins)
    return float(np.sum(count / count.sum() * np.abs(accuracy - confidence)))


# ---------------------------------------------------------------------------------------
# Figures (PNG bytes)
# ---------------------------------------------------------------------------------------

def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(metrics: dict, class_names: list[str]) -> bytes:
    plt = _pyplot()
    confusion = np.array(metrics["confusion_matrix"], dtype=float)
    normalized = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    image = ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(j, i, f"{normalized[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if normalized[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"Confusion matrix (row-normalized), accuracy {metrics['accuracy']:.3f}")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _png(fig)


def plot_per_class_accuracy(metrics: dict, class_names: list[str]) -> bytes:
    plt = _pyplot()
    accuracy = [metrics["per_class"][c]["accuracy"] for c in class_names]
    worst = metrics["worst_class"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(class_names, accuracy, color=["tab:red" if c == worst else "tab:blue" for c in class_names])
    ax.axhline(metrics["mean_class_accuracy"], color="black", linestyle="--",
               label=f"mean {metrics['mean_class_accuracy']:.3f}")
    ax.set(ylim=(0, 1), ylabel="accuracy (recall)",
           title=f"Per-class accuracy; worst: {worst} ({metrics['worst_class_accuracy']:.3f})")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(loc="lower right")
    return _png(fig)


def plot_reliability(labels: np.ndarray, probabilities: np.ndarray, ece: float,
                     ece_before: float | None = None) -> bytes:
    plt = _pyplot()
    count, confidence, accuracy = calibration_bins(labels, probabilities)
    edges = np.linspace(0, 1, ECE_BINS + 1)
    used = count > 0
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.bar(edges[:-1][used], accuracy[used], width=1 / ECE_BINS, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy in bin")
    ax.plot(confidence[used], accuracy[used], "o", color="tab:red", label="(confidence, accuracy)")
    before = "" if ece_before is None else f"\n(before temperature scaling: {ece_before:.3f})"
    ax.set(ylabel="accuracy", ylim=(0, 1), title=f"Reliability diagram, ECE {ece:.3f} ({ECE_BINS} bins){before}")
    ax.legend(loc="upper left")
    hist.bar(edges[:-1], count, width=1 / ECE_BINS, align="edge", edgecolor="black", color="gray")
    hist.set(xlabel="confidence (max probability)", ylabel="examples", xlim=(0, 1))
    return _png(fig)


def calibration_rows(metrics: dict) -> str:
    """The model card's rows on temperature scaling, where this audit fitted it."""
    c = metrics.get("calibration")
    if not c:
        return f"| temperature | {metrics.get('temperature', 1.0)} |"
    return (f"| expected calibration error before temperature scaling | {c['ece_before']:.4f} |\n"
            f"| temperature (fitted on these images) | {c['temperature']} |\n"
            f"| ECE with the temperature fitted on the other half of these images | {c['ece_cross_fitted']:.4f} |")


def plot_errors(errors: list[dict], class_names: list[str]) -> bytes:
    """A grid of the most confidently wrong examples: image, true and predicted label."""
    plt = _pyplot()
    columns = 4
    rows = max(1, -(-len(errors) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, e in zip(axes.flat, errors):
        ax.imshow(e["image"], interpolation="nearest")
        ax.set_title(f"true {class_names[e['label']]}\npred {class_names[e['predicted']]} "
                     f"({e['probabilities'].max():.2f})", fontsize=8)
    fig.suptitle("Most confidently wrong predictions" if errors else "No wrong predictions")
    return _png(fig)


# ---------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------

def model_card(metrics: dict, metadata: dict, checkpoint: str, data: dict) -> str:
    """Markdown model card. `data` says what was evaluated: source, examples, split."""
    config = metadata["config"]
    train_data = metadata["data"]
    per_class_rows = "\n".join(
        f"| {name} | {m['accuracy']:.3f} | {m['precision']:.3f} | {m['f1']:.3f} | {m['support']} |"
        for name, m in sorted(metrics["per_class"].items(), key=lambda kv: kv[1]["accuracy"]))
    worst3 = sorted(metrics["per_class"].items(), key=lambda kv: kv[1]["accuracy"])[:3]
    return f"""# Model card: {metadata['model']} ({checkpoint_id(checkpoint)})

## Model
- Architecture: `{metadata['model']}`, Keras {metadata['versions']['keras']}, trained with
  Ray {metadata['versions']['ray']} and TensorFlow {metadata['versions']['tensorflow']}.
- Checkpoint: `{checkpoint}` (epoch {metadata['epoch']}, created {metadata['created']}).
- Input: {metadata['input_dtype']}, shape {metadata['input_shape']}; the model normalizes with
  mean {_fmt(metadata['normalization']['mean'])} and std {_fmt(metadata['normalization']['std'])}.
- Output: probabilities over {len(metadata['class_names'])} classes: {', '.join(metadata['class_names'])}.
- Training: {config['train']['epochs']} epochs, optimizer {config['train']['optimizer']}, lr {config['train']['lr']}
  ({config['train']['schedule']}), global batch {config['train']['batch_size']}, augmentation
  {config['data']['augment']}, {config['scaling']['num_workers']} worker(s), seed {config['train']['seed']}.
  Full configuration: `metadata.json` in the checkpoint.

## Data
- Training data: `{train_data['source']}`, {train_data['num_train']} training images, with
  {train_data['num_val']} held out for validation (seeded split, val fraction {config['data']['val_fraction']}).
- Evaluation data: `{data['source']}`, {metrics['examples']} images ({data['split']}).
- CIFAR-10 (Krizhevsky, 2009): 32x32 photos from the 80 Million Tiny Images collection,
  6,000 per class in the original 60,000-image release.

## Metrics (evaluation data)
| metric | value |
| --- | --- |
| accuracy | {metrics['accuracy']:.4f} |
| top-5 accuracy | {metrics['top5_accuracy']:.4f} |
| loss (cross-entropy) | {metrics['loss']:.4f} |
| mean per-class accuracy | {metrics['mean_class_accuracy']:.4f} |
| worst class | {metrics['worst_class']} ({metrics['worst_class_accuracy']:.4f}) |
| worst-class gap to the mean | {metrics['worst_class_gap']:.4f} |
| expected calibration error ({ECE_BINS} bins) | {metrics['ece']:.4f} |
{calibration_rows(metrics)}
| examples | {metrics['examples']} |

### Per class, worst first
| class | accuracy (recall) | precision | F1 | examples |
| --- | --- | --- | --- | --- |
{per_class_rows}

Worst classes: {', '.join(f'{name} ({m["accuracy"]:.3f})' for name, m in worst3)}.

![confusion matrix](confusion_matrix.png)
![per-class accuracy](per_class.png)
![reliability diagram](reliability.png)
![most confident errors](errors.png)

## Intended use
Classifying small natural images into the ten CIFAR-10 classes; teaching and benchmarking
distributed training and serving. Probabilities are calibrated only as far as the ECE above says;
`temperature` in metadata.json scales them (evaluate, predict and Serve apply it; a plain
`keras.models.load_model` of model.keras does not).

## Out-of-scope uses
- Faces or people, in any form (identity, gender, age, emotion): CIFAR-10 has no such classes,
  and this model must not be repurposed for them without new data and a new audit.
- Any decision about a person, safety-critical perception, surveillance.
- Images outside the ten classes: the model always answers one of the ten, confidently or not.

## Known limitations
- Inputs are 32x32 pixels; larger images are downscaled and lose detail.
- CIFAR-10 has known label noise and near-duplicate images, and class imbalances in
  backgrounds and poses (for example ships on water, planes against sky) that models exploit.
- Accuracy differs between classes (see the per-class table): look at the worst class, not
  only the mean.
- The evaluation data shares the training data's distribution; accuracy on other photos is lower.
"""


def history_csv(history: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def plot_curves(history: list[dict], title: str) -> bytes:
    """The notebook's two plots, accuracy and loss, train vs validation, as PNG bytes."""
    import matplotlib.ticker

    plt = _pyplot()
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
    return _png(fig)


def checkpoint_id(checkpoint: str) -> str:
    """A short human id for a checkpoint: its run folder and epoch folder."""
    parts = checkpoint.rstrip("/").split("/")
    return "/".join(parts[-2:])


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"
