"""The end of a Tune experiment: one leaderboard row per trial (best first), the comparison
plot, and best/, the winning trial's best checkpoint with best.json."""

from __future__ import annotations

import csv
import io
import json

from cifar_ray.config import Config, flatten
from cifar_ray.search import SEARCHED, trial_config
from cifar_ray.run_folder import SCORE_METRIC


def leaderboard_rows(cfg: Config, results, trials_dir: str | None = None) -> list[dict]:
    """One row per trial: the fields it trained with, best val accuracy, epochs, early stop,
    and its overhead (the trial's time less its epochs'); best first, then the trials that
    failed before their first epoch, with their error. The epochs are read from each trial's
    latest checkpoint under `trials_dir` where it has one (trained_history says why)."""
    rows, failed = [], []
    for result in results:
        history = result.metrics_dataframe
        trained = flatten(trial_config(result.config, cfg).to_dict())
        if history is None or SCORE_METRIC not in history:
            failed.append(failed_trial_row(result, trained))
            continue
        on_disk = trained_history(f"{trials_dir}/{result.metrics['trial_id']}") if trials_dir else None
        if on_disk:
            scores = [m[SCORE_METRIC] for m in on_disk[0]]
            best_score, best_epoch, run_folder = on_disk[1]
        else:
            scores = [float(v) for v in history[SCORE_METRIC]]
            best_score = max(scores)
            best_epoch = scores.index(best_score) + 1
            # the Ray Train run that saved the best epoch: the trial's folder, or under PBT one part of it
            run_folder = history.loc[history[SCORE_METRIC].idxmax(), "checkpoint_path"].rsplit("/", 1)[0]
        rows.append({
            "trial": result.metrics["trial_id"],
            **{k: trained[k] for k in SEARCHED},
            "best_val_accuracy": round(best_score, 4),
            "best_epoch": best_epoch,
            "epochs_run": len(scores),
            "overhead_s": round(float(history["time_total_s"].iloc[-1] - history["epoch_time_s"].sum()), 1),
            "stopped_early": result.error is None and len(scores) < trained["epochs"],
            "status": trial_status(result),
            "val_accuracy_by_epoch": [round(v, 4) for v in scores],
            "run_folder": run_folder,
        })
    return sorted(rows, key=lambda r: -r["best_val_accuracy"]) + failed


def trained_history(trial_dir: str) -> tuple[list[dict], tuple[float, int, str]] | None:
    """(every epoch's metrics, from the trial's latest checkpoint; (score, epoch, run folder)
    of its best checkpoint), looking in its folder or, under PBT, in its parts; None where it
    has no checkpoint.

    Tune's own record of a trial is not the truth here: under PBT, Tune drops what a trial
    reports after Tune decided to pause it, and the result log of a trial it restores starts
    again. Seen: a trial that trained 4 epochs had a log of epoch 3 alone, and the
    leaderboard said it stopped early after 3. The best is the best of the trial's own
    checkpoints: a part that copied another trial's history begins with epochs whose
    checkpoints are that trial's (best/ once took a copied score with an own checkpoint).
    """
    from cifar_ray.checkpoint import METADATA_FILE, checkpoint_names
    from cifar_ray.storage import read_file, subfolders

    parts = sorted(subfolders(trial_dir, "part_")[1], key=lambda f: int(f.base_name.removeprefix("part_")))
    latest, best = None, None
    for folder in [trial_dir] + [f"{trial_dir}/{part.base_name}" for part in parts]:
        for name in checkpoint_names(folder):
            history = json.loads(read_file(f"{folder}/{name}", METADATA_FILE))["history"]
            if latest is None or len(history) >= len(latest):
                latest = history
            score = history[-1][SCORE_METRIC]
            if best is None or score > best[0]:
                best = (score, len(history), folder)
    return (latest, best) if latest else None


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
    from cifar_ray.checkpoint import METADATA_FILE, best_checkpoint_in
    from cifar_ray.storage import read_file, replace_folder, write_file

    rows = leaderboard_rows(cfg, results, f"{experiment_dir}/trials")
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
    replace_folder(checkpoint, best_dir)
    metadata = json.loads(read_file(best_dir, METADATA_FILE))
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
