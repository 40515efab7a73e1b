"""Decisions on a ``FailureDetected`` or a ``HealthChanged``, and the events recording
what was done. Pure: state in, time in, a plan or an event out.

Rules, in order (each configurable per app under ``recovery:``):

1. Stale or repeated input does nothing: a failure already acted on, one older than the
   instance's last remediation or its return to health, a panic announcement.
2. Probe failures act once the app's ``failure_threshold`` is reached (what the detector
   calls unhealthy); a container that died, was OOM-killed or ran hot acts at once.
3. Traffic steps first (remove from the LB, drain), capped by ``max_ejection_percent``
   (at least one instance, never the last healthy one) and suspended in panic mode
   (more than ``panic_threshold_percent`` of the app unhealthy).
4. Then one remediation: the first rung of the ladder at or above the instance's
   escalation level whose budget allows it. Restarts: ``max_restarts`` per
   ``restart_window_seconds`` (the seed's 3 in 5 minutes). Recreate and replace: once per
   level, then the level moves up. Scale out: once per window (the seed's rule).
   The ladder ends where the instance's runtime does (``AppPolicy.capabilities``): past
   it, the remediations the runtime has are repeated under the same budgets and backoff
   (a crash-looping local process is restarted for ever, as kubelet does), and the
   attempt records ``chain_end`` saying so, rather than trying what cannot work.
5. Not before the backoff allows (Kubernetes: 10 s doubling to 300 s, reset after 10
   minutes healthy), nor past the global ``max_actions_per_minute``: then it is deferred.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from autoserve_config import RecoveryConfig
from autoserve_events import (
    Event,
    FailureDetected,
    FailureType,
    HealthChanged,
    RecoveryExecuted,
    RecoveryStrategy,
    derived_event_id,
)

from .state import InstanceState, RecoveryState
from .strategies import (
    LADDER,
    REMEDIATION,
    TRAFFIC,
    Capabilities,
    rank,
    remediation_ladder,
    strategy_map,
    traffic_steps,
)

S = RecoveryStrategy
# Failures that are not probe results: acting on them must not wait for probe thresholds.
IMMEDIATE = frozenset(
    {
        FailureType.CONTAINER_STOPPED,
        FailureType.CONTAINER_OOM_KILLED,
        FailureType.CONTAINER_RESTART_LOOP,
        FailureType.HIGH_RESOURCE_USAGE,
    }
)
RATE_WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class AppPolicy:
    """What the core needs to know about one app."""

    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    failure_threshold: int = 1
    max_replicas: int = 5
    capabilities: Capabilities | None = None  # of the failing instance's runtime; None: all

    def for_runtime(self, runtime: object) -> AppPolicy:
        """This policy for an instance of ``runtime``: its ladder ends where the runtime's
        ``capabilities`` do (a runtime that declares none can do every rung)."""
        caps = getattr(runtime, "capabilities", None)
        return replace(self, capabilities=caps) if isinstance(caps, Capabilities) else self

    @property
    def strategies(self) -> dict[FailureType, tuple[RecoveryStrategy, ...]]:
        return strategy_map(self.recovery.strategies)


@dataclass(frozen=True)
class Limits:
    """Service-wide bounds (not per app)."""

    max_actions_per_minute: int = 30


@dataclass(frozen=True)
class Plan:
    traffic: tuple[RecoveryStrategy, ...] = ()
    remediation: RecoveryStrategy | None = None
    retry_at: float | None = None  # the remediation is due then (backoff or rate limit)
    notes: tuple[str, ...] = ()  # why something listed was not done

    @property
    def empty(self) -> bool:
        return not self.traffic and self.remediation is None and self.retry_at is None


def panic(state: RecoveryState, app_name: str, policy: AppPolicy) -> bool:
    return state.unhealthy_share_over(app_name, policy.recovery.panic_threshold_percent)


def ejection_allowed(state: RecoveryState, failure: FailureDetected, policy: AppPolicy) -> str | None:
    """None if the instance may leave the LB, else why not."""
    app = failure.app_name
    total, unhealthy = state.counts(app)
    if panic(state, app, policy):
        return f"panic mode: {unhealthy} of {total} instances unhealthy; not ejecting"
    ejected = state.ejected(app)
    cap = max(1, int(max(total, 1) * policy.recovery.max_ejection_percent / 100))
    if len(ejected) >= cap:
        return f"ejection cap: {len(ejected)} of {total} already out (max_ejection_percent {policy.recovery.max_ejection_percent:g})"
    target = state.instance(app, failure.instance_id)
    others_serving = [
        iid
        for iid, healthy in state.health.get(app, {}).items()
        if healthy and state.instance(app, iid) is not target and not state.instance(app, iid).ejected
    ]
    if total > 0 and not others_serving:
        return "would remove the last healthy instance"
    return None


def _backoff_reset(inst: InstanceState, policy: AppPolicy, now: float) -> bool:
    """Healthy for ``backoff_reset_seconds``: budgets start over, as kubelet's do."""
    return bool(
        inst.healthy
        and inst.healthy_since is not None
        and now - inst.healthy_since >= policy.recovery.backoff_reset_seconds
    )


def _budget(
    inst: InstanceState,
    strategy: RecoveryStrategy,
    failure: FailureDetected,
    policy: AppPolicy,
    now: float,
    escalated: bool,
) -> str | None:
    """None if ``strategy`` may run now, else why not."""
    rec = policy.recovery
    window = [a for a in inst.attempts if a.started_at > now - rec.restart_window_seconds]
    if strategy in (S.RESTART_CONTAINER, S.ROLLING_RESTART):
        restarts = sum(1 for a in window if a.strategy is strategy)
        if restarts >= rec.max_restarts:
            return (
                f"{strategy}: {restarts} in the last {rec.restart_window_seconds:g}s (max_restarts {rec.max_restarts})"
            )
    elif strategy is S.SCALE_OUT:
        if any(a.strategy is S.SCALE_OUT for a in window):
            return f"scale_out: already scaled out in the last {rec.restart_window_seconds:g}s"
        if failure.consecutive_count < 2 and not escalated:
            return "scale_out: needs at least 2 consecutive failures (the seed's rule)"
    return None


def _remediation(
    inst: InstanceState, failure: FailureDetected, policy: AppPolicy, now: float
) -> tuple[RecoveryStrategy | None, list[str]]:
    listed = policy.strategies.get(failure.failure_type, ())
    ladder = remediation_ladder(listed, policy.recovery.escalate, policy.capabilities)
    level = 0 if _backoff_reset(inst, policy, now) else inst.level
    notes: list[str] = []
    explicit = set(listed)
    ordered = [s for s in ladder if rank(s) >= level] + [s for s in ladder if rank(s) < level]  # wrap when all used
    for strategy in ordered:
        why = _budget(inst, strategy, failure, policy, now, strategy not in explicit)
        if why is None:
            return strategy, notes
        notes.append(why)
    return None, notes or ([] if ladder else [f"no remediation mapped for {failure.failure_type}"])


def decide(state: RecoveryState, failure: FailureDetected, policy: AppPolicy, limits: Limits, now: float) -> Plan:
    if failure.details.get("panic") is not None:
        return Plan(notes=("a panic announcement, not a failure",))
    if not policy.recovery.enabled:
        return Plan(notes=("recovery disabled for this app",))
    if (failure.app_name, failure.instance_id) in state.removed:
        return Plan(notes=("the instance was replaced by recovery",))
    inst = state.instance(failure.app_name, failure.instance_id)
    if failure.timestamp < inst.last_remediation_end:
        return Plan(notes=("older than the instance's last remediation",))
    if inst.healthy and inst.healthy_since is not None and failure.timestamp < inst.healthy_since:
        return Plan(notes=("the instance is healthy again since",))
    if failure.failure_type not in IMMEDIATE and failure.consecutive_count < policy.failure_threshold:
        return Plan(notes=(f"{failure.consecutive_count} of failure_threshold {policy.failure_threshold} failures",))
    listed = policy.strategies.get(failure.failure_type, ())
    notes: list[str] = []
    traffic: list[RecoveryStrategy] = []
    if not inst.ejected:
        for strategy in traffic_steps(listed):
            if state.is_done(failure.event_id, strategy, failure.instance_id):
                continue
            why = ejection_allowed(state, failure, policy)
            if why is None:
                traffic.append(strategy)
                break  # one way out of the LB is enough
            notes.append(why)
    remediation, why_not = _remediation(inst, failure, policy, now)
    notes += why_not
    if remediation is None or state.is_done(failure.event_id, remediation, failure.instance_id):
        return Plan(tuple(traffic), None, None, tuple(notes))
    due = 0.0 if _backoff_reset(inst, policy, now) else inst.next_allowed_at
    recent = [t for t in state.actions if t > now - RATE_WINDOW_SECONDS]
    if len(recent) >= limits.max_actions_per_minute:
        due = max(due, recent[-limits.max_actions_per_minute] + RATE_WINDOW_SECONDS)
        notes.append(f"global rate limit: {len(recent)} actions in the last minute")
    if due > now:
        return Plan(tuple(traffic), None, due, (*notes, f"backoff: next remediation at {due:.3f}"))
    return Plan(tuple(traffic), remediation, None, tuple(notes))


def backoff_delay(level: int, policy: AppPolicy) -> float:
    """Delay after the ``level``-th remediation: 10 s, 20 s, 40 s, … up to 300 s."""
    rec = policy.recovery
    if level <= 0:
        return 0.0
    return min(rec.backoff_initial_seconds * 2 ** (level - 1), rec.backoff_max_seconds)


def record(
    state: RecoveryState,
    policy: AppPolicy,
    cause: FailureDetected | HealthChanged,
    strategy: RecoveryStrategy,
    *,
    success: bool,
    started_at: float,
    duration_ms: float,
    error: str | None = None,
    details: Mapping[str, object] | None = None,
    operation: str | None = None,
    instance_id: str | None = None,
) -> RecoveryExecuted:
    """The event for one action tried. For a remediation, ``details`` also carries the
    escalation level and backoff it leaves behind, so the fold replays them exactly.
    ``instance_id``: a traffic action on another instance than the cause's (a panic
    restores every ejected instance on one health change)."""
    target = instance_id or cause.instance_id
    extra: dict[str, object] = dict(details or {})
    if operation:
        extra["operation"] = operation
    if strategy not in TRAFFIC:
        inst = state.instance(cause.app_name, cause.instance_id)
        reset = _backoff_reset(inst, policy, started_at)
        level = 0 if reset else inst.level
        backoff_level = (0 if reset else inst.backoff_level) + 1
        ended = started_at + duration_ms / 1000
        restarts_left = _budget_after(inst, strategy, policy, started_at)
        next_level = level if (strategy is S.RESTART_CONTAINER and success and restarts_left) else rank(strategy) + 1
        extra |= {
            "level": min(max(level, next_level), len(LADDER)),
            "backoff_level": backoff_level,
            "next_allowed_at": ended + backoff_delay(backoff_level, policy),
            "lineage": inst.lineage,
        }
        if isinstance(cause, FailureDetected):
            extra |= _chain_end(inst, cause, policy, strategy, started_at)
    failure_type = cause.failure_type if isinstance(cause, FailureDetected) else None
    parts = (cause.event_id, operation or strategy) + ((target,) if target != cause.instance_id else ())
    return RecoveryExecuted(
        event_id=derived_event_id(*parts),
        strategy=strategy,
        failure_type=failure_type,
        instance_id=target,
        app_name=cause.app_name,
        success=success,
        timestamp=started_at,
        duration_ms=round(duration_ms, 3),
        details=extra,
        error=error,
        failure_event_id=cause.event_id,
    )


def _chain_end(
    inst: InstanceState, cause: FailureDetected, policy: AppPolicy, strategy: RecoveryStrategy, now: float
) -> dict[str, object]:
    """Where the escalation would have gone past what the runtime can do, say so: the
    attempt repeats a remediation the runtime has instead (an operator reading the event
    sees why there is no replace or scale out, and that it is on purpose)."""
    caps = policy.capabilities
    if caps is None:
        return {}
    wanted, _ = _remediation(inst, cause, replace(policy, capabilities=None), now)
    if wanted is None or wanted is strategy or wanted in caps.remediations:
        return {}
    can = ", ".join(sorted(str(s) for s in caps.remediations & REMEDIATION))
    return {
        "chain_end": f"escalation ends at the {caps.runtime} runtime's limit: it cannot {wanted} "
        f"(it can {can}); {strategy} again instead, under the same budgets and backoff",
        "escalation_wanted": str(wanted),
    }


def _budget_after(inst: InstanceState, strategy: RecoveryStrategy, policy: AppPolicy, now: float) -> bool:
    """Whether the restart budget has room left after this attempt."""
    rec = policy.recovery
    used = sum(1 for a in inst.attempts if a.strategy is strategy and a.started_at > now - rec.restart_window_seconds)
    return used + 1 < rec.max_restarts


def restore_plan(state: RecoveryState, event: HealthChanged) -> bool:
    """A healthy instance that is out of the LB goes back in (the seed never did this)."""
    if not event.healthy or state.is_done(event.event_id, "restore", event.instance_id):
        return False
    return state.instance(event.app_name, event.instance_id).ejected


def panic_restores(state: RecoveryState, event: HealthChanged, policy: AppPolicy) -> tuple[str, ...]:
    """In panic mode the instances already out of the LB go back in: with most of the app
    failing, the few left would take all the load, and a health signal that fails almost
    everywhere is more likely wrong than the instances (Envoy's panic routing sends to all
    hosts). Returns the instance ids to restore; an instance still failing after the panic
    is ejected again by its next failure."""
    if not panic(state, event.app_name, policy):
        return ()
    return tuple(
        inst.current_id or inst.lineage
        for inst in state.ejected(event.app_name)
        if not state.is_done(event.event_id, "restore", inst.current_id or inst.lineage)
    )


def rolling_member(
    cause: FailureDetected,
    instance_id: str,
    *,
    started_at: float,
    duration_ms: float,
    details: Mapping[str, object],
    error: str | None = None,
) -> RecoveryExecuted:
    """One instance restarted by a rolling restart that another instance's failure caused:
    recorded (and stored) before its instance lease is released, so a failure reported
    for it during the restart (its own death) is seen as handled, not restarted again.
    A member that failed (``error``) is recorded too: its death was ours all the same."""
    return RecoveryExecuted(
        event_id=derived_event_id(cause.event_id, S.ROLLING_RESTART, instance_id),
        strategy=S.ROLLING_RESTART,
        failure_type=cause.failure_type,
        instance_id=instance_id,
        app_name=cause.app_name,
        success=error is None,
        timestamp=started_at,
        duration_ms=round(duration_ms, 3),
        details={**details, "member_of": cause.instance_id},
        error=error,
        failure_event_id=cause.event_id,
    )


def left_out(
    cause: FailureDetected, instance_id: str, *, at: float, details: Mapping[str, object], reason: str
) -> RecoveryExecuted:
    """A member a failed rolling restart took out of the LB and leaves out (it does not
    answer): recorded as an ejection, so the fold counts it (ejection cap, panic) and the
    normal restore (``restore_plan`` on ``HealthChanged(healthy)``) puts it back. Its own
    id: the cause may already have a ``remove_from_lb`` of its own."""
    return RecoveryExecuted(
        event_id=derived_event_id(cause.event_id, S.ROLLING_RESTART, "left_out", instance_id),
        strategy=S.REMOVE_FROM_LB,
        failure_type=cause.failure_type,
        instance_id=instance_id,
        app_name=cause.app_name,
        success=True,
        timestamp=at,
        duration_ms=0.0,
        details={**details, "left_out_by": str(S.ROLLING_RESTART), "reason": reason[:500]},
        failure_event_id=cause.event_id,
    )


def panic_announcement(state: RecoveryState, event: HealthChanged, policy: AppPolicy) -> Event | None:
    """A critical ``FailureDetected`` when the app enters panic mode (and one, not
    critical, when it leaves). Its id derives from the health change, so every replica
    publishes the same event and JetStream keeps one."""
    now_panic = panic(state, event.app_name, policy)
    if now_panic == state.panic_announced.get(event.app_name, False):
        return None
    total, unhealthy = state.counts(event.app_name)
    word = "entered" if now_panic else "left"
    return FailureDetected(
        event_id=derived_event_id(event.event_id, "panic", now_panic),
        failure_type=FailureType.HEALTH_CHECK_FAILED,
        instance_id=event.instance_id,
        app_name=event.app_name,
        severity="critical" if now_panic else "low",
        message=f"{event.app_name} {word} panic mode: {unhealthy} of {total} instances unhealthy "
        f"(panic_threshold_percent {policy.recovery.panic_threshold_percent:g}); "
        + ("ejection stopped, remediation continues" if now_panic else "ejection resumes"),
        timestamp=event.timestamp,
        details={"panic": now_panic, "unhealthy": unhealthy, "instances": total},
        is_critical=now_panic,
        cause_event_id=event.event_id,
    )
