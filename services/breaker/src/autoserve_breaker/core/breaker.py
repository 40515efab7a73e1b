"""One circuit breaker: the seed's ``CircuitBreaker`` as commands that return events and a
fold ``apply(breaker, event)``.

States and parameters are the seed's (``failure_threshold``, ``success_threshold``,
``recovery_timeout``, ``max_test_requests``). Beyond the seed:

- half-open admits at most ``max_test_requests`` trial requests, and each admission is an
  event, so the cap holds across a restart (the seed never counts them);
- an open breaker half-opens after ``recovery_timeout`` on a timer (``tick``), without
  waiting for a request;
- a sliding window (count or time) with ``failure_rate_threshold`` and a slow-call rate,
  as in resilience4j, opens a closed breaker too, once ``minimum_number_of_calls`` are in it;
- a half-open breaker whose trials are all out and that hears nothing for
  ``recovery_timeout`` opens again (resilience4j's ``maxWaitDurationInHalfOpenState``), so
  a lost trial outcome cannot wedge it;
- an operator can hold it open or closed, or reset it (``override``).

Every transition starts fresh counts: outcomes belong to the state they were seen in.
Event ids are deterministic (cause, breaker, generation), so a repeated fold publishes
duplicates that JetStream drops by ``Nats-Msg-Id``.

``from_log`` rebuilds a breaker from what the log holds of it: its last transition and the
last trial admitted in it. A member taking a breaker over starts from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from autoserve_config import BreakerConfig
from autoserve_events import BreakerStateChanged, BreakerTrialAdmitted, OverrideAction, derived_event_id

from .window import Window, new_window

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Outcome(msgspec.Struct, frozen=True):
    """A call's outcome, seen by a probe or reported by a client (internal, not published)."""

    success: bool
    slow: bool
    at: float


BreakerEvent = Outcome | BreakerStateChanged | BreakerTrialAdmitted


@dataclass(slots=True)
class Breaker:
    """The seed's ``CircuitBreakerInfo``, plus what the fold needs."""

    app_name: str
    instance_id: str
    state: str = CLOSED
    generation: int = 0  # transitions so far; orders them across members
    forced: bool = False  # held by an operator: no automatic transition
    retry_at: float | None = None  # open: when it half-opens
    changed_at: float = 0.0
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    test_request_count: int = 0  # half-open trials admitted (the seed's name)
    last_activity_at: float = 0.0  # half-open: last trial admitted or outcome seen
    window: Window | None = None
    window_spec: tuple[str, int] | None = None


def from_log(
    app_name: str, instance_id: str, change: BreakerStateChanged | None, trial: BreakerTrialAdmitted | None
) -> Breaker:
    """The breaker as its logged events leave it: counts fresh from its last transition."""
    breaker = Breaker(app_name, instance_id)
    if change is not None:
        apply(breaker, change)
    if trial is not None and trial.generation == breaker.generation:
        apply(breaker, trial)
    return breaker


def uses_window(config: BreakerConfig) -> bool:
    return config.failure_rate_threshold is not None or config.slow_call_duration_threshold is not None


def history_needed(config: BreakerConfig, period: float) -> float:
    """How far back probes (one every ``period``) can still count toward a breaker's next
    transition: twice the calls its thresholds or its count window span, plus a time window.
    Older ones cannot change a decision (an open breaker ignores outcomes altogether)."""
    calls, seconds = max(config.failure_threshold, config.success_threshold), 0.0
    if uses_window(config):
        if config.sliding_window_type == "count":
            calls = max(calls, config.sliding_window_size)
        else:
            seconds = config.sliding_window_size
    return 2 * calls * period + seconds


# -- the fold ---------------------------------------------------------------------------


def apply(breaker: Breaker, event: BreakerEvent) -> Breaker:
    if isinstance(event, Outcome):
        _apply_outcome(breaker, event)
    elif isinstance(event, BreakerStateChanged):
        breaker.state = event.state
        breaker.generation = event.generation
        breaker.forced = event.forced
        breaker.retry_at = event.retry_at
        breaker.changed_at = event.timestamp
        breaker.last_activity_at = event.timestamp
        breaker.consecutive_failures = breaker.consecutive_successes = breaker.test_request_count = 0
        breaker.window = None  # a new state counts afresh
        breaker.window_spec = None
    elif isinstance(event, BreakerTrialAdmitted):
        breaker.test_request_count = max(breaker.test_request_count, event.trial)
        breaker.last_activity_at = max(breaker.last_activity_at, event.timestamp)
    return breaker


def _apply_outcome(breaker: Breaker, outcome: Outcome) -> None:
    if breaker.state == HALF_OPEN:
        breaker.last_activity_at = outcome.at
        if outcome.success and not outcome.slow:  # a slow trial says "not recovered yet"
            breaker.consecutive_successes += 1
        else:
            breaker.consecutive_failures += 1
            breaker.consecutive_successes = 0
        return
    if outcome.success:
        breaker.consecutive_failures = 0
        breaker.consecutive_successes += 1
    else:
        breaker.consecutive_failures += 1
        breaker.consecutive_successes = 0
    if breaker.window is not None:
        breaker.window.record(not outcome.success, outcome.slow, outcome.at)


# -- commands: they decide, return events, and change nothing ---------------------------


def record(breaker: Breaker, config: BreakerConfig, success: bool, duration_ms: float, now: float) -> list[Outcome]:
    """An outcome counts only in the state it was seen in: not before the last transition,
    and not while open (no call passes an open breaker; a late one says nothing new)."""
    if now < breaker.changed_at or breaker.state == OPEN:
        return []
    threshold = config.slow_call_duration_threshold
    return [Outcome(success, threshold is not None and duration_ms > threshold, now)]


def evaluate(
    breaker: Breaker, config: BreakerConfig, outcome: Outcome, now: float, cause: str | None
) -> list[BreakerStateChanged]:
    """After ``outcome`` is applied: does the breaker trip or close?"""
    if breaker.forced:
        return []
    if breaker.state == HALF_OPEN:
        if not outcome.success or outcome.slow:
            what = "failed" if not outcome.success else f"was slow (> {config.slow_call_duration_threshold:g} ms)"
            return [_open(breaker, config, now, "trial_failed", f"a half-open trial {what}", cause)]
        if breaker.consecutive_successes >= config.success_threshold:
            return [
                transition(
                    breaker, CLOSED, now, "success_threshold",
                    f"{breaker.consecutive_successes} consecutive successes (success_threshold {config.success_threshold})",
                    cause,
                )
            ]  # fmt: skip
        return []
    if breaker.state != CLOSED:
        return []
    if breaker.consecutive_failures >= config.failure_threshold:
        reason = f"{breaker.consecutive_failures} consecutive failures (failure_threshold {config.failure_threshold})"
        return [_open(breaker, config, now, "failure_threshold", reason, cause)]
    if breaker.window is None:
        return []
    calls, failures, slow = breaker.window.counts(now)
    if calls < config.minimum_number_of_calls:
        return []
    if config.failure_rate_threshold is not None and failures * 100 >= config.failure_rate_threshold * calls:
        reason = (
            f"failure rate {failures * 100 / calls:.1f}% of {calls} calls "
            f"(failure_rate_threshold {config.failure_rate_threshold:g}%)"
        )
        return [_open(breaker, config, now, "failure_rate", reason, cause)]
    if config.slow_call_duration_threshold is not None and slow * 100 >= config.slow_call_rate_threshold * calls:
        reason = (
            f"slow call rate {slow * 100 / calls:.1f}% of {calls} calls over "
            f"{config.slow_call_duration_threshold:g} ms (slow_call_rate_threshold {config.slow_call_rate_threshold:g}%)"
        )
        return [_open(breaker, config, now, "slow_call_rate", reason, cause)]
    return []


def allow(
    breaker: Breaker, config: BreakerConfig, now: float
) -> tuple[bool, list[BreakerStateChanged | BreakerTrialAdmitted]]:
    """The seed's ``should_allow_request``, with the half-open cap it never enforced."""
    if breaker.state == CLOSED:
        return True, []
    events: list[BreakerStateChanged | BreakerTrialAdmitted] = []
    admitted = breaker.test_request_count
    generation = breaker.generation
    if breaker.state == OPEN:
        if breaker.forced or breaker.retry_at is None or now < breaker.retry_at:
            return False, []
        events.append(_half_open(breaker, config, now))
        admitted, generation = 0, generation + 1
    if admitted >= config.max_test_requests:
        return False, events
    trial = admitted + 1
    events.append(
        BreakerTrialAdmitted(
            event_id=derived_event_id("trial", breaker.app_name, breaker.instance_id, generation, trial),
            emitted_at=now,
            app_name=breaker.app_name,
            instance_id=breaker.instance_id,
            generation=generation,
            trial=trial,
            timestamp=now,
        )
    )
    return True, events


def tick(breaker: Breaker, config: BreakerConfig, now: float) -> list[BreakerStateChanged]:
    """Transitions that time alone causes."""
    if breaker.forced:
        return []
    if breaker.state == OPEN and breaker.retry_at is not None and now >= breaker.retry_at:
        return [_half_open(breaker, config, now)]
    if (
        breaker.state == HALF_OPEN
        and breaker.test_request_count >= config.max_test_requests
        and now - breaker.last_activity_at >= config.recovery_timeout
    ):
        reason = f"no trial outcome within recovery_timeout {config.recovery_timeout:g}s"
        return [_open(breaker, config, now, "half_open_timeout", reason, None)]
    return []


def due_at(breaker: Breaker, config: BreakerConfig) -> float | None:
    """When ``tick`` may next have something to do for this breaker."""
    if breaker.forced:
        return None
    if breaker.state == OPEN:
        return breaker.retry_at
    if breaker.state == HALF_OPEN:
        return breaker.last_activity_at + config.recovery_timeout
    return None


def override(
    breaker: Breaker, config: BreakerConfig, action: OverrideAction, now: float, by: str, cause: str
) -> list[BreakerStateChanged]:
    """``open`` holds it open and ``close`` holds it closed, until another override;
    ``reset`` returns it to automatic operation, closed, with every count cleared."""
    who = f" by {by}" if by else ""
    if action == "open":
        return [transition(breaker, OPEN, now, "manual", f"held open{who}", cause, forced=True)]
    if action == "close":
        return [transition(breaker, CLOSED, now, "manual", f"held closed{who}", cause, forced=True)]
    return [transition(breaker, CLOSED, now, "manual", f"reset{who}", cause)]


def transition(
    breaker: Breaker,
    state: str,
    now: float,
    trigger: str,
    reason: str,
    cause: str | None,
    *,
    forced: bool = False,
    retry_at: float | None = None,
) -> BreakerStateChanged:
    generation = breaker.generation + 1
    return BreakerStateChanged(
        event_id=derived_event_id(cause or trigger, breaker.app_name, breaker.instance_id, generation, state),
        emitted_at=now,
        app_name=breaker.app_name,
        instance_id=breaker.instance_id,
        state=state,  # type: ignore[arg-type]
        previous_state=breaker.state,  # type: ignore[arg-type]
        consecutive_failures=breaker.consecutive_failures,
        consecutive_successes=breaker.consecutive_successes,
        reason=reason,
        timestamp=now,
        generation=generation,
        forced=forced,
        retry_at=retry_at,
        trigger=trigger,
        cause_event_id=cause,
    )


def _open(breaker: Breaker, config: BreakerConfig, now: float, trigger: str, reason: str, cause: str | None):
    retry_at = now + config.recovery_timeout
    return transition(breaker, OPEN, now, trigger, reason, cause, retry_at=retry_at)


def _half_open(breaker: Breaker, config: BreakerConfig, now: float) -> BreakerStateChanged:
    reason = f"recovery_timeout {config.recovery_timeout:g}s elapsed; admitting {config.max_test_requests} trials"
    return transition(breaker, HALF_OPEN, now, "recovery_timeout", reason, None)


def ensure_window(breaker: Breaker, config: BreakerConfig) -> None:
    """A closed breaker keeps a window only when a rate rule needs one; a changed window
    type or size starts a new one."""
    if not uses_window(config):
        breaker.window = breaker.window_spec = None
        return
    spec = (config.sliding_window_type, config.sliding_window_size)
    if breaker.window_spec != spec:
        breaker.window = new_window(*spec)
        breaker.window_spec = spec
