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

This module composes the parts: ``alerts.py`` (alerts and groups), ``suppression.py``
(silences, maintenance windows, dependencies), ``notify.py`` (flushes, escalation, the
notification log) and ``forwarding.py`` (Alertmanager re-sends).
"""

from __future__ import annotations

from collections import OrderedDict

from autoserve_config import AlertingConfig, AppSpec
from autoserve_events import (
    AlertAcknowledged,
    AlertChanged,
    BreakerStateChanged,
    Event,
    FailureDetected,
    HealthChanged,
    NotificationLogged,
    RecoveryExecuted,
    SilenceCreated,
)
from autoserve_events.catalogue import NotificationOutcome

from .alerts import ACTIVE, BREAKER_OPEN, Alert, AlertBook, AlertView, Group, fingerprint
from .forwarding import Forwarding
from .notification import Decisions, InFlight, Notification, Owns, everything
from .notify import Notifier
from .suppression import Silence, Suppression

__all__ = ["BREAKER_OPEN", "Alert", "AlertView", "Alerter", "Decisions", "Group", "Notification", "fingerprint"]

MAX_REMEMBERED_IDS = 200_000
# How often ``tick`` drops per-instance memory older than ``history`` (core time, seconds).
PRUNE_EVERY = 60.0


class Alerter:
    def __init__(self, config: AlertingConfig | None = None) -> None:
        self.in_flight: InFlight = set()
        self.book = AlertBook(pinned=lambda alert_id: self.forwarding.holds(alert_id))
        self.suppression = Suppression(self.book)
        self.forwarding = Forwarding(self.book, self.suppression, self.in_flight)
        self.notifier = Notifier(self.book, self.suppression, self.forwarding, self.in_flight)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._next_prune = float("-inf")
        # Which groups this member notifies (with several members, each group has one owner);
        # the others' are folded from their owner's log entries.
        self.owns: Owns = everything
        self.configure(config or AlertingConfig())

    def configure(self, config: AlertingConfig) -> None:
        self.config = config
        self.book.configure(config)
        self.suppression.configure(config)
        self.forwarding.configure(config)
        self.notifier.configure(config)

    def set_apps(self, apps: dict[str, AppSpec]) -> None:
        self.book.set_apps(apps)
        self.suppression.set_apps(apps)

    # -- the fold ----------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Event]:
        """Fold one event from the stream; return (already folded) events it causes."""
        if not self._remember(event.event_id):
            return []
        out: list[Event] = []
        match event:
            case FailureDetected():
                out = self.book.on_failure(event)
            case HealthChanged():
                out = self.book.on_health(event)
            case BreakerStateChanged():
                out = self.book.on_breaker(event)
            case RecoveryExecuted():
                self.book.on_recovery(event)
            case AlertAcknowledged():
                out = self.book.on_ack(event)
            case AlertChanged() | NotificationLogged() | SilenceCreated():
                self._apply(event)
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
            resolved = self.book.apply(event)
            if resolved is not None and resolved.ends_at is not None:
                self.forwarding.resolved(resolved.alert_id, resolved.ends_at)
        elif isinstance(event, NotificationLogged):
            self.notifier.apply_log(event)
        elif isinstance(event, SilenceCreated):
            self.suppression.apply(event)

    # -- time ------------------------------------------------------------------------------------

    def tick(self, now: float, apps: tuple[str, ...] = ()) -> Decisions:
        """Every timed decision due at ``now``. ``apps``: the configured apps, for
        maintenance windows that name none. Only the groups (and Alertmanager re-sends) that
        ``owns`` says are this member's are notified."""
        owns = self.owns
        out = Decisions()
        if now >= self._next_prune:
            self.forwarding.prune(now - self.book.history)
            self.book.prune(now)
            self.notifier.tidy(now, owns)
            self._next_prune = now + PRUNE_EVERY

        def emit(event: Event) -> None:
            if self._remember(event.event_id):
                self._apply(event)
                out.events.append(event)

        self.book.expire(now, emit)
        self.suppression.tick(now, apps, emit)
        self.forwarding.tick(now, out.notifications, owns)
        self.notifier.tick(now, emit, out.notifications, owns)
        return out

    def delivered(self, notification: Notification, outcome: NotificationOutcome, now: float, attempts: int = 1,
                  error: str | None = None) -> NotificationLogged | None:  # fmt: skip
        """The log entry for a delivery that ended; folded now, to be published. A re-send
        has none: it only sets when the next one is due."""
        if notification.resend:
            self.forwarding.resent(notification, outcome, now)
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
        due = [self._next_prune, *self.suppression.due(now), *self.book.expiries(), *self.forwarding.due(self.owns)]
        return min(due + self.notifier.due(now, self.owns))

    # -- views -----------------------------------------------------------------------------------

    @property
    def alerts(self) -> dict[str, Alert]:
        return self.book.alerts

    @property
    def groups(self) -> dict[str, Group]:
        return self.book.groups

    @property
    def silences(self) -> dict[str, Silence]:
        return self.suppression.silences

    @property
    def forwarded(self) -> dict[str, dict[str, None]]:
        return self.forwarding.forwarded

    def active_alerts(self) -> list[AlertView]:
        return [AlertView.of(a) for a in self.alerts.values() if a.status in ACTIVE]
