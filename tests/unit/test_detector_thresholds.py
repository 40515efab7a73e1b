"""Flap damping, ported from kubelet's worker_test.go (TestFailureThreshold,
TestSuccessThreshold) and Consul's flapping tests, against the pure HealthRun."""

from __future__ import annotations

import pytest
from autoserve_detector.core.thresholds import HealthRun
from hypothesis import given
from hypothesis import strategies as st

PASS, FAIL = True, False


def run(sequence: list[bool], failure_threshold: int, success_threshold: int) -> list[bool | None]:
    """The health after each result."""
    state = HealthRun()
    health = []
    for result in sequence:
        state.observe(result, failure_threshold, success_threshold)
        health.append(state.healthy)
    return health


def test_starts_unknown() -> None:
    assert HealthRun().healthy is None
    assert run([FAIL, FAIL], 3, 1) == [None, None]


def test_failure_threshold() -> None:
    """kubelet TestFailureThreshold: healthy stays healthy until failureThreshold failures in a row."""
    health = run([PASS] + [FAIL, FAIL, FAIL] * 1, failure_threshold=3, success_threshold=1)
    assert health == [True, True, True, False]
    # Repeated: each run of failures must reach the threshold again after a success.
    health = run([PASS, FAIL, FAIL, PASS, FAIL, FAIL, PASS, FAIL, FAIL, FAIL], 3, 1)
    assert health == [True, True, True, True, True, True, True, True, True, False]


def test_success_threshold() -> None:
    """kubelet TestSuccessThreshold: unhealthy until successThreshold successes in a row."""
    health = run([FAIL, FAIL, FAIL, PASS, PASS, FAIL, PASS, PASS, PASS], failure_threshold=3, success_threshold=3)
    assert health == [None, None, False, False, False, False, False, False, True]


def test_a_success_resets_the_failure_run() -> None:
    """Where the seed is wrong (item 1): consecutive means consecutive."""
    state = HealthRun()
    for result in [FAIL, FAIL, PASS, FAIL]:
        state.observe(result, 3, 1)
    assert state.consecutive_failures == 1
    assert state.healthy is True


# Consul's StatusHandler flapping: a check that flaps faster than its thresholds never changes.
@pytest.mark.parametrize(
    ("sequence", "thresholds", "expected_last"),
    [
        ([PASS, FAIL] * 10, (2, 2), None),
        ([PASS, PASS] + [FAIL, PASS] * 10, (2, 2), True),
        ([FAIL, FAIL] + [PASS, FAIL] * 10, (2, 2), False),
        ([PASS, PASS, FAIL, FAIL, PASS, PASS], (2, 2), True),
    ],
)
def test_flapping_is_damped(sequence: list[bool], thresholds: tuple[int, int], expected_last: bool | None) -> None:
    assert run(sequence, *thresholds)[-1] is expected_last


def test_transitions_report_previous_and_run() -> None:
    state = HealthRun()
    assert state.observe(PASS, 2, 1).healthy is True
    assert state.observe(FAIL, 2, 1) is None
    transition = state.observe(FAIL, 2, 1)
    assert (transition.previous, transition.healthy, transition.run) == (True, False, 2)
    assert state.observe(FAIL, 2, 1) is None  # no duplicate transition while it stays down


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_health_only_changes_at_a_threshold(
    sequence: list[bool], failure_threshold: int, success_threshold: int
) -> None:
    state = HealthRun()
    streak, last = 0, None
    for result in sequence:
        streak = streak + 1 if result == last else 1
        last = result
        before = state.healthy
        transition = state.observe(result, failure_threshold, success_threshold)
        if transition is not None:
            assert transition.healthy == result and transition.previous == before
            assert streak >= (success_threshold if result else failure_threshold)
        else:
            assert state.healthy == before
