"""Scheduling maths: stable spread start-up, fixed-rate periods, skipped slots."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoserve_prober.core.schedule import (
    after_takeover,
    aligned_due,
    catch_up_due,
    first_due,
    next_due,
    phase_offset,
)


def test_phase_is_stable_and_inside_the_period() -> None:
    assert phase_offset("web/web-1", 5.0) == phase_offset("web/web-1", 5.0)
    assert 0 <= phase_offset("web/web-1", 5.0) < 5.0
    assert phase_offset("web/web-1", 5.0) != phase_offset("web/web-2", 5.0)


def test_ten_thousand_targets_do_not_fire_together() -> None:
    """kubelet's reason for jitter: spread over the period, about evenly."""
    period = 1.0
    buckets = [0] * 10
    for i in range(10_000):
        buckets[int(phase_offset(f"app/i-{i}", period) * 10)] += 1
    assert min(buckets) > 850 and max(buckets) < 1150, buckets
    assert statistics.pstdev(buckets) < 60


def test_first_due_adds_the_initial_delay_then_the_phase() -> None:
    assert first_due(100.0, 30.0, 10.0, "k") == pytest.approx(130.0 + phase_offset("k", 10.0))
    assert first_due(100.0, 0.0, 10.0, "k") == pytest.approx(100.0 + phase_offset("k", 10.0))


# (due, period, now) -> (next due, missed slots), in the style of kubelet's worker_test.go
STEPS = [
    ((10.0, 5.0, 10.2), (15.0, 0)),  # probe took 0.2 s: next slot
    ((10.0, 5.0, 14.999), (15.0, 0)),  # finished just in time
    ((10.0, 5.0, 15.0), (15.0, 0)),  # finished exactly at the next slot: it runs now
    ((10.0, 5.0, 16.0), (15.0, 0)),  # overran into the next slot: it runs now, 1 s late
    ((10.0, 5.0, 31.0), (30.0, 3)),  # stalled: 15, 20 and 25 passed entirely; no catch-up burst
    ((10.0, 1.0, 10.0), (11.0, 0)),
]


@pytest.mark.parametrize(("args", "expected"), STEPS)
def test_next_due(args: tuple[float, float, float], expected: tuple[float, int]) -> None:
    due, missed = next_due(*args)
    assert (due, missed) == (pytest.approx(expected[0]), expected[1])


def test_a_sequence_of_probes_keeps_a_fixed_rate() -> None:
    durations = [0.1, 0.3, 2.5, 0.1, 6.0, 0.2]  # seconds each probe took
    due, period, dues, missed_total = 0.0, 2.0, [], 0
    for took in durations:
        due, missed = next_due(due, period, due + took)
        dues.append(due)
        missed_total += missed
    assert dues == [2.0, 4.0, 6.0, 8.0, 14.0, 16.0]
    assert missed_total == 2


def test_a_timeout_equal_to_the_period_loses_no_slot() -> None:
    """A probe timing out after a full period is followed at once (kubelet's ticker)."""
    assert next_due(10.0, 1.0, 11.002) == (11.0, 0)


@given(
    st.floats(0, 1e6, allow_nan=False),
    st.floats(0.5, 600, allow_nan=False),
    st.floats(0, 1e4, allow_nan=False),
)
def test_next_due_is_the_oldest_slot_not_entirely_past(due: float, period: float, elapsed: float) -> None:
    now = due + elapsed
    following, missed = next_due(due, period, now)
    assert now - period < following <= max(now, due + period) + 1e-6
    assert following == pytest.approx(due + (missed + 1) * period, rel=1e-9, abs=1e-6)
    assert missed >= 0


@given(st.text(max_size=40), st.floats(0.001, 3600, allow_nan=False))
def test_phase_is_always_in_range(key: str, period: float) -> None:
    assert 0 <= phase_offset(key, period) < period


@given(st.floats(0, 1e6, allow_nan=False))
def test_ticks_never_fire_early_and_stay_close(t: float) -> None:
    from autoserve_prober.core.schedule import TICK_SECONDS, on_tick

    assert t - 1e-6 <= on_tick(t) < t + TICK_SECONDS + 1e-6


@given(st.floats(1e9, 2e9, allow_nan=False), st.floats(0, 60, allow_nan=False), st.sampled_from([0.5, 1.0, 10.0]))
def test_aligned_slots_are_the_keys_phase_on_a_grid_every_member_shares(
    now: float, delay: float, period: float
) -> None:
    due = aligned_due(now, delay, period, "web/w-1")
    assert now + delay - 1e-6 <= due < now + delay + period + 1e-6
    slots = (due - phase_offset("web/w-1", period)) / period
    assert slots == pytest.approx(round(slots), abs=1e-5)  # a whole number of periods past the phase


def test_two_members_starting_apart_probe_a_key_in_the_same_slots() -> None:
    """A target moving between members keeps its slots: no burst, no gap."""
    first = aligned_due(1_000.1, 0.0, 1.0, "k")
    second = aligned_due(1_003.7, 0.0, 1.0, "k")
    assert (second - first) == pytest.approx(round(second - first))
    assert aligned_due(1_000.0, 30.0, 10.0, "k") == pytest.approx(1_030.0 + phase_offset("k", 10.0))


def test_after_a_takeover_probe_the_next_slot_is_on_the_grid_at_least_half_a_period_on() -> None:
    for now in (1_000.0, 1_000.3, 1_000.77):
        following = after_takeover(now, 1.0, "k")
        assert now + 0.5 - 1e-9 <= following < now + 1.5
        assert following == pytest.approx(aligned_due(following, 0.0, 1.0, "k"))


def test_a_takeover_catches_up_one_missed_slot_at_once_and_otherwise_keeps_the_grid() -> None:
    slot = aligned_due(1_000.0, 0.0, 1.0, "k")  # a slot in [1000, 1001)
    assert catch_up_due(slot + 0.1, slot - 0.2, 1.0, "k") == pytest.approx(slot + 0.1)  # missed: now
    assert catch_up_due(slot + 0.1, 0.0, 1.0, "k") == pytest.approx(slot + 0.1)  # since ever: now
    assert catch_up_due(slot - 0.1, slot - 0.3, 1.0, "k") == pytest.approx(slot)  # not yet due: its slot
    assert catch_up_due(slot + 0.1, slot + 0.05, 1.0, "k") == pytest.approx(slot + 1.0)  # probed: the next
