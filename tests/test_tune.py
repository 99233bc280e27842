"""Ray Tune: a tiny experiment, interrupted and resumed; its leaderboard, best/, tracking and registry."""

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cifar_ray.config import MODEL_RECIPES, PRESETS, choices_of
from cifar_ray.search import make_search, parse_search_space, trial_config
from cifar_ray.tune import trial_resources

TINY = {"synthetic_size": 300, "val_fraction": 0.2, "models": ("shallow_cnn",),
        "optimizers": ("adam", "sgd"), "augments": ("none",), "batch_sizes": (64,),
        "lr_range": (1e-3, 1e-2)}


def test_search_space_yaml_uses_config_field_names():
    space = parse_search_space(yaml.safe_load(
        "model: {choice: [shallow_cnn, notebook_cnn]}\nlr: {loguniform: [0.0001, 0.1]}\nepochs: 3\n"))
    assert set(space) == {"model", "lr", "epochs"} and space["epochs"] == 3
    assert set(space["model"].categories) == {"shallow_cnn", "notebook_cnn"}


@pytest.mark.parametrize("text, message", [
    ("learning_rate: {choice: [0.1]}\n", "unknown config key"),
    ("lr: {normal: [0, 1]}\n", "unknown sampler"),
    ("batch_size: {choice: [big]}\n", "expected int"),
])
def test_search_space_yaml_mistakes_are_clear_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_search_space(yaml.safe_load(text))


@pytest.mark.parametrize("search", ["random", "tpe"])
def test_each_model_searches_around_its_own_recipe(search):
    """The conditioned space: fast_resnet keeps its recipe and searches near its LR; the
    other models search the flags' space; every trial keeps the experiment's epochs."""
    cfg = PRESETS["smoke"].with_overrides({"search": search, "epochs": 3, "lr_range": (1e-3, 1e-2),
                                           "optimizers": ("adam", "rmsprop")})
    _, searcher = make_search(cfg)
    trials = [trial_config(searcher.suggest(f"t{i}"), cfg) for i in range(30)]
    by_model = {}
    for trial in trials:
        by_model.setdefault(trial.model.model, []).append(trial.train)
    assert set(by_model) == set(choices_of("model"))
    recipe = MODEL_RECIPES["fast_resnet"]
    for t in by_model["fast_resnet"]:
        assert (t.optimizer, t.schedule, t.batch_size, t.label_smoothing) == (
            recipe["optimizer"], recipe["schedule"], recipe["batch_size"], recipe["label_smoothing"])
        assert recipe["lr"] / 2 <= t.lr <= recipe["lr"] * 2
    for t in by_model["notebook_cnn"] + by_model["shallow_cnn"]:
        assert t.optimizer in ("adam", "rmsprop") and 1e-3 <= t.lr <= 1e-2
        assert t.label_smoothing == 0.0 and t.schedule == cfg.train.schedule
    assert {trial.train.epochs for trial in trials} == {3}  # the experiment's, not the recipe's 20
    assert len({trial.train.lr for trial in trials}) == len(trials)


def test_a_yaml_space_picks_the_recipe_with_the_model_and_tpe_refuses_a_grid(tmp_path):
    cfg = PRESETS["smoke"]
    trial = trial_config({"model": "fast_resnet", "lr": 0.05}, cfg)
    assert (trial.train.optimizer, trial.train.lr, trial.train.epochs) == ("sgd_coupled", 0.05, cfg.train.epochs)
    space = tmp_path / "space.yaml"
    space.write_text("optimizer: {grid: [adam, sgd]}\n")
    with pytest.raises(ValueError, match="a grid runs with --search random"):
        make_search(cfg.with_overrides({"search_space": str(space), "search": "tpe"}))
    assert make_search(cfg.with_overrides({"search_space": str(space)}))[1] is None  # Tune's own sampling


def test_asha_stops_trials_at_the_epochs_a_yaml_space_sets_and_refuses_sampled_ones(tmp_path):
    from cifar_ray.search import make_scheduler

    cfg = PRESETS["smoke"].with_overrides({"scheduler": "asha", "epochs": 2})
    assert make_scheduler(cfg, make_search(cfg)[0])._max_t == 2
    space = tmp_path / "space.yaml"
    space.write_text("lr: {loguniform: [0.001, 0.1]}\nepochs: 5\n")
    with_yaml = cfg.with_overrides({"search_space": str(space)})
    yaml_space = make_search(with_yaml)[0]
    assert trial_config({"lr": 0.01, "epochs": 5}, with_yaml).train.epochs == make_scheduler(with_yaml, yaml_space)._max_t == 5
    space.write_text("lr: {loguniform: [0.001, 0.1]}\nepochs: {choice: [2, 8]}\n")
    with pytest.raises(ValueError, match="asha trains every trial for one number of epochs: set epochs to one"):
        make_search(with_yaml)
    assert make_search(with_yaml.with_overrides({"scheduler": "fifo"}))[0]["epochs"].categories == [2, 8]


def test_pbt_starts_one_models_population_and_perturbs_what_it_searches(tmp_path, monkeypatch):
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    from cifar_ray.search import make_scheduler, searched_ranges

    cfg = PRESETS["smoke"].with_overrides({"scheduler": "pbt", "models": ("fast_resnet",)})
    space, searcher = make_search(cfg)
    assert searcher is None and space["model"] == "fast_resnet"  # PBT refuses a searcher
    for field, (low, high) in searched_ranges("fast_resnet", cfg.tune).items():
        assert (space[field].lower, space[field].upper) == (low, high)
    scheduler = make_scheduler(cfg, space)
    assert isinstance(scheduler, PopulationBasedTraining)
    assert set(scheduler._hyperparam_mutations) == {"lr", "weight_decay"}
    assert not scheduler._synch and make_scheduler(cfg.with_overrides({"pbt_sync": True}), space)._synch
    # Tune's step runs after epochs 2 and 4 of 6, and not after the last
    steps = []
    monkeypatch.setattr(PopulationBasedTraining, "on_trial_result",
                        lambda self, controller, trial, result: steps.append(result["epoch"]) or "step")
    six = make_scheduler(cfg.with_overrides({"epochs": 6}), space)
    assert [six.on_trial_result(None, None, {"epoch": e, "val_accuracy": 0.5}) for e in (2, 4, 6)] == \
        ["step", "step", TrialScheduler.CONTINUE]
    assert steps == [2, 4]
    monkeypatch.undo()
    notebook = cfg.with_overrides({"models": ("shallow_cnn",), "lr_range": (1e-3, 1e-2)})
    space = make_search(notebook)[0]
    assert set(make_scheduler(notebook, space)._hyperparam_mutations) == {"lr"}
    assert (space["lr"].lower, space["lr"].upper) == (1e-3, 1e-2)

    with pytest.raises(ValueError, match="evolves one model"):
        make_search(cfg.with_overrides({"models": ("fast_resnet", "shallow_cnn")}))
    with pytest.raises(ValueError, match="with --search random"):
        make_search(cfg.with_overrides({"search": "tpe"}))
    fixed = tmp_path / "space.yaml"
    fixed.write_text("optimizer: {choice: [adam, sgd]}\n")
    with_yaml = cfg.with_overrides({"search_space": str(fixed)})
    with pytest.raises(ValueError, match="must sample at least one"):
        make_scheduler(with_yaml, make_search(with_yaml)[0])
    fixed.write_text("lr: {loguniform: [0.01, 0.1]}\nepochs: {choice: [4, 8]}\n")
    with pytest.raises(ValueError, match="pbt trains every trial for one number of epochs"):
        make_search(with_yaml)
    fixed.write_text("lr: {loguniform: [0.01, 0.1]}\nepochs: 5\n")  # one value: every trial's, and the last
    assert make_scheduler(with_yaml, make_search(with_yaml)[0]).last_epoch == 5


def test_a_run_restored_with_a_perturbed_lr_and_weight_decay_goes_on_with_them(tmp_path):
    """PBT's explore step: the copied checkpoint's optimizer keeps its step count and
    momentum, and takes the new peak LR (its schedule goes on at the same step) and weight
    decay; restored unchanged, it keeps its own."""
    import keras
    import numpy as np
    import ray.train

    from cifar_ray.checkpoint import make_metadata, save_checkpoint
    from cifar_ray.data import DataInfo
    from cifar_ray.models import learning_rate
    from cifar_ray.train_loop import restore_or_build_model

    cfg = PRESETS["smoke"].with_overrides({"model": "shallow_cnn", "optimizer": "sgd", "lr": 0.05,
                                           "schedule": "cosine", "weight_decay": 1e-3, "epochs": 4})
    info = DataInfo(source="synthetic", num_train=32, num_val=8, mean=(0.5,) * 3, std=(0.2,) * 3)
    steps = 4
    model, _ = restore_or_build_model(cfg, info, None, steps)
    images = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    model.fit(images, keras.utils.to_categorical(np.arange(32) % 10, 10), batch_size=8, epochs=1, verbose=0)
    save_checkpoint(tmp_path, model, make_metadata(cfg, info, epoch=1, metrics={}, history=[{"epoch": 1}]))
    checkpoint = ray.train.Checkpoint(str(tmp_path))

    perturbed = cfg.with_overrides({"lr": 0.06, "weight_decay": 8e-4})
    restored, history = restore_or_build_model(perturbed, info, checkpoint, steps)
    optimizer = restored.optimizer
    assert history == [{"epoch": 1}] and int(optimizer.iterations) == steps
    expected = float(learning_rate(perturbed.train, steps)(steps))
    assert float(optimizer.learning_rate) == pytest.approx(expected) and optimizer.weight_decay == 8e-4
    assert expected > float(learning_rate(cfg.train, steps)(steps))
    momentum = [keras.ops.convert_to_numpy(v) for v in optimizer.variables if "momentum" in v.path]
    assert momentum and all(np.abs(m).sum() > 0 for m in momentum)  # state kept, not a new optimizer

    same, _ = restore_or_build_model(cfg, info, checkpoint, steps)
    assert float(same.optimizer.learning_rate) == pytest.approx(float(learning_rate(cfg.train, steps)(steps)))
    assert same.optimizer.weight_decay == pytest.approx(1e-3)


def test_trials_fit_the_cluster_and_leave_cpus_for_data():
    assert trial_resources(PRESETS["smoke"], cluster_cpus=2) == (1, 1.5)
    cfg = PRESETS["smoke"].with_overrides({"num_workers": 2})
    assert trial_resources(cfg, cluster_cpus=16) == (4, 1.75)


def test_tune_is_set_to_restart_a_failed_trial_and_the_trials_ray_train_run_never_to_restart_itself():
    """Ray Train inside a trial must not restart its workers: when Tune stops a trial, a
    controller allowed to can make a new placement group as Ray kills it, which Ray never
    removes (trial_run_config). Tune restarts the trial instead, and Ray Train resumes the
    trial's folder from its last checkpoint (checked by hand: a trial's worker SIGKILLed
    after epoch 1 of 3, history 1, 2, 3)."""
    from cifar_ray.tune import experiment_run_config, trial_run_config

    cfg = PRESETS["smoke"].with_overrides({"max_failures": 3})
    trial = trial_run_config({"lr": 0.02}, "abc123", base=cfg, trials_dir="/runs/x/trials")
    assert (trial.run.max_failures, trial.run.name, trial.run.storage_path, trial.train.lr) == (
        0, "abc123", "/runs/x/trials", 0.02)
    assert experiment_run_config(cfg, callbacks=[]).failure_config.max_failures == 3


def tune_flags(cfg) -> list[str]:
    """`python -m cifar_ray.tune` flags for the experiment configured as `cfg`."""
    t = cfg.tune
    return ["--preset", "smoke", "--synthetic-size", str(cfg.data.synthetic_size),
            "--val-fraction", str(cfg.data.val_fraction), "--epochs", str(cfg.train.epochs),
            "--num-samples", str(t.num_samples), "--scheduler", t.scheduler, "--models", *t.models,
            "--optimizers", *t.optimizers, "--augments", *t.augments,
            "--batch-sizes", *map(str, t.batch_sizes), "--lr-range", *map(str, t.lr_range),
            "--name", cfg.run.name, "--storage-path", cfg.run.storage_path]


def test_a_trial_that_failed_before_its_first_epoch_is_on_the_leaderboard_with_its_cause():
    """Tune's results of a search where one trial's batch was too large for the data: that
    trial still gets a row, last, with what it tried and the error's last line; the trial
    that trained comes first. A trial that failed later says why the same way."""
    from types import SimpleNamespace

    import pandas as pd

    from cifar_ray.leaderboard import leaderboard_markdown, leaderboard_rows

    cfg = PRESETS["smoke"].with_overrides({**TINY, "epochs": 2})
    trained = SimpleNamespace(
        config={"model": "shallow_cnn", "lr": 0.01, "batch_size": 64}, error=None, metrics={"trial_id": "a1"},
        metrics_dataframe=pd.DataFrame({"epoch": [1, 2], "val_accuracy": [0.3, 0.5], "epoch_time_s": [1.0, 2.0],
                                        "time_total_s": [6.0, 9.0],
                                        "checkpoint_path": ["t/a1/epoch_0001", "t/a1/epoch_0002"]}))
    error = RuntimeError("Traceback (most recent call last):\n  ...\n"
                         "ValueError: batch 256 is larger than the 240 training images: an epoch would take no step")
    failed = SimpleNamespace(config={"model": "shallow_cnn", "lr": 0.02, "batch_size": 256}, error=error,
                             metrics={"trial_id": "b2"}, metrics_dataframe=None)  # Tune's metrics: its id only
    rows = leaderboard_rows(cfg, [failed, trained])
    assert [r["trial"] for r in rows] == ["a1", "b2"]
    assert rows[0]["best_val_accuracy"] == 0.5 and rows[0]["overhead_s"] == 6.0 and rows[0]["status"] == "done"
    assert rows[1]["status"] == "error: ValueError: batch 256 is larger than the 240 training images: " \
                                "an epoch would take no step"
    assert (rows[1]["batch_size"], rows[1]["lr"], rows[1]["epochs_run"]) == (256, 0.02, 0)
    later = SimpleNamespace(**{**vars(trained), "error": RuntimeError("...\nOSError: [Errno 28] No space left on device")})
    assert leaderboard_rows(cfg, [later])[0]["status"] == "error: OSError: [Errno 28] No space left on device"
    table = leaderboard_markdown(rows, ["trial", "batch_size", "best_val_accuracy", "status"])
    assert table.splitlines()[-1] == "| b2 | 256 | - | error: ValueError: batch 256 is larger than the 240 " \
                                     "training images: an epoch would take no step |"


def test_tunes_checkpoint_copies_go_at_the_end_except_a_failed_trials(tmp_path):
    """A failed trial keeps Tune's copies: rerunning the experiment resumes it from them."""
    from types import SimpleNamespace

    import pyarrow.fs

    from cifar_ray.tune import remove_tune_copies

    results = []
    for trial, error in (("done", None), ("failed", RuntimeError("OSError: disk full"))):
        for copy in ("checkpoint_000000", "checkpoint_000001"):
            (tmp_path / trial / copy).mkdir(parents=True)
        (tmp_path / trial / "result.json").write_text("{}")
        results.append(SimpleNamespace(path=str(tmp_path / trial), error=error,
                                       filesystem=pyarrow.fs.LocalFileSystem()))
    remove_tune_copies(results)
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["result.json"]
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == [
        "checkpoint_000000", "checkpoint_000001", "result.json"]


@pytest.fixture(scope="module")
def experiment(ray_cluster, tmp_path_factory):
    """One tiny experiment, interrupted as a user would interrupt it and then resumed: the
    command is killed once its first trial has finished, and the same experiment is run
    again (in this process). Returns (cfg, the best trial's summary, what the interrupted
    run left: {finished trial's epoch checkpoint: its mtime}, what the resumed run printed)."""
    from cifar_ray.tune import run

    cfg = PRESETS["smoke"].with_overrides({
        **TINY, "num_samples": 2, "scheduler": "asha", "epochs": 2, "name": "tiny",
        "storage_path": str(tmp_path_factory.mktemp("tune"))})
    trials = Path(cfg.run.storage_path) / cfg.run.name / "trials"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster,
           "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def trial_folders() -> list[Path]:
        """Oldest activity first: trial IDs from a searcher are random, not in start order."""
        return sorted((p for p in trials.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)

    first = subprocess.Popen([sys.executable, "-m", "cifar_ray.tune", *tune_flags(cfg)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def second_trial_checkpointed() -> bool:
        return any(any(trial.glob("epoch_*/metadata.json")) for trial in trial_folders()[1:])

    try:  # one trial at a time on 2 CPUs: once the second trial has a checkpoint, the first is done
        deadline = time.monotonic() + 240
        # Killed once the second trial's workers have saved a checkpoint, not while its
        # placement group is being made: a group Ray Train creates after its controller died
        # is never removed (the detached PlacementGroupCleaner was not told of it), and holds
        # its CPUs for good. (Waiting for live workers was not enough: the state API can
        # still list the first trial's.)
        while not second_trial_checkpointed() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    started = trial_folders()
    assert len(started) >= 2, f"the second trial did not start before the deadline: {started}"
    # Each epoch checkpoint of the finished trials, and when it was written (once, when trained).
    trained_at = {str(epoch.relative_to(trials)): epoch.stat().st_mtime for trial in started[:-1]
                  for epoch in trial.glob("epoch_*/metadata.json")}
    assert trained_at, "the first trial left no checkpoint"

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        best = run(cfg)
    return cfg, best, trained_at, printed.getvalue()


def test_a_leaderboard_row_reads_the_epochs_a_trial_trained_from_its_checkpoints(tmp_path):
    """Seen under PBT: Tune's result log of a trial that trained 4 epochs (its second part
    from a copied epoch-2 checkpoint) held epoch 3 alone, and the row said it stopped early
    after 3. The row now comes from the trial's latest checkpoint."""
    from types import SimpleNamespace

    import pandas as pd

    from cifar_ray.leaderboard import leaderboard_rows

    cfg = PRESETS["smoke"].with_overrides({**TINY, "epochs": 4})
    history = [{"epoch": e, "val_accuracy": a} for e, a in enumerate([0.2, 0.5, 0.8, 0.7], start=1)]
    for part, epochs in (("part_1", (1, 2)), ("part_2", (3, 4))):
        for epoch in epochs:
            folder = tmp_path / "trials" / "t1" / part / f"epoch_{epoch:04d}"
            folder.mkdir(parents=True)
            (folder / "metadata.json").write_text(json.dumps({"history": history[:epoch]}))
            (folder / "model.keras").write_bytes(b"PK\x05\x06" + bytes(18))  # ends as a zip ends
    tune_log = pd.DataFrame({"epoch": [3], "val_accuracy": [0.8], "epoch_time_s": [1.0], "time_total_s": [5.0],
                             "checkpoint_path": [str(tmp_path / "trials/t1/part_2/epoch_0003")]})
    result = SimpleNamespace(config={"lr": 0.01}, error=None, metrics={"trial_id": "t1"}, metrics_dataframe=tune_log)
    (row,) = leaderboard_rows(cfg, [result], str(tmp_path / "trials"))
    assert (row["epochs_run"], row["stopped_early"], row["best_epoch"]) == (4, False, 3)
    assert row["val_accuracy_by_epoch"] == [0.2, 0.5, 0.8, 0.7]
    assert row["run_folder"] == str(tmp_path / "trials/t1/part_2")

    # Seen in the suite: part_2 copied another trial's epochs 1-2 (0.9, 0.95) and trained 3-4
    # itself. Its best is its own epoch 4, in the folder where best/ looks, not a copied score.
    copied = [{"epoch": e, "val_accuracy": a} for e, a in enumerate([0.9, 0.95, 0.6, 0.7], start=1)]
    for epoch in (3, 4):
        (tmp_path / f"trials/t1/part_2/epoch_{epoch:04d}/metadata.json").write_text(json.dumps({"history": copied[:epoch]}))
    (row,) = leaderboard_rows(cfg, [result], str(tmp_path / "trials"))
    assert (row["best_val_accuracy"], row["best_epoch"], row["epochs_run"]) == (0.7, 4, 4)
    assert row["val_accuracy_by_epoch"] == [0.9, 0.95, 0.6, 0.7]
    assert row["run_folder"] == str(tmp_path / "trials/t1/part_2")


def test_leaderboard_is_sorted_and_its_top_is_the_best_epoch_of_all_trials(experiment):
    cfg, best, _, _ = experiment
    folder = Path(best["experiment_dir"])
    rows = list(csv.DictReader((folder / "leaderboard.csv").open()))
    assert len(rows) == cfg.tune.num_samples
    scores = [float(r["best_val_accuracy"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    every_epoch = [acc for row in best["leaderboard"] for acc in row["val_accuracy_by_epoch"]]
    assert scores[0] == pytest.approx(max(every_epoch), abs=1e-4)
    assert {"model", "optimizer", "lr", "epochs_run", "stopped_early", "overhead_s"} <= set(rows[0])
    # each trial's time less its epochs': start-up, data, checkpoints; positive and below its whole time
    assert all(0 < row["overhead_s"] < 600 for row in best["leaderboard"])
    assert (folder / "leaderboard.md").read_text().startswith("| trial |")
    assert (folder / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_best_loads_with_evaluate_and_reproduces_best_json(experiment):
    from cifar_ray.data import load_training_data
    from cifar_ray.evaluate import evaluate_dataset

    cfg, best, _, _ = experiment
    best_dir = Path(best["best_dir"])
    recorded = json.loads((best_dir / "best.json").read_text())
    _, val, _, _ = load_training_data(cfg.data, seed=cfg.train.seed)
    metrics = evaluate_dataset(val, str(best_dir), {"source": "synthetic", "split": "validation"})
    assert metrics["accuracy"] == pytest.approx(recorded["best_val_accuracy"], abs=1e-6)
    assert (best_dir / "MODEL_CARD.md").is_file()  # tune's winner carries its audit too


def test_experiment_and_trials_are_tracked_and_the_best_goes_through_the_gate(experiment):
    from cifar_ray import tracking
    from cifar_ray.model_registry import Registry

    cfg, best, _, _ = experiment
    uri = tracking.tracking_uri(cfg)
    client = tracking.client(uri)
    (parent,) = client.search_runs([tracking.experiment_id(client, uri)],
                                   filter_string=f"tags.`{tracking.KIND_TAG}` = 'tune'")
    trials = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    # Tune's verdict, also for trials ASHA stopped from outside: none left RUNNING or FAILED
    assert len(trials) == cfg.tune.num_samples and all(t.info.status == "FINISHED" for t in trials)
    for trial in trials:  # every epoch a trial ran, logged once at its step
        epochs = [m.step for m in client.get_metric_history(trial.info.run_id, "val_accuracy")]
        # in any order: the resumed trial logs its first new epoch, then those its kill kept from MLflow
        assert sorted(epochs) == list(range(1, len(epochs) + 1)) and epochs
    assert "leaderboard.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    outcome = best["registry"]  # a first version: champion, recorded in summary.json too
    assert outcome["promoted"] and outcome["version"] == "1"
    assert json.loads((Path(best["experiment_dir"]) / "summary.json").read_text())["registry"] == outcome
    assert Registry(uri).champion().tags["run"] == cfg.run.name


def test_interrupted_experiment_resumes_without_rerunning_finished_trials(experiment):
    cfg, best, trained_at, printed = experiment
    assert "resuming experiment" in printed
    trials = Path(best["experiment_dir"]) / "trials"
    rows = list(csv.DictReader((Path(best["experiment_dir"]) / "leaderboard.csv").open()))
    assert len(rows) == cfg.tune.num_samples
    finished = {Path(p).parts[0] for p in trained_at}
    now = {str(p.relative_to(trials)): p.stat().st_mtime for trial in finished
           for p in (trials / trial).glob("epoch_*/metadata.json")}
    assert now == trained_at  # no epoch of a finished trial was trained again, nor a new one


@pytest.fixture(scope="module")
def pbt_experiment(ray_cluster, tmp_path_factory):
    """A tiny Population Based Training experiment: two trials at once, 4 epochs, one
    copy-and-perturb step, after epoch 2 (none at the last epoch), with --pbt-sync. A grid
    starts the second trial with a learning rate too small to learn anything: it can only do
    well by copying the first. (Without --pbt-sync, the copy happens only if the slow trial
    reports epoch 2 after the fast one: Tune ranks a trial against the others' last steps. A
    step after every epoch makes the two trials, equal once one has copied the other, copy
    each other again and again: each copy restarts a Ray Train run.)"""
    from cifar_ray.tune import run

    storage = tmp_path_factory.mktemp("pbt")
    space = storage / "space.yaml"
    space.write_text("lr: {grid: [0.01, 1.0e-7]}\noptimizer: adam\n")
    cfg = PRESETS["smoke"].with_overrides({
        **TINY, "num_samples": 1, "scheduler": "pbt", "perturbation_interval": 2, "pbt_sync": True, "epochs": 4,
        "max_concurrent_trials": 2, "search_space": str(space), "name": "pbt", "storage_path": str(storage)})
    with contextlib.redirect_stdout(io.StringIO()):
        best = run(cfg)
    return cfg, best


def part_histories(trial: Path) -> dict[str, list[dict]]:
    """{part folder: the history in its latest checkpoint} of one PBT trial (a part that Tune
    stopped again before its first checkpoint has none, and is left out)."""
    latest = {part.name: sorted(part.glob("epoch_*/metadata.json")) for part in trial.glob("part_*")}
    return {name: json.loads(files[-1].read_text())["history"] for name, files in sorted(latest.items()) if files}


def test_a_pbt_trial_that_cannot_learn_copies_the_one_that_can(pbt_experiment):
    cfg, best = pbt_experiment
    trials = Path(best["experiment_dir"]) / "trials"
    parts = {trial.name: part_histories(trial) for trial in trials.iterdir()}
    lr_at_start = {trial: json.loads(next((trials / trial).glob("part_1/epoch_*/metadata.json")).read_text())
                   ["config"]["train"]["lr"] for trial in parts}
    (slow,) = [trial for trial, lr in lr_at_start.items() if lr == 1e-7]
    (fast,) = set(parts) - {slow}
    alone = max(epoch["val_accuracy"] for epoch in parts[slow]["part_1"])  # epochs 1-2 at lr 1e-7
    assert alone < 0.3  # chance or below
    # a later part goes on from the fast trial's epoch-2 checkpoint: its history starts as the
    # fast one's, and the epochs after those two are the slow trial's own
    copied = [h for name, h in parts[slow].items() if name != "part_1" and h[:2] == parts[fast]["part_1"][:2]]
    assert copied, f"the slow trial copied nothing: {parts[slow]}"
    own_after_copy = max(epoch["val_accuracy"] for h in copied for epoch in h[2:])
    rows = {row["trial"]: row for row in best["leaderboard"]}
    # Its best is the best of its own checkpoints (not the copied epochs' scores), and only the
    # copied weights took it above what it reached alone (by how much is noise on 60 images).
    assert rows[slow]["best_val_accuracy"] == pytest.approx(own_after_copy, abs=1e-4)
    assert own_after_copy > alone
    assert {r["epochs_run"] for r in rows.values()} == {cfg.train.epochs}
    assert best["best_val_accuracy"] == pytest.approx(max(r["best_val_accuracy"] for r in rows.values()), abs=1e-4)
    assert (Path(best["best_dir"]) / "MODEL_CARD.md").is_file()
    assert not list(Path(best["experiment_dir"]).glob("*/checkpoint_*"))  # Tune's copies, freed at the end
