"""The alerter's core: alerts, groups, the notification log and silences as a fold over
events, and the decisions taken on it. No I/O, no asyncio; time comes in.

- ``handle(event)`` folds one event from the stream and returns the events it causes (an
  ``AlertChanged`` when a failure fires an alert, say). Those are folded at once too, and
  folding an event twice is a no-op (its id is remembered), so when the alerter's own
  events come back from the stream, or are replayed after a restart, nothing changes twice.
- ``tick(now)`` takes the timed decisions: alerts resolved by ``resolve_timeout``,
  maintenance windows that began, group flushes (``group_wait``, ``group_interval``,
  ``repeat_interval``) and escalations. It returns events to publish and notifications to
  deliver; a delivered notification comes back through ``delivered`` as a
  ``NotificationLogged``, the notification log entry that makes the fold know it was sent.

Ids are derived from what caused them (``derived_event_id``): the same history gives the
same alerts, the same notification ids, and JetStream drops a re-published duplicate.
"""

from __future__ import annotations

import json
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from autoserve_config import AlertingConfig, AppSpec, parse_cron, parse_duration
from autoserve_config.cron import Cron
from autoserve_events import (
    AlertAcknowledged,
    AlertChanged,
    AlertStatus,
    BreakerStateChanged,
    Event,
    FailureDetected,
    FailureType,
    HealthChanged,
    NotificationLogged,
    RecoveryExecuted,
    SilenceCreated,
    derived_event_id,
)
from autoserve_events.catalogue import NotificationOutcome, Severity

from .routing import Route, Tier, compile_routes, group_key, group_labels

BREAKER_OPEN = "circuit_breaker_open"
ACTIVE: tuple[AlertStatus, ...] = ("firing", "acknowledged")
SEVERITY_RANK: dict[Severity, int] = {"low": 0, "medium": 1, "high": 2, "critical": 3}
NotificationStatus = Literal["firing", "resolved"]
Emit = Callable[[Event], None]  # folds a decided event and queues it for publishing
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
MAX_REMEMBERED_IDS = 200_000
# Alertmanager forwarding, as Prometheus: firing alerts are sent again every resend interval
# (its ``resend_delay``, 1m) and are valid for four of them (``endsAt``), so Alertmanager
# neither resolves them by its own ``resolve_timeout`` while they fire nor keeps them long
# after a lost resolve.
DEFAULT_RESEND_INTERVAL = 60.0
VALID_FOR_RESENDS = 4
RESEND_TIER = -1  # in-flight key of a re-send: it is no group's tier
# How often ``tick`` drops per-instance memory older than ``history`` (core time, seconds).
PRUNE_EVERY = 60.0


def fingerprint(app: str, instance: str, failure_type: str) -> str:
    return derived_event_id("alert", app, instance, failure_type)[:16]


@dataclass
class Alert:
    alert_id: str
    fingerprint: str
    app: str
    instance: str
    failure_type: str
    severity: Severity
    message: str
    labels: dict[str, str]
    starts_at: float
    last_seen: float
    status: AlertStatus = "firing"
    ends_at: float | None = None
    acknowledged_by: str | None = None
    recovery: str = ""
    cause_event_id: str | None = None
    groups: set[str] = field(default_factory=set)
    escalated: set[tuple[str, int, str]] = field(default_factory=set)  # (group, tier, receiver)


@dataclass(frozen=True)
class AlertView:
    """An alert as a notification shows it (a snapshot)."""

    alert_id: str
    fingerprint: str
    app: str
    instance: str
    failure_type: str
    severity: Severity
    message: str
    labels: dict[str, str]
    status: AlertStatus
    starts_at: float
    ends_at: float | None
    acknowledged_by: str | None
    recovery: str

    @classmethod
    def of(cls, a: Alert) -> AlertView:
        return cls(a.alert_id, a.fingerprint, a.app, a.instance, a.failure_type, a.severity, a.message,
                   dict(a.labels), a.status, a.starts_at, a.ends_at, a.acknowledged_by, a.recovery)  # fmt: skip


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


@dataclass(frozen=True)
class Silence:
    silence_id: str
    app: str
    instance: str
    starts_at: float
    ends_at: float
    created_by: str
    reason: str
    maintenance: bool
    window: str

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def covers(self, alert: Alert) -> bool:
        return self.app == alert.app and self.instance in ("", alert.instance)

    def why(self) -> str:
        if self.maintenance:
            return f"maintenance window {self.window or self.silence_id}"
        return f"silenced by {self.silence_id} ({self.created_by}: {self.reason})"


@dataclass(frozen=True)
class Notification:
    """One message for one receiver: what ``group_key`` has firing and resolved now."""

    notification_id: str
    receiver: str
    group_key: str
    group_labels: dict[str, str]
    route_id: str
    tier: int
    seq: int
    app_name: str
    firing: tuple[AlertView, ...]
    resolved: tuple[AlertView, ...]
    # Alerts of apps that depend on a failing app here: held back, reported under it.
    dependents: tuple[tuple[AlertView, str], ...]
    created_at: float
    # Alertmanager receivers: firing alerts are valid this long from when they are sent (endsAt).
    valid_for: float | None = None
    # A re-send of what an Alertmanager receiver was told (not logged: not a notification).
    resend: bool = False
    retry_for: float | None = None  # bounds the receiver's retry_for (a re-send: until the next)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.group_key, self.receiver, RESEND_TIER if self.resend else self.tier)

    @property
    def status(self) -> NotificationStatus:
        return "firing" if self.firing else "resolved"

    def logged(
        self, outcome: NotificationOutcome, now: float, attempts: int = 1, error: str | None = None
    ) -> NotificationLogged:
        return NotificationLogged(
            event_id=self.notification_id,
            receiver=self.receiver,
            group_key=self.group_key,
            outcome=outcome,
            timestamp=now,
            app_name=self.app_name,
            tier=self.tier,
            seq=self.seq,
            firing=[a.alert_id for a in self.firing],
            resolved=[a.alert_id for a in self.resolved],
            attempts=attempts,
            error=error,
        )


@dataclass(frozen=True)
class Window:
    name: str
    cron: Cron
    duration: float
    apps: tuple[str, ...]
    reason: str


@dataclass
class Decisions:
    events: list[Event] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)


class Alerter:
    def __init__(self, config: AlertingConfig | None = None) -> None:
        self.alerts: dict[str, Alert] = {}
        self.groups: dict[str, Group] = {}
        self.silences: dict[str, Silence] = {}
        self.in_flight: set[tuple[str, str, int]] = set()
        self._active: dict[str, str] = {}  # fingerprint -> alert_id
        self._by_instance: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._by_app: dict[str, set[str]] = defaultdict(set)
        # Per-instance memory; container ids change on every recreate, so ``tick`` prunes what
        # is older than ``history`` (and instances of apps no longer configured).
        self._resolved_at: dict[str, float] = {}  # fingerprint -> last resolve: late failures ignored
        self._unhealthy: dict[tuple[str, str], float] = {}  # (app, instance) -> last sign of it failing
        self._pending: dict[tuple[str, str], dict[str, FailureDetected]] = {}
        self._next_prune = float("-inf")
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._window_starts: dict[tuple[str, int], float | None] = {}  # (window, minute) -> start
        self.depends_on: dict[str, tuple[str, ...]] = {}
        self.app_labels: dict[str, dict[str, str]] = {}
        # Alertmanager receiver -> the alerts it was told of as firing (a sent log entry) and has
        # not yet heard resolved; re-sent every resend interval, from ``_resend_at`` on.
        self.forwarded: dict[str, dict[str, None]] = {}
        self._resend_at: dict[str, float] = {}
        self.resend_every: dict[str, float] = {}
        self.configure(config or AlertingConfig())

    # -- configuration ---------------------------------------------------------------------

    def configure(self, config: AlertingConfig) -> None:
        self.config = config
        self.route = compile_routes(config)
        self.send_resolved = {name: r.send_resolved for name, r in config.receivers.items()}
        self.resend_every = {
            name: parse_duration(r.resend_interval) if r.resend_interval is not None else DEFAULT_RESEND_INTERVAL
            for name, r in config.receivers.items()
            if r.type == "alertmanager"
        }
        for receiver in [r for r in self.forwarded if r not in self.resend_every]:
            self._resend_at.pop(receiver, None)
            for alert_id in self.forwarded.pop(receiver):
                if (alert := self.alerts.get(alert_id)) is not None:
                    self._forget_if_done(alert)
        self.resolve_timeout = parse_duration(config.resolve_timeout)
        self.history = parse_duration(config.history)
        self.windows = tuple(
            Window(w.name, parse_cron(w.schedule, w.timezone), parse_duration(w.duration), tuple(w.apps), w.reason)
            for w in config.maintenance_windows
        )
        self._window_starts.clear()

    def set_apps(self, apps: dict[str, AppSpec]) -> None:
        self.depends_on = {name: tuple(spec.depends_on) for name, spec in apps.items() if spec.depends_on}
        self.app_labels = {name: dict(spec.labels) for name, spec in apps.items()}

    # -- the fold ----------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Event]:
        """Fold one event from the stream; return (already folded) events it causes."""
        if not self._remember(event.event_id):
            return []
        match event:
            case FailureDetected():
                out = self._on_failure(event)
            case HealthChanged():
                out = self._on_health(event)
            case BreakerStateChanged():
                out = self._on_breaker(event)
            case RecoveryExecuted():
                self._on_recovery(event)
                out = []
            case AlertAcknowledged():
                out = self._on_ack(event)
            case AlertChanged() | NotificationLogged() | SilenceCreated():
                self._apply(event)
                out = []
            case _:
                out = []
        for caused in out:
            self._remember(caused.event_id)
            self._apply(caused)
        return out

    def _remember(self, event_id: str) -> bool:
        if event_id in self._seen:
            return False
        self._seen[event_id] = None
        if len(self._seen) > MAX_REMEMBERED_IDS:
            self._seen.popitem(last=False)
        return True

    def _apply(self, event: Event) -> None:
        if isinstance(event, AlertChanged):
            self._apply_alert(event)
        elif isinstance(event, NotificationLogged):
            self._apply_log(event)
        elif isinstance(event, SilenceCreated):
            self.silences[event.silence_id] = Silence(
                event.silence_id, event.app_name, event.instance_id, event.starts_at, event.ends_at,
                event.created_by, event.reason, event.maintenance, event.window,
            )  # fmt: skip

    def _apply_alert(self, c: AlertChanged) -> None:
        alert = self.alerts.get(c.alert_id)
        if c.status == "firing" and alert is None:
            alert = Alert(
                c.alert_id, c.fingerprint or fingerprint(c.app_name, c.instance_id, c.failure_type), c.app_name,
                c.instance_id, c.failure_type, c.severity, c.message, dict(c.labels), c.starts_at, c.timestamp,
                cause_event_id=c.cause_event_id,
            )  # fmt: skip
            self.alerts[c.alert_id] = alert
            self._active[alert.fingerprint] = alert.alert_id
            self._by_instance[(alert.app, alert.instance)].add(alert.alert_id)
            self._by_app[alert.app].add(alert.alert_id)
            self._join_groups(alert, c.timestamp)
            return
        if alert is None or alert.status == "resolved":
            return
        if c.status == "acknowledged":
            alert.status, alert.acknowledged_by = "acknowledged", c.acknowledged_by
        elif c.status == "resolved":
            alert.status, alert.ends_at = "resolved", c.ends_at if c.ends_at is not None else c.timestamp
            self._active.pop(alert.fingerprint, None)
            self._resolved_at[alert.fingerprint] = alert.ends_at
            self._by_instance[(alert.app, alert.instance)].discard(alert.alert_id)
            if not self._by_instance[(alert.app, alert.instance)]:
                del self._by_instance[(alert.app, alert.instance)]
            self._by_app[alert.app].discard(alert.alert_id)
            if not self._by_app[alert.app]:
                del self._by_app[alert.app]
            for receiver, alerts in self.forwarded.items():
                if alert.alert_id in alerts:  # the resolve goes to Alertmanager at once
                    self._resend_at[receiver] = min(self._resend_at.get(receiver, alert.ends_at), alert.ends_at)
            self._forget_if_done(alert)

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

    def _leave_group(self, group: Group, alert_id: str) -> None:
        group.alerts.pop(alert_id, None)
        group.notified.discard(alert_id)
        group.suppressed.pop(alert_id, None)
        for held in group.tier_held.values():
            held.pop(alert_id, None)
        alert = self.alerts.get(alert_id)
        if alert is not None:
            alert.groups.discard(group.key)
            self._forget_if_done(alert)

    def _forget_if_done(self, alert: Alert) -> None:
        if alert.status == "resolved" and not alert.groups and not self._is_forwarded(alert.alert_id):
            self.alerts.pop(alert.alert_id, None)

    def _is_forwarded(self, alert_id: str) -> bool:
        return any(alert_id in alerts for alerts in self.forwarded.values())

    def _forwarded_log(self, log: NotificationLogged) -> None:
        """An Alertmanager receiver took these alerts: it is told again until they resolve."""
        interval = self.resend_every[log.receiver]
        alerts = self.forwarded.setdefault(log.receiver, {})
        for alert_id in log.firing:
            alerts[alert_id] = None
            if (alert := self.alerts.get(alert_id)) is not None and alert.status == "resolved":
                self._resend_at[log.receiver] = log.timestamp  # resolved while in flight: tell it now
        for alert_id in log.resolved:
            alerts.pop(alert_id, None)
            if (alert := self.alerts.get(alert_id)) is not None:
                self._forget_if_done(alert)
        if not alerts:
            del self.forwarded[log.receiver]
            self._resend_at.pop(log.receiver, None)
        else:
            self._resend_at.setdefault(log.receiver, log.timestamp + interval)

    def _apply_log(self, log: NotificationLogged) -> None:
        self.in_flight.discard((log.group_key, log.receiver, log.tier))
        if log.outcome == "sent" and log.receiver in self.resend_every:
            self._forwarded_log(log)
        group = self.groups.get(log.group_key)
        if group is None:
            return
        if log.tier == 0:
            if log.outcome in ("sent", "failed"):
                group.seq = max(group.seq, log.seq)
                group.next_flush = log.timestamp + group.route.group_interval
            if log.outcome == "sent":
                group.sent_firing = frozenset(log.firing)
                group.sent_at = log.timestamp
                group.notified.update(log.firing)
                for alert_id in log.firing:
                    group.suppressed.pop(alert_id, None)
                for alert_id in log.resolved:
                    self._leave_group(group, alert_id)
            elif log.outcome == "suppressed":
                group.suppressed.update(log.suppressed)
        else:
            slot = (log.tier, log.receiver)
            if log.outcome in ("sent", "failed"):
                group.tier_seq[slot] = max(group.tier_seq.get(slot, 0), log.seq)
            if log.outcome == "failed":
                # Not escalated: decided again a group_interval later, as a failed tier 0 is.
                group.tier_retry_at[slot] = log.timestamp + group.route.group_interval
            elif log.outcome == "suppressed":
                # Held back, not escalated: it goes when the hold ends (recorded once per reason).
                group.tier_held.setdefault(slot, {}).update(log.suppressed)
            else:
                held = group.tier_held.get(slot, {})
                for alert_id in log.firing:
                    held.pop(alert_id, None)
                    if (alert := self.alerts.get(alert_id)) is not None:
                        alert.escalated.add((group.key, log.tier, log.receiver))
        if not group.alerts and (group.key, group.receiver, 0) not in self.in_flight:
            del self.groups[group.key]

    # -- inputs --------------------------------------------------------------------------------

    def _labels(self, app: str, instance: str, severity: str, failure_type: str) -> dict[str, str]:
        own = {"app": app, "instance": instance, "severity": severity, "failure_type": failure_type}
        return {**self.app_labels.get(app, {}), **own}

    def _fire(self, app: str, instance: str, failure_type: str, severity: Severity, message: str, ts: float,
              cause: str, reason: str) -> AlertChanged:  # fmt: skip
        fp = fingerprint(app, instance, failure_type)
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
            labels=self._labels(app, instance, severity, failure_type),
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

    def _on_failure(self, e: FailureDetected) -> list[Event]:
        ft = str(e.failure_type)
        fp = fingerprint(e.app_name, e.instance_id, ft)
        key = (e.app_name, e.instance_id)
        if key in self._unhealthy:
            self._unhealthy[key] = max(self._unhealthy[key], e.timestamp)  # still failing: still present
        active = self._active.get(fp)
        if active is not None:
            alert = self.alerts[active]
            alert.last_seen = max(alert.last_seen, e.timestamp)
            alert.message = e.message
            return []
        if e.timestamp <= self._resolved_at.get(fp, float("-inf")):
            return []  # older than the resolve: a late copy, not a new episode
        if e.is_critical or SEVERITY_RANK[e.severity] >= 2 or e.failure_type in FIRE_AT_ONCE:
            reason = f"{e.severity} {ft}"
        elif key in self._unhealthy:
            reason = f"{ft} on an unhealthy instance"
        else:
            self._pending.setdefault(key, {})[ft] = e  # fires if the instance turns unhealthy
            return []
        return [self._fire(e.app_name, e.instance_id, ft, e.severity, e.message, e.timestamp, e.event_id, reason)]

    def _on_health(self, e: HealthChanged) -> list[Event]:
        key = (e.app_name, e.instance_id)
        if e.healthy:
            self._unhealthy.pop(key, None)
            self._pending.pop(key, None)
            alerts = [self.alerts[i] for i in sorted(self._by_instance.get(key, ()))]
            return [
                self._resolve(a, e.timestamp, f"instance healthy again: {e.reason}")
                for a in alerts
                if a.failure_type != BREAKER_OPEN and a.starts_at <= e.timestamp
            ]
        self._unhealthy[key] = max(self._unhealthy.get(key, e.timestamp), e.timestamp)
        out: list[Event] = []
        for ft, failure in sorted(self._pending.pop(key, {}).items()):
            if e.timestamp - failure.timestamp <= self.resolve_timeout and fingerprint(*key, ft) not in self._active:
                reason = f"instance unhealthy: {e.reason}"
                out.append(self._fire(*key, ft, failure.severity, failure.message, failure.timestamp,
                                      failure.event_id, reason))  # fmt: skip
        return out

    def _on_breaker(self, e: BreakerStateChanged) -> list[Event]:
        fp = fingerprint(e.app_name, e.instance_id, BREAKER_OPEN)
        active = self._active.get(fp)
        if e.state == "open" and active is None:
            message = f"circuit breaker open: {e.reason}"
            return [self._fire(e.app_name, e.instance_id, BREAKER_OPEN, "high", message, e.timestamp, e.event_id,
                               f"breaker {e.previous_state} -> open")]  # fmt: skip
        if e.state == "closed" and active is not None:
            return [self._resolve(self.alerts[active], e.timestamp, f"circuit breaker closed: {e.reason}")]
        return []

    def _on_recovery(self, e: RecoveryExecuted) -> None:
        outcome = "succeeded" if e.success else f"failed: {e.error or 'unknown error'}"
        for alert_id in self._by_instance.get((e.app_name, e.instance_id), ()):
            self.alerts[alert_id].recovery = f"{e.strategy} {outcome}"

    def _on_ack(self, e: AlertAcknowledged) -> list[Event]:
        alert = self.alerts.get(e.alert_id)
        if alert is None or alert.status != "firing":
            return []
        reason = f"acknowledged by {e.acknowledged_by}" + (f": {e.comment}" if e.comment else "")
        return [self._change(alert, "acknowledged", e.timestamp, reason, derived_event_id(e.event_id, "ack"),
                             by=e.acknowledged_by)]  # fmt: skip

    # -- suppression -----------------------------------------------------------------------------

    def failing_root(self, app: str) -> str | None:
        """The deepest dependency of ``app`` that has active alerts, if any."""
        seen = {app}

        def visit(name: str) -> str | None:
            for dep in self.depends_on.get(name, ()):
                if dep in seen:
                    continue
                seen.add(dep)
                deeper = visit(dep)
                if deeper is not None:
                    return deeper
                if self._by_app.get(dep):
                    return dep
            return None

        return visit(app)

    def suppression(self, alert: Alert, now: float) -> str | None:
        for silence in self.silences.values():
            if silence.covers(alert) and silence.active(now):
                return silence.why()
        root = self.failing_root(alert.app)
        if root is not None:
            return f"dependency {root} is failing"
        return None

    def _dependents(self, apps: set[str], now: float) -> tuple[tuple[AlertView, str], ...]:
        if not self.depends_on or not apps:
            return ()
        found = []
        for app in sorted(self.depends_on):
            root = self.failing_root(app)
            if root in apps:
                found += [(AlertView.of(self.alerts[i]), root) for i in sorted(self._by_app.get(app, ()))]
        return tuple(found)

    # -- time ------------------------------------------------------------------------------------

    def tick(self, now: float, apps: tuple[str, ...] = ()) -> Decisions:
        """Every timed decision due at ``now``. ``apps``: the configured apps, for
        maintenance windows that name none."""
        out = Decisions()
        if now >= self._next_prune:
            self._prune(now)
            self._next_prune = now + PRUNE_EVERY

        def emit(event: Event) -> None:
            if self._remember(event.event_id):
                self._apply(event)
                out.events.append(event)

        for alert in list(self.alerts.values()):
            if (
                alert.status in ACTIVE
                and alert.failure_type != BREAKER_OPEN
                and now - alert.last_seen >= self.resolve_timeout
            ):
                emit(self._resolve(alert, now, f"no {alert.failure_type} reported for {self.resolve_timeout:g}s"))
        for window in self.windows:
            start = self._window_start(window, now)
            if start is None:
                continue
            for app in window.apps or apps:
                silence_id = derived_event_id("maintenance", window.name, app, start)[:16]
                if silence_id not in self.silences:
                    emit(SilenceCreated(
                        event_id=derived_event_id(silence_id), silence_id=silence_id, app_name=app,
                        starts_at=start, ends_at=start + window.duration, created_by="alerting.maintenance_windows",
                        reason=window.reason or f"maintenance window {window.name}", timestamp=now,
                        maintenance=True, window=window.name,
                    ))  # fmt: skip
        for silence_id, silence in list(self.silences.items()):
            if now - silence.ends_at > 86400:
                del self.silences[silence_id]
        for receiver in self.resend_every:
            self._resend(receiver, now, out.notifications)
        for group in list(self.groups.values()):
            if group.next_flush <= now and (group.key, group.receiver, 0) not in self.in_flight:
                self._flush(group, now, emit, out.notifications)
            if group.route.escalation and group.key in self.groups:
                self._escalate(group, now, emit, out.notifications)
        return out

    def _prune(self, now: float) -> None:
        """Drop per-instance memory older than ``history``: a resolve time nothing late can
        still hit, the unhealthy mark of an instance that stopped reporting (a recreated
        container has a new id), failures that never fired; and keys of removed apps. A
        resolve an Alertmanager receiver never took (down for all of ``history``) is given up:
        its alert expired there long ago (four resend intervals after the last re-send)."""
        horizon = now - self.history
        for receiver, alerts in list(self.forwarded.items()):
            for alert_id in list(alerts):
                alert = self.alerts.get(alert_id)
                if alert is None or (alert.ends_at is not None and alert.ends_at < horizon):
                    del alerts[alert_id]
                    if alert is not None:
                        self._forget_if_done(alert)
            if not alerts:
                del self.forwarded[receiver]
                self._resend_at.pop(receiver, None)

        def gone(app: str) -> bool:
            return bool(self.app_labels) and app not in self.app_labels

        for fp in [fp for fp, at in self._resolved_at.items() if at < horizon]:
            del self._resolved_at[fp]
        for key in [
            k for k, at in self._unhealthy.items() if gone(k[0]) or (at < horizon and k not in self._by_instance)
        ]:
            del self._unhealthy[key]
        for key, failures in list(self._pending.items()):
            for ft in [ft for ft, f in failures.items() if f.timestamp < horizon]:
                del failures[ft]
            if not failures or gone(key[0]):
                del self._pending[key]

    def _window_start(self, window: Window, now: float) -> float | None:
        minute = int(now // 60)
        key = (window.name, minute)
        if key not in self._window_starts:
            if len(self._window_starts) > 1000:
                self._window_starts.clear()
            start = window.cron.last_start(now, window.duration)
            self._window_starts[key] = start if start is not None and now < start + window.duration else None
        return self._window_starts[key]

    def _flush(self, group: Group, now: float, emit: Emit, notifications: list[Notification]) -> None:
        send_resolved = self.send_resolved.get(group.receiver, True)
        firing: list[Alert] = []
        resolved: list[Alert] = []
        newly_suppressed: dict[str, str] = {}
        for alert_id in list(group.alerts):
            alert = self.alerts[alert_id]
            if alert.status == "resolved":
                if alert_id in group.notified and send_resolved:
                    resolved.append(alert)
                else:
                    self._leave_group(group, alert_id)  # never announced, or not wanted: dropped
                continue
            why = self.suppression(alert, now)
            if why is not None:
                if group.suppressed.get(alert_id) != why:
                    newly_suppressed[alert_id] = why
                continue
            if alert.status == "firing":
                firing.append(alert)
        app_name = group.labels.get("app", "")
        if newly_suppressed:
            items = sorted(newly_suppressed.items())
            emit(NotificationLogged(
                event_id=derived_event_id(group.key, group.created_at, group.receiver, 0, "suppressed", json.dumps(items)),
                receiver=group.receiver, group_key=group.key, outcome="suppressed", timestamp=now,
                app_name=app_name, suppressed=dict(items),
            ))  # fmt: skip
        ids = frozenset(a.alert_id for a in firing)
        repeat = bool(ids) and group.sent_at is not None and now - group.sent_at >= group.route.repeat_interval
        group.next_flush = now + group.route.group_interval
        if not (ids - group.sent_firing) and not resolved and not repeat:
            if not group.alerts:
                del self.groups[group.key]
            return
        seq = group.seq + 1
        notification = Notification(
            notification_id=derived_event_id(group.key, group.created_at, group.receiver, 0, seq),
            receiver=group.receiver,
            group_key=group.key,
            group_labels=dict(group.labels),
            route_id=group.route.id,
            tier=0,
            seq=seq,
            app_name=app_name,
            firing=tuple(AlertView.of(a) for a in firing),
            resolved=tuple(AlertView.of(a) for a in resolved),
            dependents=self._dependents({a.app for a in firing}, now),
            created_at=now,
            valid_for=self._valid_for(group.receiver),
        )
        self.in_flight.add(notification.key)
        notifications.append(notification)

    def _valid_for(self, receiver: str) -> float | None:
        interval = self.resend_every.get(receiver)
        return None if interval is None else VALID_FOR_RESENDS * interval

    def _resend(self, receiver: str, now: float, notifications: list[Notification]) -> None:
        """Tell an Alertmanager receiver again what it was told: the alerts still active, valid
        for four more resend intervals, and the ones resolved since, with their ``endsAt``.
        Not a notification (no log entry): Alertmanager deduplicates, and a restarted alerter
        re-sends once at once, which is what a lost re-send needs anyway."""
        alerts = self.forwarded.get(receiver)
        if not alerts or now < self._resend_at.get(receiver, now) or ("", receiver, RESEND_TIER) in self.in_flight:
            return
        firing: list[Alert] = []
        resolved: list[Alert] = []
        for alert_id in list(alerts):
            alert = self.alerts.get(alert_id)
            if alert is None:
                del alerts[alert_id]  # forgotten (older than history at a restart): nothing to tell
            else:
                (resolved if alert.status == "resolved" else firing).append(alert)
        if not alerts:
            del self.forwarded[receiver]
            self._resend_at.pop(receiver, None)
            return
        interval = self.resend_every[receiver]
        notification = Notification(
            notification_id=derived_event_id("resend", receiver, now),
            receiver=receiver,
            group_key="",
            group_labels={},
            route_id="",
            tier=0,
            seq=0,
            app_name="",
            firing=tuple(AlertView.of(a) for a in firing),
            resolved=tuple(AlertView.of(a) for a in resolved),
            dependents=self._dependents({a.app for a in firing}, now),
            created_at=now,
            valid_for=VALID_FOR_RESENDS * interval,
            resend=True,
            retry_for=interval,  # the next re-send supersedes this one
        )
        self.in_flight.add(notification.key)
        notifications.append(notification)

    def _resent(self, notification: Notification, outcome: NotificationOutcome, now: float) -> None:
        self.in_flight.discard(notification.key)
        receiver = notification.receiver
        alerts = self.forwarded.get(receiver)
        if alerts is None:
            return
        if outcome == "sent":
            for view in notification.resolved:
                alerts.pop(view.alert_id, None)
                if (alert := self.alerts.get(view.alert_id)) is not None:
                    self._forget_if_done(alert)
        if not alerts:
            del self.forwarded[receiver]
            self._resend_at.pop(receiver, None)
        else:
            due = now + self.resend_every.get(receiver, DEFAULT_RESEND_INTERVAL)
            resolved_since = [a for a in alerts if (x := self.alerts.get(a)) is not None and x.status == "resolved"
                              and all(v.alert_id != a for v in notification.resolved)]  # fmt: skip
            self._resend_at[receiver] = now if resolved_since else due

    def _tiers(self, group: Group) -> Iterator[tuple[int, Tier, str, float, list[Alert]]]:
        """Each escalation (tier, receiver) of ``group`` with nothing in flight: when a failed
        send may be retried, and the firing alerts not yet escalated there."""
        for tier_index, tier in enumerate(group.route.escalation, start=1):
            for receiver in tier.receivers:
                if (group.key, receiver, tier_index) in self.in_flight:
                    continue
                waiting = [
                    alert for alert_id in group.alerts
                    if (alert := self.alerts[alert_id]).status == "firing"
                    and (group.key, tier_index, receiver) not in alert.escalated
                ]  # fmt: skip
                yield (
                    tier_index,
                    tier,
                    receiver,
                    group.tier_retry_at.get((tier_index, receiver), float("-inf")),
                    waiting,
                )

    def _escalate(self, group: Group, now: float, emit: Emit, notifications: list[Notification]) -> None:
        for tier_index, tier, receiver, retry_at, waiting in self._tiers(group):
            if now < retry_at:
                continue  # failed a moment ago: tried again at the next group_interval
            due = [a for a in waiting if now >= a.starts_at + tier.after]
            if not due:
                continue
            firing: list[Alert] = []
            held: dict[str, str] = {}
            known = group.tier_held.get((tier_index, receiver), {})
            for alert in due:
                why = self.suppression(alert, now)
                if why is None:
                    firing.append(alert)  # an escalation held back before goes now, once
                elif known.get(alert.alert_id) != (why := f"escalation held back: {why}"):
                    held[alert.alert_id] = why  # newly held (or for another reason): recorded
            app_name = group.labels.get("app", "")
            if held:
                items = sorted(held.items())
                emit(NotificationLogged(
                    event_id=derived_event_id(group.key, group.created_at, receiver, tier_index, "suppressed",
                                              json.dumps(items)),
                    receiver=receiver, group_key=group.key, outcome="suppressed", timestamp=now,
                    app_name=app_name, tier=tier_index, suppressed=dict(items),
                ))  # fmt: skip
            if not firing:
                continue
            seq = group.tier_seq.get((tier_index, receiver), 0) + 1
            notification = Notification(
                notification_id=derived_event_id(group.key, group.created_at, receiver, tier_index, seq),
                receiver=receiver,
                group_key=group.key,
                group_labels=dict(group.labels),
                route_id=group.route.id,
                tier=tier_index,
                seq=seq,
                app_name=app_name,
                firing=tuple(AlertView.of(a) for a in firing),
                resolved=(),
                dependents=self._dependents({a.app for a in firing}, now),
                created_at=now,
                valid_for=self._valid_for(receiver),
            )
            self.in_flight.add(notification.key)
            notifications.append(notification)

    def delivered(self, notification: Notification, outcome: NotificationOutcome, now: float, attempts: int = 1,
                  error: str | None = None) -> NotificationLogged | None:  # fmt: skip
        """The log entry for a delivery that ended; folded now, to be published. A re-send
        has none: it only sets when the next one is due."""
        if notification.resend:
            self._resent(notification, outcome, now)
            return None
        log = notification.logged(outcome, now, attempts, error)
        if self._remember(log.event_id):
            self._apply(log)
        else:
            self.in_flight.discard(notification.key)
        return log

    def next_due(self, now: float) -> float:
        """When ``tick`` next has something to do, unless an input comes first (an event, a
        delivery that ended, new settings: the timer is woken for those). Called after a
        tick at ``now``; what waits on a delivery in flight or on an input is left out, so
        an idle alerter sleeps.

        Due: a group flush; an alert's ``resolve_timeout``; an escalation tier's time (or its
        retry after a failure); the end of an active silence (held escalations go then); an
        Alertmanager re-send; the memory prune; the next minute while maintenance windows
        are configured (a window is looked for once a minute)."""
        due: list[float] = [self._next_prune]
        if self.windows:
            due.append((now // 60 + 1) * 60)
        for alert in self.alerts.values():
            if alert.status in ACTIVE and alert.failure_type != BREAKER_OPEN:
                due.append(alert.last_seen + self.resolve_timeout)
        due += [s.ends_at for s in self.silences.values() if s.starts_at <= now < s.ends_at]
        due += [s.starts_at for s in self.silences.values() if now < s.starts_at]
        for receiver, at in self._resend_at.items():
            if self.forwarded.get(receiver) and ("", receiver, RESEND_TIER) not in self.in_flight:
                due.append(at)
        for group in self.groups.values():
            if (group.key, group.receiver, 0) not in self.in_flight:
                due.append(group.next_flush)
            for _, tier, _, retry_at, waiting in self._tiers(group):
                # due already: held back, it waits for an input or a silence's end
                due += [at for a in waiting if (at := max(a.starts_at + tier.after, retry_at)) > now]
        return min(due)

    # -- views -----------------------------------------------------------------------------------

    def active_alerts(self) -> list[AlertView]:
        return [AlertView.of(a) for a in self.alerts.values() if a.status in ACTIVE]
