"""The breaker's pure core: table-driven sequences through every transition, the half-open
cap, windows, slow calls, overrides, unknown instances, ownership and the replay fold."""

from __future__ import annotations

import pytest

from autoserve_breaker.core.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, apply
from autoserve_breaker.core.breakers import Breakers
from autoserve_breaker.core.window import CountWindow, TimeWindow
from autoserve_config import AppSpec, BreakerConfig, ConfigError, Instance, parse_config
from autoserve_events import BreakerStateChanged, BreakerTrialAdmitted, ProbeCompleted, decode, encode

APP, INSTANCE = "web", "web-1"


def book(**breaker: object) -> Breakers:
    params = {"failure_threshold": 3, "success_threshold": 2, "recovery_timeout": 10, "max_test_requests": 2}
    books = Breakers()
    books.set_apps({APP: AppSpec(breaker=BreakerConfig(**{**params, **breaker}), instances=[])})  # type: ignore[arg-type]
    return books


def run(books: Breakers, steps: list[tuple]) -> list[tuple[str, object, str]]:
    """Steps: ("ok"|"fail"|"slow", t) outcome; ("allow", t); ("tick", t); ("override", t, action).
    Returns (step, result, state after)."""
    trace = []
    for step in steps:
        kind, t = step[0], step[1]
        if kind in ("ok", "fail", "slow"):
            duration = 5000.0 if kind == "slow" else 1.0
            changes = books.record(APP, INSTANCE, kind != "fail", duration, t)
            result: object = [c.trigger for c in changes]
        elif kind == "allow":
            decision, _ = books.allow(APP, INSTANCE, t)
            result = decision.allow
        elif kind == "tick":
            result = [c.trigger for c in books.tick(t)]
        else:
            result = [c.trigger for c in books.override(APP, INSTANCE, step[2], t, "test", f"cmd-{t}")]
        breaker = books.get(APP, INSTANCE)
        trace.append((kind, result, breaker.state if breaker else "none"))
    return trace


def states(trace: list[tuple[str, object, str]]) -> list[str]:
    return [state for *_, state in trace]


def results(trace: list[tuple[str, object, str]]) -> list[object]:
    return [result for _, result, _ in trace]


# -- every transition, as sequences ----------------------------------------------------

TRANSITIONS = [
    pytest.param(
        [("fail", 1), ("fail", 2), ("fail", 3)],
        [CLOSED, CLOSED, OPEN],
        id="closed->open after failure_threshold consecutive failures",
    ),
    pytest.param(
        [("fail", 1), ("fail", 2), ("ok", 3), ("fail", 4), ("fail", 5)],
        [CLOSED] * 5,
        id="a success resets the consecutive count",
    ),
    pytest.param(
        [("fail", 1), ("fail", 2), ("fail", 3), ("allow", 5), ("allow", 12.9), ("tick", 12.9), ("tick", 13)],
        [CLOSED, CLOSED, OPEN, OPEN, OPEN, OPEN, HALF_OPEN],
        id="open->half_open on the timer after recovery_timeout",
    ),
    pytest.param(
        [("fail", 1), ("fail", 2), ("fail", 3), ("allow", 13)],
        [CLOSED, CLOSED, OPEN, HALF_OPEN],
        id="open->half_open when a request arrives after recovery_timeout",
    ),
    pytest.param(
        [("fail", 1), ("fail", 2), ("fail", 3), ("tick", 13), ("ok", 14), ("ok", 15)],
        [CLOSED, CLOSED, OPEN, HALF_OPEN, HALF_OPEN, CLOSED],
        id="half_open->closed after success_threshold successes",
    ),
    pytest.param(
        [("fail", 1), ("fail", 2), ("fail", 3), ("tick", 13), ("ok", 14), ("fail", 15)],
        [CLOSED, CLOSED, OPEN, HALF_OPEN, HALF_OPEN, OPEN],
        id="half_open->open on a failed trial",
    ),
    pytest.param(
        [
            ("fail", 1),
            ("fail", 2),
            ("fail", 3),
            ("tick", 13),
            ("allow", 13),
            ("allow", 13),
            ("tick", 22.9),
            ("tick", 23),
        ],
        [CLOSED, CLOSED, OPEN, HALF_OPEN, HALF_OPEN, HALF_OPEN, HALF_OPEN, OPEN],
        id="half_open->open when every trial is out and none reports back",
    ),
    pytest.param(
        [("fail", 1), ("fail", 2), ("fail", 3), ("fail", 4), ("ok", 5), ("tick", 12)],
        [CLOSED, CLOSED, OPEN, OPEN, OPEN, OPEN],
        id="outcomes while open are ignored",
    ),
    pytest.param(
        [("fail", 1), ("fail", 2), ("fail", 3), ("tick", 13), ("ok", 14), ("ok", 15), ("fail", 16), ("fail", 17)],
        [CLOSED, CLOSED, OPEN, HALF_OPEN, HALF_OPEN, CLOSED, CLOSED, CLOSED],
        id="closing starts the counts afresh",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), TRANSITIONS)
def test_transitions(steps: list[tuple], expected: list[str]) -> None:
    assert states(run(book(), steps)) == expected


def test_transition_events_carry_the_seed_fields_and_a_reason() -> None:
    books = book()
    changes = [c for t in (1, 2, 3) for c in books.record(APP, INSTANCE, False, 1.0, t, cause=f"probe-{t}")]
    (opened,) = changes
    assert (opened.state, opened.previous_state, opened.consecutive_failures) == (OPEN, CLOSED, 3)
    assert opened.reason == "3 consecutive failures (failure_threshold 3)"
    assert (opened.generation, opened.retry_at, opened.cause_event_id, opened.trigger) == (
        1,
        13,
        "probe-3",
        "failure_threshold",
    )
    assert decode(encode(opened)) == opened


def test_event_ids_are_deterministic() -> None:
    def fold() -> list[str]:
        books = book()
        ids = [c.event_id for t in (1, 2, 3) for c in books.record(APP, INSTANCE, False, 1.0, t, cause=f"p{t}")]
        ids += [e.event_id for e in books.allow(APP, INSTANCE, 14)[1]]
        return ids

    first = fold()
    assert first == fold()
    assert len(set(first)) == len(first) == 3  # open, half_open, trial 1


# -- the half-open cap ------------------------------------------------------------------


def open_then_half_open(books: Breakers) -> None:
    for t in (1, 2, 3):
        books.record(APP, INSTANCE, False, 1.0, t)
    books.tick(13)
    assert books.get(APP, INSTANCE).state == HALF_OPEN


@pytest.mark.parametrize("max_test_requests", [1, 2, 5])
def test_half_open_admits_at_most_max_test_requests_from_many_callers(max_test_requests: int) -> None:
    """100 callers ask before any trial reports back (the seed let them all through)."""
    books = book(max_test_requests=max_test_requests, success_threshold=max_test_requests)
    open_then_half_open(books)
    answers = [books.allow(APP, INSTANCE, 13.001)[0].allow for _ in range(100)]
    assert answers.count(True) == max_test_requests
    assert answers[:max_test_requests] == [True] * max_test_requests
    assert books.get(APP, INSTANCE).test_request_count == max_test_requests


def test_each_admission_is_an_event_and_the_fold_restores_the_count() -> None:
    books = book(max_test_requests=3)
    open_then_half_open(books)
    events = [e for _ in range(2) for e in books.allow(APP, INSTANCE, 14)[1]]
    assert [(e.trial, e.generation) for e in events if isinstance(e, BreakerTrialAdmitted)] == [(1, 2), (2, 2)]
    # A restarted replica folds the last transition and the last trial: one trial left.
    restarted = book(max_test_requests=3)
    half_open = BreakerStateChanged(
        app_name=APP, instance_id=INSTANCE, state=HALF_OPEN, previous_state=OPEN, consecutive_failures=0,
        consecutive_successes=0, reason="", timestamp=13, generation=2,
    )  # fmt: skip
    assert restarted.follow(half_open)
    assert restarted.follow(events[-1])
    assert [restarted.allow(APP, INSTANCE, 15)[0].allow for _ in range(3)] == [True, False, False]


def test_the_request_that_half_opens_the_breaker_is_the_first_trial() -> None:
    books = book(max_test_requests=1)
    for t in (1, 2, 3):
        books.record(APP, INSTANCE, False, 1.0, t)
    decision, events = books.allow(APP, INSTANCE, 13)
    assert (decision.allow, decision.state) == (True, HALF_OPEN)
    assert [type(e).__name__ for e in events] == ["BreakerStateChanged", "BreakerTrialAdmitted"]
    assert books.allow(APP, INSTANCE, 13)[0].allow is False


# -- windows and slow calls ---------------------------------------------------------------


def test_count_window_failure_rate_opens_once_minimum_number_of_calls_is_reached() -> None:
    books = book(failure_threshold=100, failure_rate_threshold=50, minimum_number_of_calls=4, sliding_window_size=4)
    trace = run(books, [("fail", 1), ("ok", 2), ("fail", 3), ("ok", 4)])
    assert states(trace) == [CLOSED, CLOSED, CLOSED, OPEN]
    assert results(trace)[-1] == ["failure_rate"]


def test_count_window_forgets_the_oldest_call() -> None:
    books = book(failure_threshold=100, failure_rate_threshold=60, minimum_number_of_calls=3, sliding_window_size=3)
    # f o o -> 33%; o o f -> 33%; window of 3 never holds two failures
    trace = run(books, [("fail", 1), ("ok", 2), ("ok", 3), ("fail", 4), ("ok", 5), ("ok", 6), ("fail", 7)])
    assert states(trace) == [CLOSED] * 7
    trace = run(books, [("fail", 8)])  # o f f -> 67%
    assert states(trace) == [OPEN]


def test_time_window_only_counts_the_last_n_seconds() -> None:
    books = book(
        failure_threshold=100,
        failure_rate_threshold=50,
        minimum_number_of_calls=3,
        sliding_window_type="time",
        sliding_window_size=10,
    )
    trace = run(books, [("fail", 100), ("fail", 101), ("ok", 120), ("ok", 121), ("fail", 122)])
    assert states(trace) == [CLOSED] * 5  # the two early failures left the window: 1 of 3
    trace = run(books, [("fail", 123)])  # 2 of 4 in the last 10 s
    assert states(trace) == [OPEN]


def test_slow_call_rate_opens_even_when_every_call_succeeds() -> None:
    books = book(slow_call_duration_threshold=1000, slow_call_rate_threshold=50, minimum_number_of_calls=4)
    trace = run(books, [("slow", 1), ("ok", 2), ("ok", 3), ("slow", 4)])
    assert states(trace) == [CLOSED, CLOSED, CLOSED, OPEN]
    assert results(trace)[-1] == ["slow_call_rate"]


def test_a_slow_trial_reopens_a_half_open_breaker() -> None:
    books = book(slow_call_duration_threshold=1000)
    open_then_half_open(books)
    assert states(run(books, [("slow", 14)])) == [OPEN]


def test_windows_are_off_by_default_as_in_the_seed() -> None:
    books = book(failure_threshold=5)
    assert states(run(books, [("fail", t) if t % 2 else ("ok", t) for t in range(1, 40)]))[-1] == CLOSED
    assert books.get(APP, INSTANCE).window is None


@pytest.mark.parametrize("window", [CountWindow(5), TimeWindow(5)])
def test_window_totals(window: CountWindow | TimeWindow) -> None:
    for t in range(10):
        window.record(t % 3 == 0, t % 2 == 0, 100 + t)
    counts = window.counts(109)
    assert counts.calls == 5
    assert counts.failures == sum(1 for t in range(5, 10) if t % 3 == 0)
    assert counts.slow == sum(1 for t in range(5, 10) if t % 2 == 0)


def test_time_window_places_a_late_outcome_in_its_second() -> None:
    window = TimeWindow(10)
    window.record(False, False, 105)
    window.record(True, False, 103.5)  # arrived late
    window.record(True, False, 90)  # older than the window: dropped
    assert window.counts(105) == (2, 1, 0)
    assert window.counts(113.9) == (1, 0, 0)  # second 103 left the window


# -- manual override ------------------------------------------------------------------------


def test_manual_open_holds_the_breaker_open_past_recovery_timeout() -> None:
    books = book()
    trace = run(books, [("override", 1, "open"), ("tick", 100), ("allow", 100), ("ok", 101)])
    assert states(trace) == [OPEN] * 4
    assert results(trace)[2] is False
    assert books.get(APP, INSTANCE).forced


def test_manual_close_holds_it_closed_whatever_fails() -> None:
    books = book()
    trace = run(books, [("fail", 1), ("fail", 2), ("override", 3, "close")] + [("fail", t) for t in range(4, 20)])
    assert set(states(trace)) == {CLOSED}
    assert books.allow(APP, INSTANCE, 20)[0].allow


def test_reset_returns_to_automatic_operation_with_counts_cleared() -> None:
    books = book()
    trace = run(books, [("fail", 1), ("fail", 2), ("override", 3, "reset"), ("fail", 4), ("fail", 5), ("fail", 6)])
    assert states(trace) == [CLOSED] * 5 + [OPEN]
    assert not books.get(APP, INSTANCE).forced


def test_overrides_are_events_with_trigger_manual() -> None:
    books = book()
    (change,) = books.override(APP, INSTANCE, "open", 5, "ops@host", "cmd-1")
    assert (change.state, change.forced, change.trigger, change.cause_event_id) == (OPEN, True, "manual", "cmd-1")
    assert "ops@host" in change.reason


# -- unknown instances, ownership, replay -------------------------------------------------


def test_unknown_instances_are_allowed_by_default_and_the_default_is_configurable() -> None:
    books = Breakers()
    books.set_apps(
        {
            "open-app": AppSpec(),
            "strict": AppSpec(
                breaker=BreakerConfig(allow_unknown_instances=False), instances=[Instance(id="s-1", host="127.0.0.1")]
            ),
        }
    )
    answer = lambda app, inst: books.allow(app, inst, 1)[0]  # noqa: E731
    assert (answer("open-app", "x").allow, answer("open-app", "x").known) == (True, False)
    assert (answer("strict", "x").allow, answer("strict", "x").state) == (False, OPEN)
    assert (answer("strict", "s-1").allow, answer("strict", "s-1").state) == (True, CLOSED)  # configured
    assert answer("no-such-app", "x").allow
    assert Breakers(allow_unknown_apps=False).allow("no-such-app", "x", 1)[0].allow is False


def test_a_replica_that_does_not_own_a_breaker_follows_it_and_admits_no_trial() -> None:
    owner = book()
    follower = Breakers(owns=lambda app, inst: False)
    follower.set_apps({APP: AppSpec(breaker=owner.config(APP))})
    published = [c for t in (1, 2, 3) for c in owner.record(APP, INSTANCE, False, 1.0, t)]
    assert follower.record(APP, INSTANCE, False, 1.0, 4) == []  # not its decision
    for event in published:
        follower.follow(event)
    assert follower.allow(APP, INSTANCE, 5)[0].allow is False
    published = owner.tick(13)
    assert follower.tick(13) == []  # the owner's timer, not this one's
    for event in published:
        follower.follow(event)
    decision, events = follower.allow(APP, INSTANCE, 13)
    assert (decision.allow, decision.state, events) == (False, HALF_OPEN, [])


def test_follow_ignores_its_own_and_older_transitions() -> None:
    books = book()
    changes = [c for t in (1, 2, 3) for c in books.record(APP, INSTANCE, False, 1.0, t)]
    assert books.follow(changes[0]) is False  # generation already applied
    assert books.get(APP, INSTANCE).state == OPEN


def test_replayed_probes_fold_as_they_were_folded_live() -> None:
    def probe(t: float, healthy: bool) -> ProbeCompleted:
        return ProbeCompleted(
            event_id=f"p{t}", app_name=APP, instance_id=INSTANCE, check_type="http", is_healthy=healthy,
            response_time_ms=1.0, timestamp=t,
        )  # fmt: skip

    live = book()
    history = [probe(1, False), probe(2, False), probe(3, False), probe(20, True), probe(21, False)]
    published = [c for p in history for c in live.probe(p)]
    restarted = book()
    for change in published:  # the last transition first (it is what the stream keeps) ...
        restarted.follow(change)
    for p in history:  # ... then the probes: those before the transition do not count again
        restarted.probe(p)
    a, b = live.get(APP, INSTANCE), restarted.get(APP, INSTANCE)
    assert (a.state, a.retry_at, a.consecutive_failures) == (b.state, b.retry_at, b.consecutive_failures)


def test_apply_folds_a_transition_into_a_fresh_state() -> None:
    breaker = Breaker(APP, INSTANCE, consecutive_failures=4, test_request_count=2)
    event = BreakerStateChanged(
        app_name=APP, instance_id=INSTANCE, state=OPEN, previous_state=CLOSED, consecutive_failures=4,
        consecutive_successes=0, reason="", timestamp=50, generation=7, retry_at=110,
    )  # fmt: skip
    apply(breaker, event)
    assert (breaker.state, breaker.generation, breaker.retry_at, breaker.consecutive_failures) == (OPEN, 7, 110, 0)
    assert breaker.test_request_count == 0


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("breaker", "problem"),
    [
        ({"failure_rate_threshold": 0}, "failure_rate_threshold: must be a percentage in (0, 100], got 0"),
        ({"slow_call_rate_threshold": 101}, "slow_call_rate_threshold: must be a percentage in (0, 100], got 101"),
        ({"slow_call_duration_threshold": 0}, "slow_call_duration_threshold: must be positive (ms), got 0"),
        ({"sliding_window_size": 0}, "sliding_window_size: must be between 1 and 100000 calls, got 0"),
        (
            {"sliding_window_type": "time", "sliding_window_size": 100000},
            "sliding_window_size: must be between 1 and 86400 seconds, got 100000",
        ),
        ({"minimum_number_of_calls": 0}, "minimum_number_of_calls: must be at least 1, got 0"),
        ({"minimum_number_of_calls": 200}, "a count window holds 100 calls, so at most that, got 200"),
        ({"sliding_window_type": "sliding"}, "sliding_window_type: must be one of 'count', 'time'"),
        ({"allow_unknown_instance": False}, "unknown key (did you mean 'allow_unknown_instances'?)"),
    ],
)
def test_breaker_config_problems_name_the_field_and_value(breaker: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"apps": {"web": {"breaker": breaker}}})
    assert any(problem in p and p.startswith("apps.web.breaker.") for p in caught.value.problems), caught.value.problems
