"""The breaker core's takeover: breakers a member gains start again from the log, the stored
probes since are replayed into them, live outcomes meanwhile wait behind the replay, and a
member that may not decide (its lease may have lapsed) decides nothing."""

from __future__ import annotations

import msgspec

from autoserve_breaker.core.breaker import CLOSED, HALF_OPEN, OPEN
from autoserve_breaker.core.breakers import Breakers
from autoserve_config import AppSpec, BreakerConfig, HealthCheckConfig
from autoserve_events import ProbeCompleted

APP, INSTANCE = "web", "web-1"
KEY = (APP, INSTANCE)
CONFIG = BreakerConfig(failure_threshold=3, success_threshold=2, recovery_timeout=10, max_test_requests=2)


def member(owns: bool = True, may_decide: list[bool] | None = None) -> Breakers:
    flag = may_decide if may_decide is not None else [True]
    books = Breakers(owns=lambda app, instance: owns, may_decide=lambda: flag[0])
    books.set_apps({APP: AppSpec(breaker=CONFIG)})
    return books


def probe(t: float, healthy: bool = False) -> ProbeCompleted:
    return ProbeCompleted(
        event_id=f"p-{t}", emitted_at=t, app_name=APP, instance_id=INSTANCE, check_type="http",
        is_healthy=healthy, response_time_ms=1.0, timestamp=t,
    )  # fmt: skip


def test_a_gained_breaker_counts_the_replayed_probes_then_the_held_back_ones() -> None:
    dead, heir = member(), member(owns=False)
    assert dead.probe(probe(1)) == [] and dead.probe(probe(2)) == []  # 2 of 3 failures, then it dies
    assert heir.probe(probe(1)) == []  # not its breaker: not counted

    heir.reown(lambda app, instance: True, gained=lambda app, instance: True)
    assert heir.record(APP, INSTANCE, False, 1.0, 3) == []  # live, during the rebuild: held back
    assert heir.allow(APP, INSTANCE, 3)[0].allow  # answered meanwhile, as before
    for t in (1, 2):
        assert heir.replay_probe(probe(t)) == []
    changes = heir.rebuilt()
    assert [(c.state, c.generation, c.timestamp) for c in changes] == [(OPEN, 1, 3)], "3 failures: open"
    assert heir.owns(KEY) and heir.next_due() == 13


def test_a_gained_breaker_starts_from_its_last_logged_transition_not_from_stale_counts() -> None:
    owner, other = member(), member(owns=False)
    published = [c for t in (1, 2, 3) for c in owner.record(APP, INSTANCE, False, 1.0, t)]
    for seq, event in enumerate(published, start=7):
        other.follow(event, seq)
    assert other.logged(KEY)[:2] == (1, 7)
    # Stale local state (this member decided once, lost the breaker, the log moved on):
    other.get(APP, INSTANCE).consecutive_failures = 99
    other.reown(lambda app, instance: True, gained=lambda app, instance: True)
    breaker = other.get(APP, INSTANCE)
    assert (breaker.state, breaker.generation, breaker.consecutive_failures) == (OPEN, 1, 0)
    assert breaker.retry_at == published[0].retry_at
    other.rebuilt()
    changes = other.tick(13)  # the heir's timer half-opens it at the same deadline
    assert [(c.state, c.generation) for c in changes] == [(HALF_OPEN, 2)]


def test_a_member_that_may_not_decide_decides_nothing() -> None:
    flag = [True]
    books = member(may_decide=flag)
    books.record(APP, INSTANCE, False, 1.0, 1)
    books.record(APP, INSTANCE, False, 1.0, 2)
    flag[0] = False  # its lease may have lapsed
    assert books.record(APP, INSTANCE, False, 1.0, 3) == []
    assert books.owned_count() == 0 and not books.owns(KEY)
    flag[0] = True
    opened = books.record(APP, INSTANCE, False, 1.0, 4)
    assert [c.state for c in opened] == [OPEN]
    flag[0] = False
    assert books.tick(100) == []  # no timer either
    decision, events = books.allow(APP, INSTANCE, 100)
    assert (decision.allow, decision.state, events) == (False, OPEN, [])  # answered, no trial
    flag[0] = True
    assert [c.state for c in books.tick(100)] == [HALF_OPEN]


def test_a_replay_decides_only_for_gained_breakers_and_not_while_fenced() -> None:
    flag = [True]
    books = member(may_decide=flag)
    books.reown(lambda app, instance: True, gained=lambda app, instance: instance == INSTANCE)
    elsewhere = msgspec.structs.replace(probe(1), instance_id="web-2", event_id="p-other")
    assert books.replay_probe(elsewhere) == [] and books.get(APP, "web-2") is None  # not gained: skipped
    flag[0] = False
    assert [c for t in (1, 2, 3) for c in books.replay_probe(probe(t))] == []  # counted, not decided
    flag[0] = True
    assert [c.state for c in books.replay_probe(probe(4))] == [OPEN]


def test_a_refused_transition_is_undone_from_the_log() -> None:
    books = member()
    changes = [c for t in (1, 2, 3) for c in books.record(APP, INSTANCE, False, 1.0, t)]
    assert books.get(APP, INSTANCE).state == OPEN and books.logged(KEY) == (0, 0, "")
    books.resync(KEY)  # the log refused it: nothing stored for this breaker
    assert (books.get(APP, INSTANCE).state, books.get(APP, INSTANCE).generation) == (CLOSED, 0)
    winner = msgspec.structs.replace(changes[0], event_id="theirs", reason="theirs")
    assert books.follow(winner, 11)  # another member's, stored first: followed
    assert books.logged(KEY) == (1, 11, "theirs")
    books.log_aged_out(KEY)
    assert books.logged(KEY) == (1, 0, "theirs")


def test_lost_breakers_are_answered_but_no_longer_timed() -> None:
    books = member()
    [c for t in (1, 2, 3) for c in books.record(APP, INSTANCE, False, 1.0, t)]
    assert books.next_due() == 13
    books.reown(lambda app, instance: False)
    assert books.next_due() is None and books.tick(13) == []
    assert books.allow(APP, INSTANCE, 14)[0].allow is False


def test_a_rebuild_replays_only_the_history_that_can_still_count() -> None:
    books = Breakers()
    quick = AppSpec(breaker=CONFIG, health_check=HealthCheckConfig(period_seconds=10, timeout_seconds=5))
    books.set_apps({"quick": quick})
    assert books.history_seconds(900) == 2 * 3 * 10  # 3 consecutive failures, every 10 s, twice over
    windowed = BreakerConfig(failure_rate_threshold=50, sliding_window_type="time", sliding_window_size=120)
    books.set_apps({"quick": quick, "timed": AppSpec(breaker=windowed)})
    assert books.history_seconds(900) == 2 * 5 * 30 + 120  # the defaults' 5 failures at 30 s, plus the window
    books.set_apps({"counted": AppSpec(breaker=BreakerConfig(failure_rate_threshold=50))})
    assert books.history_seconds(900) == 900, "a window of 100 calls at 30 s is longer than the cap"
    assert Breakers().history_seconds(900) == 900


def test_an_override_is_applied_by_the_owner_even_while_it_rebuilds() -> None:
    flag = [True]
    books = member(owns=False, may_decide=flag)
    assert not books.decides_overrides(KEY)  # another member's
    books.reown(lambda app, instance: True, gained=lambda app, instance: True)
    assert not books.owns(KEY) and books.decides_overrides(KEY)
    [held] = books.override(APP, INSTANCE, "open", 5, "ops", "cmd-1")
    assert (held.state, held.forced, held.generation) == (OPEN, True, 1)
    assert [c for t in (1, 2, 3) for c in books.replay_probe(probe(t))] == []  # older than the override
    assert books.rebuilt() == [] and books.get(APP, INSTANCE).forced
    flag[0] = False
    assert not books.decides_overrides(KEY)  # nor while fenced
