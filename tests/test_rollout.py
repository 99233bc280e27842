"""The rollout's parts in this process: the answer book (answers.py) and the Rollout
deployment's routes and decisions (rollout.py), without Serve. End to end through Serve:
test_registry.py's serve test."""

import asyncio

import pytest

from cifar_ray import answers as answers_module
from cifar_ray import rollout as rollout_module
from cifar_ray.answers import Answer, AnswerBook
from cifar_ray.rollout import Rollout, Routes


def test_feedback_is_counted_once_for_the_answer_and_its_shadow():
    book = AnswerBook()
    book.add([Answer("r1", "1", 3, 0.9, 10.0), Answer("r1", "2", 5, 0.6, 30.0, shadow=True),
              Answer("r2", "1", 4, 0.8, 12.0), Answer("", "2", -1, 0.0, 0.0, error=True)])
    assert book.label("r1", 3) == {"request_id": "r1", "model_version": "1", "correct": True}
    assert book.label("r1", 5) == {"request_id": "r1", "model_version": "1", "correct": False}  # not recounted
    assert book.label("nope", 3) is None
    champion, shadow = book.summary()["1"], book.summary()["2"]
    assert (champion["requests"], champion["labelled"], champion["live_accuracy"]) == (2, 1, 1.0)
    assert (shadow["requests"], shadow["errors"], shadow["labelled"], shadow["live_accuracy"]) == (2, 1, 1, 0.0)
    assert shadow["agreement"] == 0.0 and champion["agreement"] is None
    assert not book.knows("r1.shadow") and book.arm("9").requests == 0


def test_the_book_forgets_the_oldest_answers_beyond_its_bound(monkeypatch):
    monkeypatch.setattr(answers_module, "MAX_ANSWERS", 3)
    book = AnswerBook()
    book.add([Answer(f"r{i}", "1", 0, 0.5, 1.0) for i in range(5)])
    assert [book.knows(f"r{i}") for i in range(5)] == [False, False, True, True, True]


def rollout_here(source: str = "/a/checkpoint", uri=None, **kwargs):
    """The Rollout deployment's class, made in this process (not following a registry unless
    `uri`: then its poll thread sleeps, and the test reads the registry itself)."""
    return Rollout.func_or_class(source, uri, **kwargs)


def watch(rollout, replica: str, generation: int, loaded: list[str]) -> dict:
    return asyncio.run(rollout.watch(replica, generation, loaded))


def test_new_routes_take_effect_for_all_replicas_once_every_replica_loaded_them(ray_cluster, monkeypatch):
    monkeypatch.setattr(rollout_module, "WATCH_S", 0.2)
    rollout = rollout_here()
    assert watch(rollout, "a", -1, ["1"])["generation"] == 0  # news at once for a new replica
    watch(rollout, "b", -1, ["1"])
    rollout.target = Routes(champion="2", previous="1")
    news = watch(rollout, "a", 0, ["1"])  # a must load 2: told at once, nothing switched yet
    assert news["load"] == ["1", "2"] and news["generation"] == 0 and news["active"]["champion"] is None
    watch(rollout, "a", 0, ["1", "2"])
    assert rollout.generation == 0  # b has not loaded 2 yet
    news = watch(rollout, "b", 0, ["1", "2"])
    assert news["generation"] == 1 and news["active"]["champion"] == "2"
    assert watch(rollout, "a", 0, ["1", "2"])["active"]["champion"] == "2"  # a hears of it at once


def test_a_replica_that_never_loads_holds_the_switch_back_only_so_long(ray_cluster, monkeypatch):
    monkeypatch.setattr(rollout_module, "WATCH_S", 0.1)
    monkeypatch.setattr(rollout_module, "ACTIVATE_AFTER_S", 0.3)
    rollout = rollout_here()
    watch(rollout, "stuck", -1, [])
    rollout.target, rollout.target_since = Routes(champion="1"), rollout_module.time.monotonic()
    assert watch(rollout, "a", -1, ["1"])["active"]["champion"] is None
    rollout_module.time.sleep(0.35)
    assert watch(rollout, "a", 0, ["1"])["active"]["champion"] == "1"


@pytest.fixture
def canary_store(lifecycle, tmp_path):
    """test_registry's store (version 1 champion, version 2 worse), a canary of version 2
    started through the CLI, and a Rollout following it; the champion restored after."""
    from cifar_ray.model_registry import Registry
    from cifar_ray.registry import main
    from cifar_ray.tracking import tracking_uri

    uri = tracking_uri(lifecycle[0])
    registry = Registry(uri)
    main(["canary", "2", "--percent", "20", "--min-labels", "30", "--tracking-uri", uri])
    rollout = rollout_here("models:/cifar10-classifier@champion", uri, poll_interval_s=3600)
    rollout._read_registry()
    watch(rollout, "a", -1, ["1", "2"])  # every replica has both: the canary's routes in effect
    yield registry, rollout
    registry.stop_canary()
    registry.set_champion("1")


def labelled(version: str, n: int, correct: int, offset: int = 0) -> list:
    answers = [Answer(f"{version}-{offset + i}", version, 1, 0.9, 5.0) for i in range(n)]
    return answers, [(a.request_id, 1 if i < correct else 2) for i, a in enumerate(answers)]


def feed(rollout, version: str, n: int, correct: int) -> None:
    answers, labels = labelled(version, n, correct)
    rollout.book.add(answers)
    for request_id, label in labels:
        rollout.book.label(request_id, label)


def test_a_worse_canary_is_rolled_back_with_its_evidence_on_the_version(ray_cluster, canary_store, capsys):
    import json

    from cifar_ray.registry import main

    registry, rollout = canary_store
    active = rollout.active
    assert (active.champion, active.candidate, active.percent, active.shadow) == ("1", "2", 20.0, False)
    feed(rollout, "2", 29, 5)
    feed(rollout, "1", 60, 57)
    rollout._judge_canary()
    assert registry.canary() is not None  # 29 labels: too few
    main(["canary", "--status", "--tracking-uri", registry.uri])
    status = capsys.readouterr().out
    assert "canary at 20%" in status and "0.172" in status and "so far: continue (29 of 30 labelled" in status
    feed(rollout, "2", 1, 0)
    rollout._judge_canary()
    assert registry.canary() is None and str(registry.champion().version) == "1"
    tags = registry.version("2").tags
    assert tags["canary_decision"].startswith("rollback: live accuracy 0.167 below the champion's 0.950")
    evidence = json.loads(tags["canary_evidence"])
    assert (evidence["candidate_labelled"], evidence["candidate_correct"], evidence["champion_correct"]) == (30, 5, 57)
    rollout._read_registry()
    assert rollout.target.candidate is None


def test_a_better_canary_is_promoted_and_a_better_shadow_waits_for_a_person(ray_cluster, canary_store):
    registry, rollout = canary_store
    feed(rollout, "2", 40, 40)
    feed(rollout, "1", 40, 20)
    rollout._judge_canary()
    assert str(registry.champion().version) == "2" and registry.canary() is None
    assert registry.version("2").tags["promoted_by"].startswith("canary: live accuracy 1.000 above")

    registry.set_champion("1")
    registry.start_canary("2", 100.0, shadow=True, rule={"min_labels": 30})
    rollout._read_registry()
    watch(rollout, "a", 1, ["1", "2"])
    feed(rollout, "2", 40, 40)
    feed(rollout, "1", 40, 20)
    rollout._judge_canary()
    assert str(registry.champion().version) == "1" and registry.canary()["shadow"]
