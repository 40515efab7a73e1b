"""Alerts and groups: the part of the fold that says what fires, and who hears of it.

Inputs (failures, health verdicts, breakers, recoveries, acknowledgements) become
``AlertChanged`` events; an ``AlertChanged`` folded here creates, acknowledges or resolves an
alert, and a new alert joins the group of each route that takes it. What is sent when is
``notify.py``'s; what holds an alert back is ``suppression.py``'s.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TypeVar

from autoserve_config import AlertingConfig, AppSpec, parse_duration
from autoserve_events import (
    AlertAcknowledged,
    AlertChanged,
    AlertStatus,
    BreakerStateChanged,
    Event,
    FailureDetected,
    FailureType,
    HealthChanged,
    RecoveryExecuted,
    derived_event_id,
)
from autoserve_events.catalogue import Severity

from .routing import Route, compile_routes, group_key, group_labels

K = TypeVar("K")
BREAKER_OPEN = "circuit_breaker_open"
ACTIVE: tuple[AlertStatus, ...] = ("firing", "acknowledged")
SEVERITY_RANK: dict[Severity, int] = {"low": 0, "medium": 1, "high": 2, "critical": 3}
# Failures that are already a verdict (a crossing, a dead container): they fire at once.
# Any other failure fires once the detector says the instance is unhealthy (its
# failure_threshold), so one slow probe is not a page.
FIRE_AT_ONCE = frozenset(
    {
        FailureType.HIGH_ERROR_RATE,
        FailureType.CONTAINER_STOPPED,
        FailureType.CONTAINER_OOM_KILLED,
        FailureType.CONTAINER_RESTART_LOOP,
        FailureType.APPLICATION_STARTUP_FAILED,
        FailureType.APPLICATION_DEADLOCK,
        FailureType.APPLICATION_MEMORY_LEAK,
    }
)


def fingerprint(app: str, instance: str, failure_type: str) -> str:
    return derived_event_id("alert", app, instance, failure_type)[:16]


@dataclass
class AlertView:
    """An alert as a notification shows it. ``AlertView.of(alert)`` is a snapshot, which
    nothing changes afterwards; ``Alert`` adds the fold's bookkeeping to these fields."""

    alert_id: str
    fingerprint: str
    app: str
    instance: str
    failure_type: str
    severity: Severity
    message: str
    labels: dict[str, str]
    starts_at: float
    status: AlertStatus = "firing"
    ends_at: float | None = None
    acknowledged_by: str | None = None
    recovery: str = ""

    @staticmethod
    def of(alert: AlertView) -> AlertView:
        shown = {f.name: getattr(alert, f.name) for f in fields(AlertView)}
        return AlertView(**{**shown, "labels": dict(alert.labels)})


@dataclass(kw_only=True)
class Alert(AlertView):
    last_seen: float
    cause_event_id: str | None = None
    groups: set[str] = field(default_factory=set)
    escalated: set[tuple[str, int, str]] = field(default_factory=set)  # (group, tier, receiver)


@dataclass
class Group:
    key: str
    route: Route
    receiver: str
    labels: dict[str, str]
    created_at: float
    next_flush: float
    alerts: dict[str, None] = field(default_factory=dict)  # ordered set
    seq: int = 0
    sent_firing: frozenset[str] = frozenset()
    sent_at: float | None = None
    notified: set[str] = field(default_factory=set)  # sent as firing, so a resolve is sent too
    suppressed: dict[str, str] = field(default_factory=dict)  # recorded: alert_id -> why
    tier_seq: dict[tuple[int, str], int] = field(default_factory=dict)
    # (tier, receiver) -> when a failed escalation is decided again (group_interval later)
    tier_retry_at: dict[tuple[int, str], float] = field(default_factory=dict)
    # (tier, receiver) -> alert_id -> why: escalations due but held back (recorded), sent once
    # the hold ends if the alert still fires unacknowledged
    tier_held: dict[tuple[int, str], dict[str, str]] = field(default_factory=dict)


def _discard(index: dict[K, set[str]], key: K, alert_id: str) -> None:
    index[key].discard(alert_id)
    if not index[key]:
        del index[key]


class AlertBook:
    """The alerts, their groups and what the inputs say of each instance.

    ``pinned(alert_id)``: a resolved alert still needed elsewhere (an Alertmanager receiver
    not yet told of its resolve) is kept until it is not."""

    def __init__(self, pinned: Callable[[str], bool]) -> None:
        self.alerts: dict[str, Alert] = {}
        self.groups: dict[str, Group] = {}
        self._pinned = pinned
        self._active: dict[str, str] = {}  # fingerprint -> alert_id
        self._by_instance: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._by_app: dict[str, set[str]] = defaultdict(set)
        # Per-instance memory; container ids change on every recreate, so ``prune`` drops
        # what is older than ``history`` (and instances of apps no longer configured).
        self.resolved_at: dict[str, float] = {}  # fingerprint -> last resolve: late failures ignored
        self.unhealthy: dict[tuple[str, str], float] = {}  # (app, instance) -> last sign of it failing
        self.pending: dict[tuple[str, str], dict[str, FailureDetected]] = {}
        self.app_labels: dict[str, dict[str, str]] = {}

    def configure(self, config: AlertingConfig) -> None:
        self.route = compile_routes(config)
        self.resolve_timeout = parse_duration(config.resolve_timeout)
        self.history = parse_duration(config.history)

    def set_apps(self, apps: dict[str, AppSpec]) -> None:
        self.app_labels = {name: dict(spec.labels) for name, spec in apps.items()}

    def active_in(self, app: str) -> set[str]:
        """The ids of ``app``'s active alerts."""
        return self._by_app.get(app, set())

    # -- folding an AlertChanged -------------------------------------------------------------

    def apply(self, c: AlertChanged) -> Alert | None:
        """Fold one change; the alert, if this resolved it."""
        alert = self.alerts.get(c.alert_id)
        if c.status == "firing" and alert is None:
            alert = Alert(
                c.alert_id, c.fingerprint or fingerprint(c.app_name, c.instance_id, c.failure_type), c.app_name,
                c.instance_id, c.failure_type, c.severity, c.message, dict(c.labels), c.starts_at,
                last_seen=c.timestamp, cause_event_id=c.cause_event_id,
            )  # fmt: skip
            self.alerts[c.alert_id] = alert
            self._active[alert.fingerprint] = alert.alert_id
            self._by_instance[(alert.app, alert.instance)].add(alert.alert_id)
            self._by_app[alert.app].add(alert.alert_id)
            self._join_groups(alert, c.timestamp)
            return None
        if alert is None or alert.status == "resolved":
            return None
        if c.status == "acknowledged":
            alert.status, alert.acknowledged_by = "acknowledged", c.acknowledged_by
            return None
        if c.status != "resolved":
            return None
        alert.status, alert.ends_at = "resolved", c.ends_at if c.ends_at is not None else c.timestamp
        self._active.pop(alert.fingerprint, None)
        self.resolved_at[alert.fingerprint] = alert.ends_at
        _discard(self._by_instance, (alert.app, alert.instance), alert.alert_id)
        _discard(self._by_app, alert.app, alert.alert_id)
        self.forget_if_done(alert)
        return alert

    def _join_groups(self, alert: Alert, now: float) -> None:
        for route in self.route.route(alert.labels):
            if route.receiver is None:
                continue  # no receiver configured: the alert is tracked, nobody is notified
            key = group_key(route, alert.labels)
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = Group(
                    key, route, route.receiver, group_labels(route, alert.labels), now, now + route.group_wait
                )
            group.alerts[alert.alert_id] = None
            alert.groups.add(key)

    def leave_group(self, group: Group, alert_id: str) -> None:
        group.alerts.pop(alert_id, None)
        group.notified.discard(alert_id)
        group.suppressed.pop(alert_id, None)
        for held in group.tier_held.values():
            held.pop(alert_id, None)
        alert = self.alerts.get(alert_id)
        if alert is not None:
            alert.groups.discard(group.key)
            self.forget_if_done(alert)

    def forget_if_done(self, alert: Alert) -> None:
        if alert.status == "resolved" and not alert.groups and not self._pinned(alert.alert_id):
            self.alerts.pop(alert.alert_id, None)

    # -- inputs ------------------------------------------------------------------------------

    def on_failure(self, e: FailureDetected) -> list[Event]:
        ft = str(e.failure_type)
        fp = fingerprint(e.app_name, e.instance_id, ft)
        key = (e.app_name, e.instance_id)
        if key in self.unhealthy:
            self.unhealthy[key] = max(self.unhealthy[key], e.timestamp)  # still failing: still present
        active = self._active.get(fp)
        if active is not None:
            alert = self.alerts[active]
            alert.last_seen = max(alert.last_seen, e.timestamp)
            alert.message = e.message
            return []
        if e.timestamp <= self.resolved_at.get(fp, float("-inf")):
            return []  # older than the resolve: a late copy, not a new episode
        if e.is_critical or SEVERITY_RANK[e.severity] >= 2 or e.failure_type in FIRE_AT_ONCE:
            reason = f"{e.severity} {ft}"
        elif key in self.unhealthy:
            reason = f"{ft} on an unhealthy instance"
        else:
            self.pending.setdefault(key, {})[ft] = e  # fires if the instance turns unhealthy
            return []
        return [self._fire(e.app_name, e.instance_id, ft, e.severity, e.message, e.timestamp, e.event_id, reason)]

    def on_health(self, e: HealthChanged) -> list[Event]:
        key = (e.app_name, e.instance_id)
        if e.healthy:
            self.unhealthy.pop(key, None)
            self.pending.pop(key, None)
            alerts = [self.alerts[i] for i in sorted(self._by_instance.get(key, ()))]
            return [
                self._resolve(a, e.timestamp, f"instance healthy again: {e.reason}")
                for a in alerts
                if a.failure_type != BREAKER_OPEN and a.starts_at <= e.timestamp
            ]
        self.unhealthy[key] = max(self.unhealthy.get(key, e.timestamp), e.timestamp)
        out: list[Event] = []
        for ft, failure in sorted(self.pending.pop(key, {}).items()):
            if e.timestamp - failure.timestamp <= self.resolve_timeout and fingerprint(*key, ft) not in self._active:
                reason = f"instance unhealthy: {e.reason}"
                out.append(self._fire(*key, ft, failure.severity, failure.message, failure.timestamp,
                                      failure.event_id, reason))  # fmt: skip
        return out

    def on_breaker(self, e: BreakerStateChanged) -> list[Event]:
        fp = fingerprint(e.app_name, e.instance_id, BREAKER_OPEN)
        active = self._active.get(fp)
        if e.state == "open" and active is None:
            message = f"circuit breaker open: {e.reason}"
            return [self._fire(e.app_name, e.instance_id, BREAKER_OPEN, "high", message, e.timestamp, e.event_id,
                               f"breaker {e.previous_state} -> open")]  # fmt: skip
        if e.state == "closed" and active is not None:
            return [self._resolve(self.alerts[active], e.timestamp, f"circuit breaker closed: {e.reason}")]
        return []

    def on_recovery(self, e: RecoveryExecuted) -> None:
        outcome = "succeeded" if e.success else f"failed: {e.error or 'unknown error'}"
        for alert_id in self._by_instance.get((e.app_name, e.instance_id), ()):
            self.alerts[alert_id].recovery = f"{e.strategy} {outcome}"

    def on_ack(self, e: AlertAcknowledged) -> list[Event]:
        alert = self.alerts.get(e.alert_id)
        if alert is None or alert.status != "firing":
            return []
        reason = f"acknowledged by {e.acknowledged_by}" + (f": {e.comment}" if e.comment else "")
        return [self._change(alert, "acknowledged", e.timestamp, reason, derived_event_id(e.event_id, "ack"),
                             by=e.acknowledged_by)]  # fmt: skip

    # -- time ----------------------------------------------------------------------------------

    def expire(self, now: float, emit: Callable[[Event], None]) -> None:
        """Resolve the alerts no failure re-reported for ``resolve_timeout`` (a breaker's
        alert waits for the breaker to close)."""
        for alert in list(self.alerts.values()):
            if (
                alert.status in ACTIVE
                and alert.failure_type != BREAKER_OPEN
                and now - alert.last_seen >= self.resolve_timeout
            ):
                emit(self._resolve(alert, now, f"no {alert.failure_type} reported for {self.resolve_timeout:g}s"))

    def expiries(self) -> list[float]:
        """When each active alert resolves unless a failure re-reports it."""
        return [
            a.last_seen + self.resolve_timeout
            for a in self.alerts.values()
            if a.status in ACTIVE and a.failure_type != BREAKER_OPEN
        ]

    def prune(self, now: float) -> None:
        """Drop per-instance memory older than ``history``: a resolve time nothing late can
        still hit, the unhealthy mark of an instance that stopped reporting (a recreated
        container has a new id), failures that never fired; and keys of removed apps."""
        horizon = now - self.history

        def gone(app: str) -> bool:
            return bool(self.app_labels) and app not in self.app_labels

        for fp in [fp for fp, at in self.resolved_at.items() if at < horizon]:
            del self.resolved_at[fp]
        for key in [
            k for k, at in self.unhealthy.items() if gone(k[0]) or (at < horizon and k not in self._by_instance)
        ]:
            del self.unhealthy[key]
        for key, failures in list(self.pending.items()):
            for ft in [ft for ft, f in failures.items() if f.timestamp < horizon]:
                del failures[ft]
            if not failures or gone(key[0]):
                del self.pending[key]

    # -- the events it decides -------------------------------------------------------------------

    def _fire(self, app: str, instance: str, failure_type: str, severity: Severity, message: str, ts: float,
              cause: str, reason: str) -> AlertChanged:  # fmt: skip
        fp = fingerprint(app, instance, failure_type)
        own = {"app": app, "instance": instance, "severity": severity, "failure_type": failure_type}
        return AlertChanged(
            event_id=derived_event_id(cause, "alert", failure_type),
            alert_id=derived_event_id(fp, cause)[:12],
            app_name=app,
            instance_id=instance,
            status="firing",
            previous_status=None,
            failure_type=failure_type,
            severity=severity,
            message=message,
            timestamp=ts,
            starts_at=ts,
            labels={**self.app_labels.get(app, {}), **own},
            fingerprint=fp,
            reason=reason,
            cause_event_id=cause,
        )

    def _change(self, alert: Alert, status: AlertStatus, ts: float, reason: str, event_id: str,
                by: str | None = None) -> AlertChanged:  # fmt: skip
        return AlertChanged(
            event_id=event_id,
            alert_id=alert.alert_id,
            app_name=alert.app,
            instance_id=alert.instance,
            status=status,
            previous_status=alert.status,
            failure_type=alert.failure_type,
            severity=alert.severity,
            message=alert.message,
            timestamp=ts,
            starts_at=alert.starts_at,
            ends_at=ts if status == "resolved" else None,
            labels=alert.labels,
            fingerprint=alert.fingerprint,
            reason=reason,
            acknowledged_by=by if by is not None else alert.acknowledged_by,
            cause_event_id=alert.cause_event_id,
        )

    def _resolve(self, alert: Alert, ts: float, reason: str) -> AlertChanged:
        return self._change(alert, "resolved", ts, reason, derived_event_id(alert.alert_id, "resolved"))
