"""The model lifecycle: the gate's decisions, alias moves, the registry CLI, and end to end:
a good run becomes champion, a worse version does not, Serve follows promote and rollback."""

import csv
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import requests

from cifar_ray.config import CLASS_NAMES, Config, RegistryConfig
from cifar_ray.errors import RegistryError
from cifar_ray.gate import Decision, Scores, decide, judge
from cifar_ray.model_registry import Registry, promote, rollback
from conftest import alter_one_weight, make_images

GATE = RegistryConfig(min_improvement=0.01, max_class_drop=0.05)
UNREACHABLE = "http://127.0.0.1:9"  # a registry nobody serves


@pytest.fixture
def ask_once(monkeypatch):
    """MLflow asks the unreachable registry once, in this process and the commands it starts:
    tracking.client's default retries twice with backoff (about 4 s), and the one-line error
    is the point here."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def scores(accuracy: float, **per_class: float) -> Scores:
    return Scores("evalset-1", accuracy, {c: per_class.get(c, accuracy) for c in CLASS_NAMES})


# ---------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------

def test_first_version_becomes_champion():
    assert judge(scores(0.3), None, 0.01, 0.05) == Decision(True, "first version: there is no champion yet")


def test_better_by_the_margin_is_promoted_and_not_by_less():
    assert judge(scores(0.81), scores(0.80), 0.01, 0.05).promote
    refused = judge(scores(0.805), scores(0.80), 0.01, 0.05)
    assert not refused.promote and "short of the required +0.01" in refused.reason
    assert not judge(scores(0.70), scores(0.80), 0.01, 0.05).promote


def test_a_class_that_drops_too_far_blocks_an_overall_gain():
    champion = scores(0.80, cat=0.70)
    candidate = scores(0.85, cat=0.60)  # better overall, cat 10 points worse
    decision = judge(candidate, champion, 0.01, 0.05)
    assert not decision.promote and "class cat falls from 0.7000 to 0.6000" in decision.reason
    assert judge(scores(0.85, cat=0.66), champion, 0.01, 0.05).promote  # 4 points: allowed


def test_promote_never_and_force_override_the_verdict_and_say_what_it_was():
    worse, better = scores(0.5), scores(0.9)
    never = decide("never", better, worse, GATE)
    assert not never.promote and "would promote" in never.reason
    force = decide("force", worse, better, GATE)
    assert force.promote and "would refuse" in force.reason


def test_scores_measured_on_other_images_are_not_compared():
    other = Scores("evalset-2", 0.5, {c: 0.5 for c in CLASS_NAMES})
    with pytest.raises(RegistryError, match="different evaluation sets"):
        judge(scores(0.9), other, 0.01, 0.05)


def test_scores_round_trip_through_version_tags():
    s = scores(0.8123, cat=0.5)
    assert Scores.from_tags(s.tags()) == Scores(s.eval_set, 0.8123, {c: round(a, 6) for c, a in s.per_class.items()})


# ---------------------------------------------------------------------------------------
# Alias moves, on an MLflow store with hand-made versions
# ---------------------------------------------------------------------------------------

@pytest.fixture
def registry(tmp_path) -> Registry:
    """A registry with versions 1-3 scored 0.5, 0.6, 0.7 on one evaluation set; 1 is champion."""
    registry = Registry(f"sqlite:///{tmp_path}/mlflow.db")
    registry.ensure_model()
    for i, accuracy in enumerate((0.5, 0.6, 0.7), start=1):
        folder = tmp_path / f"v{i}"
        folder.mkdir()
        (folder / "model.keras").write_bytes(b"stand-in: these tests never load it")
        (folder / "metadata.json").write_text("{}")
        registry.client.create_model_version(registry.name, source=folder.as_uri(), tags=scores(accuracy).tags())
    registry.set_champion("1")
    return registry


def test_promote_moves_the_alias_only_through_the_gate(registry):
    assert promote(registry, GATE, "3", force=False).promote
    assert champion(registry) == "3"
    assert not promote(registry, GATE, "2", force=False).promote  # 0.6 < 0.7
    assert champion(registry) == "3"
    assert promote(registry, GATE, "2", force=True).promote
    assert champion(registry) == "2"
    with pytest.raises(RegistryError, match="already champion"):
        promote(registry, GATE, "2", force=True)


def test_rollback_walks_back_through_the_champions(registry):
    promote(registry, GATE, "2", force=False)
    promote(registry, GATE, "3", force=False)
    assert rollback(registry) == ("3", "2") and champion(registry) == "2"
    assert rollback(registry) == ("2", "1") and champion(registry) == "1"
    with pytest.raises(RegistryError, match="no earlier champion"):
        rollback(registry)


def test_rollback_after_the_alias_was_moved_by_mlflow_itself(registry):
    """An alias moved in MLflow's UI or client: rollback returns to the champion before it."""
    registry.client.set_registered_model_alias(registry.name, "champion", "3")
    assert rollback(registry) == ("3", "1") and champion(registry) == "1"


def test_a_version_without_scores_needs_force_also_with_no_champion(registry, tmp_path):
    registry.client.create_model_version(registry.name, source=(tmp_path / "v3").as_uri())  # version 4
    registry.client.delete_registered_model_alias(registry.name, "champion")
    with pytest.raises(RegistryError, match="version 4 has no scores"):
        promote(registry, GATE, "4", force=False)
    assert registry.champion() is None
    assert promote(registry, GATE, "4", force=True).promote and champion(registry) == "4"


def test_a_version_without_its_files_is_never_promoted(registry, tmp_path):
    (tmp_path / "v3" / "model.keras").unlink()
    with pytest.raises(RegistryError, match="model.keras missing"):
        promote(registry, GATE, "3", force=True)
    assert champion(registry) == "1"


def champion(registry: Registry) -> str:
    return str(registry.champion().version)


def registry_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifar_ray.registry", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_errors_are_one_line_exit_2_and_change_nothing(registry, ask_once):
    unknown = registry_cli("promote", "9", "--tracking-uri", registry.uri)
    assert unknown.returncode == 2 and unknown.stderr.strip() == "error: cifar10-classifier has no version 9"
    unreachable = registry_cli("rollback", "--tracking-uri", UNREACHABLE, timeout=60)
    assert unreachable.returncode == 2 and unreachable.stderr.startswith(f"error: registry {UNREACHABLE}")
    assert len(unreachable.stderr.strip().splitlines()) == 1
    assert champion(registry) == "1" and registry.history() == ["1"]


def test_canary_errors_are_one_line_exit_2_and_change_nothing(registry, capsys, ask_once):
    """In this process (the subprocess test above proves the command's own exit path)."""
    from cifar_ray.registry import main

    def canary(*args: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit:
            main(["canary", *args])
        return exit.value.code, capsys.readouterr().err.strip()

    store = ("--tracking-uri", registry.uri)
    for args, message in ((("9", *store), "error: cifar10-classifier has no version 9"),
                          (("1", *store), "error: version 1 is already champion"),
                          (store, "error: registry canary: name a version, or use --status or --stop"),
                          (("2", "--percent", "0", *store), "error: --percent must be above 0 and at most 100, not 0.0")):
        assert canary(*args) == (2, message)
    code, error = canary("2", "--tracking-uri", UNREACHABLE)
    assert code == 2 and error.startswith(f"error: registry {UNREACHABLE}") and len(error.splitlines()) == 1
    assert registry.canary() is None and champion(registry) == "1"
    main(["canary", "2", *store])
    assert canary("3", *store) == (2, "error: version 2 is already rolling out; end it first with registry "
                                      "canary --stop")
    assert registry.canary()["version"] == "2"


def test_a_canary_is_seen_over_only_once_its_outcome_is_written(registry, monkeypatch):
    """Seen in the suite: a client saw the alias gone and read no decision yet."""
    registry.start_canary("2", 10.0, shadow=False, rule={})
    seen = []
    delete = registry.client.delete_registered_model_alias

    def delete_and_look(*args):
        seen.append(registry.version("2").tags.get("canary_decision"))
        return delete(*args)

    monkeypatch.setattr(registry.client, "delete_registered_model_alias", delete_and_look)
    assert registry.stop_canary("rollback: worse", {"labels": 30}) == "2"
    assert seen == ["rollback: worse"] and registry.canary() is None
    assert registry.version("2").tags["canary_evidence"] == '{"labels": 30}'


# ---------------------------------------------------------------------------------------
# End to end: training registers, the gate decides, Serve follows
# ---------------------------------------------------------------------------------------

def test_a_good_run_becomes_champion_and_a_worse_version_does_not(lifecycle):
    from cifar_ray.tracking import tracking_uri

    cfg, good, worse = lifecycle
    assert good["registry"]["version"] == "1" and good["registry"]["promoted"]
    outcome = worse["registry"]
    assert outcome["version"] == "2" and not outcome["promoted"] and outcome["champion"] == "1"
    assert "short of the required" in outcome["reason"]
    # judged on the champion's evaluation set
    assert outcome["eval_set"] == good["registry"]["eval_set"]
    versions = {str(v.version): v for v in Registry(tracking_uri(cfg)).versions()}
    assert versions["2"].tags["gate_decision"] == "not promoted"
    assert versions["2"].tags["eval_set"] == versions["1"].tags["eval_set"]
    assert float(versions["1"].tags["eval_accuracy"]) > float(versions["2"].tags["eval_accuracy"])


def test_a_resumed_run_logs_the_epochs_a_crash_kept_from_mlflow(tmp_path):
    """The run died after epoch 2's checkpoint was saved, before epoch 2 reached MLflow. The
    resumed run's first report (epoch 3) logs epochs 2 and 3 from the checkpoint's history,
    not epoch 1 again; later reports log only themselves."""
    import json

    import ray.train

    from cifar_ray import tracking
    from cifar_ray.config import PRESETS

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_run(uri, PRESETS["smoke"].with_overrides({"name": "crashed"}), kind="train")
    history = [{"epoch": e, "loss": 1.0 / e, "val_accuracy": 0.3 * e} for e in (1, 2, 3, 4)]
    tracking.log_epoch(uri, run_id, history[0])  # epoch 2's log was lost with the process

    def checkpoint(epoch: int):
        folder = tmp_path / f"epoch_{epoch:04d}"
        folder.mkdir()
        (folder / "metadata.json").write_text(json.dumps({"history": history[:epoch]}))
        return ray.train.Checkpoint(str(folder))

    resumed = tracking.EpochLogger(uri, run_id)  # the rerun's: a new process
    resumed.after_report(None, [history[2]], checkpoint(3))
    resumed.after_report(None, [history[3]], checkpoint(4))
    logged = tracking.client(uri).get_metric_history(run_id, "val_accuracy")
    assert sorted((m.step, m.value) for m in logged) == [(r["epoch"], r["val_accuracy"]) for r in history]

    # A checkpoint whose history cannot be read: the report's own epoch is logged all the same.
    other = tracking.start_run(uri, PRESETS["smoke"].with_overrides({"name": "unreadable"}), kind="train")
    (tmp_path / "no-metadata").mkdir()
    tracking.EpochLogger(uri, other).after_report(None, [history[1]], ray.train.Checkpoint(str(tmp_path / "no-metadata")))
    assert [m.step for m in tracking.client(uri).get_metric_history(other, "val_accuracy")] == [2]


def test_the_train_run_is_tracked_with_params_epochs_and_artifacts(lifecycle):
    from cifar_ray import tracking

    cfg, good, _ = lifecycle
    uri = tracking.tracking_uri(cfg)
    client = tracking.client(uri)
    version = Registry(uri).version("1")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.params["model"] == "shallow_cnn"
    assert run.data.tags["data.fingerprint"] == version.tags["data_fingerprint"]
    # one step per epoch of the run folder: 2, or 3 once test_train's full-disk test has
    # trained the shared run further (whichever runs first)
    epochs = [int(row["epoch"]) for row in csv.DictReader(open(Path(good["run_dir"]) / "history.csv"))]
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == epochs and epochs[:2] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "curves.png", "MODEL_CARD.md", "metrics.json", "checkpoint", "eval_set"} <= artifacts


def wait_for(predicate, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s")


@pytest.fixture(scope="module")
def registry_endpoint(lifecycle):
    """The app as serve.py builds it, following the lifecycle store's champion, with two
    Classifier replicas (the Rollout deployment must keep them in step); (url, uri, ask, cli)."""
    from ray import serve

    from cifar_ray.serve import application, serve_config_from_args
    from cifar_ray.tracking import tracking_uri
    from test_serve import free_port

    cfg, _, _ = lifecycle
    uri = tracking_uri(cfg)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve_cfg, resolved_uri = serve_config_from_args({"storage_path": cfg.run.storage_path,
                                                      "payload_log_sample": 1.0, "payload_log_images": True})
    assert serve_cfg.checkpoint == "models:/cifar10-classifier@champion" and resolved_uri == uri
    serve.run(application(serve_cfg, uri, {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0}}),
              name="cifar-registry", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    images, labels = make_images(40, seed=9)

    def ask(i: int = 0) -> dict:
        response = requests.post(f"{url}/predict/json", json={"image": images[i % 40].tolist()}, timeout=30)
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == response.json()["request_id"]
        return {**response.json(), "label": int(labels[i % 40])}

    def cli(*args) -> str:
        """`python -m cifar_ray.registry ... --tracking-uri uri`, run in this process (no second
        interpreter to start: test_cli_errors_are_one_line_exit_2_and_change_nothing runs one);
        what it printed."""
        import contextlib
        import io

        from cifar_ray.registry import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main([*args, "--tracking-uri", uri])
        return out.getvalue()

    try:
        yield url, uri, ask, cli
    finally:
        serve.delete("cifar-registry")
        serve.shutdown()


def registry_endpoint_store(uri: str) -> str:
    """The folder of the sqlite store: the storage path, where the payload log goes by default."""
    return str(Path(uri.removeprefix("sqlite:///")).parent)


def switched(ask, version: str, timeout: float = 30) -> float:
    """Seconds until the alias move is served, then: every request sent 2 s after the move is
    answered by `version`, whichever replica takes it."""
    moved = time.monotonic()
    wait_for(lambda: ask()["model_version"] == version, timeout=timeout, every=0.1)
    took = time.monotonic() - moved
    time.sleep(max(0.0, 2.0 - took))
    assert {ask(i)["model_version"] for i in range(20)} == {version}
    return took


def test_serve_follows_the_champion_through_promote_rollback_and_a_broken_version(registry_endpoint, tmp_path):
    url, uri, ask, cli = registry_endpoint
    assert ask()["model_version"] == "1"
    assert "is now champion" in cli("promote", "2", "--force")
    assert switched(ask, "2") < 2.0
    assert "from version 2 to version 1" in cli("rollback")
    assert switched(ask, "1") < 2.0
    registry = Registry(uri)  # moved by MLflow's own client: the same
    registry.client.set_registered_model_alias(registry.name, "champion", "2")
    switched(ask, "2")
    registry.client.set_registered_model_alias(registry.name, "champion", "1")
    switched(ask, "1")

    # a version whose model file was altered (a valid archive, other weights): version 1
    # keeps serving, /healthz says why
    broken = tmp_path / "broken"
    shutil.copytree(registry.download(registry.version("1"), str(tmp_path / "v1")), broken)
    alter_one_weight(broken)
    broken_version = registry.client.create_model_version(registry.name, source=broken.as_uri(),
                                                          tags={"run": "broken"}).version
    cli("promote", str(broken_version), "--force")
    health = wait_for(lambda: requests.get(f"{url}/healthz", timeout=30).json().get("warning"), timeout=30)
    assert f"version {broken_version}" in health and "still serving version 1" in health and "SHA-256" in health
    assert ask()["model_version"] == "1"
    cli("rollback")  # both replicas clear the warning (within 0.1 s of each other)
    wait_for(lambda: all("warning" not in requests.get(f"{url}/healthz", timeout=30).json() for _ in range(6)),
             timeout=30)
    metadata = requests.get(f"{url}/metadata", timeout=30).json()
    assert metadata["model_version"] == "1" and metadata["registry_error"] is None


def test_feedback_on_any_replica_for_any_answer_and_its_errors(registry_endpoint):
    url, uri, ask, _ = registry_endpoint

    def feedback(body) -> requests.Response:
        return requests.post(f"{url}/feedback", json=body, timeout=30)

    # Two replicas, routed at random (both answer 12 requests but with p = 2^-11); feedback
    # goes through the one Rollout deployment whichever replica takes it.
    answers = [ask(i) for i in range(12)]
    for a in answers:
        response = feedback({"request_id": a["request_id"], "label": CLASS_NAMES[a["label"]]})
        assert response.status_code == 200, response.text
        assert response.json() == {"request_id": a["request_id"], "model_version": "1",
                                   "correct": a["class_index"] == a["label"]}
    assert feedback({"request_id": "never-answered", "label": 1}).status_code == 404
    for label in ("zebra", 10, -1, 2.5, None, True):
        response = feedback({"request_id": answers[0]["request_id"], "label": label})
        assert response.status_code == 422 and "label must be" in response.json()["detail"]
    assert feedback({"label": 1}).status_code == 422
    response = requests.post(f"{url}/predict/json", json={"images": [make_images(1)[0][0].tolist()] * 3}, timeout=30)
    ids = [a["request_id"] for a in response.json()]
    assert ids == [f"{response.headers['x-request-id']}.{n}" for n in range(3)]
    assert feedback({"request_id": ids[2], "label": 0}).status_code == 200

    # Logged at sample 1.0 with images, the labelled answers export as training data: one row
    # per distinct image, with the label fed back.
    from cifar_ray.feedback import labelled_images
    from cifar_ray.payload_log import describe_input

    log = f"{registry_endpoint_store(uri)}/payload_log"
    table, _ = wait_for(lambda: (found := labelled_images(log))[0].num_rows >= 13 and found, timeout=30)
    images, labels = make_images(40, seed=9)
    expected = {describe_input(images[i], False)["image_sha256"]: int(labels[i]) for i in range(12)}
    expected[describe_input(make_images(1)[0][0], False)["image_sha256"]] = 0
    assert dict(zip(table["image_sha256"].to_pylist(), table["label"].to_pylist())) == expected

    drift = requests.get(f"{url}/drift", timeout=30).json()
    assert drift["model_version"] == "1" and drift["window"] > 0 and "drifting" in drift


def test_a_worse_canary_takes_its_share_and_is_rolled_back_on_feedback_through_a_replica_kill(
        registry_endpoint, ray_cluster):
    import ray

    url, uri, ask, cli = registry_endpoint
    assert "takes 50% of the requests" in cli("canary", "2", "--percent", "50", "--min-labels", "30")
    wait_for(lambda: any(ask(i)["model_version"] == "2" for i in range(10)), timeout=30, every=0.1)
    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                   if "Classifier" in a["name"] and "cifar-registry" in a["name"])
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    served, failed = [], 0
    deadline = time.monotonic() + 120
    while Registry(uri).canary() is not None and time.monotonic() < deadline:
        try:  # the killed replica's requests and feedback calls in flight may fail: 1% of them
            answer = ask(len(served))
            served.append(answer["model_version"])
            requests.post(f"{url}/feedback", json={"request_id": answer["request_id"], "label": answer["label"]},
                          timeout=30).raise_for_status()
        except (AssertionError, requests.RequestException):
            failed += 1
    assert Registry(uri).canary() is None, "not decided within 120 s"
    assert failed <= max(1, len(served) // 100)
    assert 0.3 < served.count("2") / len(served) < 0.7
    assert Registry(uri).version("2").tags["canary_decision"].startswith("rollback: live accuracy")
    switched(ask, "1")


def test_a_shadow_answers_a_copy_that_no_client_sees(registry_endpoint):
    url, uri, ask, cli = registry_endpoint
    assert "a shadow copy of every request" in cli("canary", "2", "--shadow", "--min-labels", "1000")
    versions = set()

    def shadow_counted():
        versions.update(ask(i)["model_version"] for i in range(10))
        status = cli("canary", "--status")
        row = next((line.split() for line in status.splitlines() if line.startswith("2 ")), None)
        return row is not None and int(row[1]) >= 40 and (status, row)

    try:
        status, row = wait_for(shadow_counted, timeout=60, every=0)
        assert versions == {"1"} and "shadow since" in status
        assert 0.0 <= float(row[-1]) <= 1.0  # its agreement with the champion's answers
    finally:
        assert "stopped, not promoted" in cli("canary", "--stop")


def test_no_champion_yet_is_a_503_that_says_so(tmp_path):
    from cifar_ray.live_model import LiveModel

    Registry(f"sqlite:///{tmp_path}/mlflow.db").ensure_model()
    live = LiveModel("models:/cifar10-classifier@champion", f"sqlite:///{tmp_path}/mlflow.db")
    assert not live.refresh() and live.current is None
    assert "cannot look up models:/cifar10-classifier@champion" in live.error
    assert "alias champion not found" in live.error.lower()


def test_serve_config_defaults_to_the_champion_and_a_path_still_works(tmp_path, monkeypatch):
    from cifar_ray.serve import serve_config_from_args

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg, uri = serve_config_from_args({"storage_path": str(tmp_path)})
    assert cfg.checkpoint == "models:/cifar10-classifier@champion"
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert serve_config_from_args({})[1] == "http://mlflow:5000"
    assert cfg.payload_log_path == f"{tmp_path.resolve()}/payload_log"  # beside the store, absolute
    monkeypatch.setenv("CIFAR_RAY_CHECKPOINT", str(tmp_path))  # a plain checkpoint folder: no registry
    monkeypatch.chdir(tmp_path)
    assert serve_config_from_args({}) == (replace(Config().serve, checkpoint=str(tmp_path),
                                                  payload_log_path=f"{tmp_path.resolve()}/runs/payload_log"), None)


def test_an_unreachable_registry_at_the_end_of_training_keeps_the_work_and_says_how_to_register(
        two_worker_run, tmp_path, ask_once):
    import json

    import ray.data

    from cifar_ray.data import DataInfo
    from cifar_ray.errors import TrackingUnavailable
    from cifar_ray.lifecycle import Run, finish_run

    cfg = Config().with_overrides({"name": "offline", "tracking_uri": UNREACHABLE})
    info = DataInfo(source="synthetic", num_train=1, num_val=8, mean=(0.5,) * 3, std=(0.2,) * 3)
    checkpoint = tmp_path / "offline" / "epoch_0001"
    shutil.copytree(two_worker_run[1]["best_checkpoint"], checkpoint)
    images, labels = make_images(8, seed=3)
    val = ray.data.from_items([{"image": x, "label": int(y)} for x, y in zip(images, labels)])
    summary = {"run_dir": str(tmp_path / "offline"), "best_checkpoint": str(checkpoint), "best_epoch": 1}
    run = Run(cfg, UNREACHABLE, "run-id", None, val, None, info)
    with pytest.raises(TrackingUnavailable) as error:
        finish_run(run, str(checkpoint), summary, (summary["run_dir"], str(checkpoint)))
    message = str(error.value)
    assert f"checkpoints are kept in {tmp_path / 'offline'}" in message
    assert f"python -m cifar_ray.registry register {checkpoint} --tracking-uri {UNREACHABLE}" in message
    assert json.loads((tmp_path / "offline" / "summary.json").read_text())["registry"] == {"error": message}
    # The audit needs no registry: the checkpoint carries it, ready to be registered later.
    for folder in (checkpoint, tmp_path / "offline"):
        assert json.loads((folder / "metrics.json").read_text())["examples"] == 8
        assert (folder / "MODEL_CARD.md").is_file()
