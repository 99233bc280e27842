"""The canary decision rule (canary.py): pure, on counts."""

import random

import pytest

from cifar_ray.canary import Arm, Rule, decide, p_lower, wilson_interval

RULE = Rule(min_labels=200, level=0.05, min_requests=100, max_duration_s=600)


def arm(labelled: int, accuracy: float, requests: int = 1000, errors: int = 0, p99_ms: float = 20.0) -> Arm:
    return Arm(requests=requests, errors=errors, p99_ms=p99_ms, labelled=labelled,
               correct=round(labelled * accuracy))


def test_a_clearly_worse_candidate_is_rolled_back_with_its_p_value():
    verdict = decide(arm(200, 0.10), arm(200, 0.85), RULE, elapsed_s=60)
    assert verdict.action == "rollback" and verdict.p_value < 1e-6
    assert "0.100 below the champion's 0.850" in verdict.reason


def test_a_clearly_better_candidate_is_promoted():
    verdict = decide(arm(400, 0.92), arm(400, 0.80), RULE, elapsed_s=60)
    assert verdict.action == "promote" and verdict.p_value < 0.05


def test_better_by_less_than_min_improvement_is_not_promoted():
    rule = Rule(min_labels=200, min_improvement=0.15)
    assert decide(arm(400, 0.92), arm(400, 0.80), rule, elapsed_s=60).action == "continue"


def test_a_small_difference_is_undecided_until_max_duration_then_stops():
    candidate, champion = arm(300, 0.81), arm(300, 0.80)
    assert decide(candidate, champion, RULE, elapsed_s=60).action == "continue"
    verdict = decide(candidate, champion, RULE, elapsed_s=600)
    assert verdict.action == "stop" and verdict.p_value > 0.05


def test_too_few_labels_waits_however_large_the_gap():
    verdict = decide(arm(199, 0.0), arm(500, 1.0), RULE, elapsed_s=60)
    assert verdict.action == "continue" and verdict.p_value is None
    assert "199 of 200 labelled answers" in verdict.reason


def test_errors_and_slow_answers_roll_back_before_any_label():
    assert decide(arm(0, 0, errors=20), arm(0, 0), RULE, 1).action == "rollback"
    assert decide(arm(0, 0, p99_ms=90), arm(0, 0, p99_ms=20), RULE, 1).action == "rollback"
    assert decide(arm(0, 0, requests=50, errors=20), arm(0, 0), RULE, 1).action == "continue"  # too few yet


@pytest.mark.parametrize("accuracy", [0.5, 0.9])
def test_equal_arms_false_alarm_at_about_the_stated_level(accuracy):
    """Both arms the same model: the rollback test fires in about `level` of windows."""
    rng = random.Random(0)
    n, trials = 300, 2000
    fired = 0
    for _ in range(trials):
        a = Arm(labelled=n, correct=sum(rng.random() < accuracy for _ in range(n)))
        b = Arm(labelled=n, correct=sum(rng.random() < accuracy for _ in range(n)))
        fired += p_lower(a, b, 0.0) < 0.05
    assert 0.03 < fired / trials < 0.07


def test_wilson_interval_holds_the_rate_and_narrows_with_more_labels():
    low, high = wilson_interval(80, 100)
    assert low < 0.8 < high and 0.70 < low and high < 0.88
    low2, high2 = wilson_interval(800, 1000)
    assert high2 - low2 < (high - low) / 2
    assert wilson_interval(0, 0) == (0.0, 1.0)
