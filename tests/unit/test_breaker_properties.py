"""Hypothesis state machine over the breaker core: any interleaving of outcomes, allow
calls, timer ticks, time passing and overrides keeps the invariants the seed broke."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from autoserve_breaker.core.breaker import CLOSED, HALF_OPEN, OPEN
from autoserve_breaker.core.breakers import Breakers
from autoserve_config import AppSpec, BreakerConfig
from autoserve_events import BreakerStateChanged, BreakerTrialAdmitted

APP, INSTANCE = "web", "web-1"


class BreakerMachine(RuleBasedStateMachine):
    @initialize(
        failure_threshold=st.integers(1, 4),
        success_threshold=st.integers(1, 4),
        max_test_requests=st.integers(1, 4),
        recovery_timeout=st.sampled_from([1.0, 5.0]),
        window=st.sampled_from([None, "count", "time"]),
        slow=st.booleans(),
    )
    def setup(self, failure_threshold, success_threshold, max_test_requests, recovery_timeout, window, slow) -> None:
        config = BreakerConfig(
            failure_threshold=failure_threshold,
            success_threshold=success_threshold,
            max_test_requests=max_test_requests,
            recovery_timeout=recovery_timeout,
            sliding_window_type=window or "count",
            sliding_window_size=5,
            minimum_number_of_calls=3,
            failure_rate_threshold=50 if window else None,
            slow_call_duration_threshold=100 if slow else None,
        )
        self.config = config
        self.books = Breakers()
        self.books.set_apps({APP: AppSpec(breaker=config)})
        self.now = 1000.0
        self.admitted_in_half_open = 0  # trials answered True in the current half-open
        self.successes_in_half_open = 0  # plain successes reported in the current half-open
        self.generation = 0
        self.replica = Breakers()  # folds only the published events, as a restarted service would
        self.replica.set_apps({APP: AppSpec(breaker=config)})

    def _state(self) -> str:
        breaker = self.books.get(APP, INSTANCE)
        return breaker.state if breaker else CLOSED

    def _published(self, events: list) -> None:
        for event in events:
            if isinstance(event, BreakerStateChanged):
                assert event.generation == self.generation + 1, "transitions are numbered without gaps"
                self.generation = event.generation
                if event.state == CLOSED and event.previous_state == HALF_OPEN and event.trigger != "manual":
                    assert self.successes_in_half_open >= self.config.success_threshold
                if event.state == HALF_OPEN or event.previous_state == HALF_OPEN:
                    self.admitted_in_half_open = self.successes_in_half_open = 0
            if isinstance(event, BreakerStateChanged | BreakerTrialAdmitted):
                self.replica.follow(event)

    @rule(success=st.booleans(), slow=st.booleans())
    def outcome(self, success: bool, slow: bool) -> None:
        was = self._state()
        events = self.books.record(APP, INSTANCE, success, 500.0 if slow else 1.0, self.now)
        if was == HALF_OPEN and success and not (slow and self.config.slow_call_duration_threshold):
            self.successes_in_half_open += 1
        self._published(events)

    @rule(callers=st.integers(1, 8))
    def allow(self, callers: int) -> None:
        for _ in range(callers):
            decision, events = self.books.allow(APP, INSTANCE, self.now)
            self._published(events)
            if decision.allow and decision.state == HALF_OPEN:
                self.admitted_in_half_open += 1
            if self._state() == OPEN:
                assert not decision.allow

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 2.0, 6.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self._published(self.books.tick(self.now))

    @rule(action=st.sampled_from(["open", "close", "reset"]))
    def override(self, action: str) -> None:
        self._published(self.books.override(APP, INSTANCE, action, self.now, "ops", f"c{self.now}"))  # type: ignore[arg-type]

    @invariant()
    def half_open_never_admits_more_than_max_test_requests(self) -> None:
        assert self.admitted_in_half_open <= self.config.max_test_requests
        breaker = self.books.get(APP, INSTANCE)
        if breaker is not None:
            assert breaker.test_request_count <= self.config.max_test_requests

    @invariant()
    def a_replica_folding_the_events_answers_the_same(self) -> None:
        breaker = self.books.get(APP, INSTANCE)
        copy = self.replica.get(APP, INSTANCE)
        if breaker is None or copy is None:
            return
        assert (copy.state, copy.generation, copy.forced, copy.retry_at) == (
            breaker.state,
            breaker.generation,
            breaker.forced,
            breaker.retry_at,
        )
        assert copy.test_request_count == breaker.test_request_count


BreakerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestBreakerMachine = BreakerMachine.TestCase
