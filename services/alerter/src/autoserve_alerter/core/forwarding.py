"""Alertmanager forwarding, as Prometheus does it: firing alerts are sent again every resend
interval (its ``resend_delay``, 1m) and are valid for four of them (``endsAt``), so
Alertmanager neither resolves them by its own ``resolve_timeout`` while they fire nor keeps
them long after a lost resolve. A resolve goes at once, with its real end.

Re-sends are not notifications: no log entry (Alertmanager deduplicates), and a restarted
alerter, which rebuilds what each receiver was told from the notification log, re-sends once
at once, which is what a lost re-send needs anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from autoserve_config import AlertingConfig, parse_duration
from autoserve_events import NotificationLogged, derived_event_id
from autoserve_events.catalogue import NotificationOutcome

from .alerts import Alert, AlertBook, AlertView
from .notification import RESEND_TIER, InFlight, Notification, Owns, everything
from .suppression import Suppression

DEFAULT_RESEND_INTERVAL = 60.0
VALID_FOR_RESENDS = 4


@dataclass(eq=False)
class Forwarding:
    book: AlertBook
    suppression: Suppression
    in_flight: InFlight
    # Alertmanager receiver -> the alerts it was told of as firing (a sent log entry) and has
    # not yet heard resolved; re-sent every resend interval, from ``resend_at`` on.
    forwarded: dict[str, dict[str, None]] = field(default_factory=dict)
    resend_at: dict[str, float] = field(default_factory=dict)
    resend_every: dict[str, float] = field(default_factory=dict)

    def configure(self, config: AlertingConfig) -> None:
        self.resend_every = {
            name: parse_duration(r.resend_interval) if r.resend_interval is not None else DEFAULT_RESEND_INTERVAL
            for name, r in config.receivers.items()
            if r.type == "alertmanager"
        }
        for receiver in [r for r in self.forwarded if r not in self.resend_every]:
            self.resend_at.pop(receiver, None)
            self._drop(self.forwarded.pop(receiver))

    def holds(self, alert_id: str) -> bool:
        """Whether a receiver was told ``alert_id`` fires and has not yet heard it resolved."""
        return any(alert_id in alerts for alerts in self.forwarded.values())

    def valid_for(self, receiver: str) -> float | None:
        interval = self.resend_every.get(receiver)
        return None if interval is None else VALID_FOR_RESENDS * interval

    # -- the fold ------------------------------------------------------------------------------

    def logged(self, log: NotificationLogged) -> None:
        """A receiver took these alerts (a sent log entry): it is told again until they resolve."""
        if log.outcome != "sent" or log.receiver not in self.resend_every:
            return
        alerts = self.forwarded.setdefault(log.receiver, {})
        for alert_id in log.firing:
            alerts[alert_id] = None
            if (alert := self.book.alerts.get(alert_id)) is not None and alert.status == "resolved":
                self.resend_at[log.receiver] = log.timestamp  # resolved while in flight: tell it now
        self._told_resolved(log.receiver, log.resolved, log.timestamp + self.resend_every[log.receiver])

    def resolved(self, alert_id: str, ends_at: float) -> None:
        """The resolve goes to each receiver that was told the alert fires, at once."""
        for receiver, alerts in self.forwarded.items():
            if alert_id in alerts:
                self.resend_at[receiver] = min(self.resend_at.get(receiver, ends_at), ends_at)

    def _told_resolved(self, receiver: str, alert_ids: Iterable[str], due: float | None) -> None:
        """``receiver`` is done with these alerts (told resolved, or given up); the rest is
        re-sent from ``due`` (None: when it was due already)."""
        alerts = self.forwarded[receiver]
        for alert_id in alert_ids:
            alerts.pop(alert_id, None)
        self._drop(alert_ids)
        if not alerts:
            del self.forwarded[receiver]
            self.resend_at.pop(receiver, None)
        elif due is not None:
            self.resend_at.setdefault(receiver, due)

    def _drop(self, alert_ids: Iterable[str]) -> None:
        """Forget those of these alerts that nothing needs any more."""
        for alert_id in alert_ids:
            if (alert := self.book.alerts.get(alert_id)) is not None:
                self.book.forget_if_done(alert)

    # -- time ----------------------------------------------------------------------------------

    def tick(self, now: float, notifications: list[Notification], owns: Owns = everything) -> None:
        for receiver in self.resend_every:
            if owns(resend_key(receiver)):
                self._resend(receiver, now, notifications)

    def _resend(self, receiver: str, now: float, notifications: list[Notification]) -> None:
        """Tell an Alertmanager receiver again what it was told: the alerts still active, valid
        for four more resend intervals, and the ones resolved since, with their ``endsAt``."""
        alerts = self.forwarded.get(receiver)
        if not alerts or now < self.resend_at.get(receiver, now) or ("", receiver, RESEND_TIER) in self.in_flight:
            return
        firing: list[Alert] = []
        resolved: list[Alert] = []
        for alert_id in list(alerts):
            alert = self.book.alerts.get(alert_id)
            if alert is None:
                del alerts[alert_id]  # forgotten (older than history at a restart): nothing to tell
            else:
                (resolved if alert.status == "resolved" else firing).append(alert)
        if not alerts:
            del self.forwarded[receiver]
            self.resend_at.pop(receiver, None)
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
            dependents=self.suppression.dependents({a.app for a in firing}),
            created_at=now,
            valid_for=VALID_FOR_RESENDS * interval,
            resend=True,
            retry_for=interval,  # the next re-send supersedes this one
        )
        self.in_flight.add(notification.key)
        notifications.append(notification)

    def resent(self, notification: Notification, outcome: NotificationOutcome, now: float) -> None:
        """A re-send ended: the resolves it told are done; the next is due a resend interval
        on, or at once if an alert resolved meanwhile."""
        self.in_flight.discard(notification.key)
        receiver = notification.receiver
        alerts = self.forwarded.get(receiver)
        if alerts is None:
            return
        told = [v.alert_id for v in notification.resolved]
        resolved_since = [a for a in alerts if (x := self.book.alerts.get(a)) is not None and x.status == "resolved"
                          and a not in told]  # fmt: skip
        self.resend_at.pop(receiver, None)
        due = now if resolved_since else now + self.resend_every.get(receiver, DEFAULT_RESEND_INTERVAL)
        self._told_resolved(receiver, told if outcome == "sent" else [], due)

    def prune(self, horizon: float) -> None:
        """Give up a resolve a receiver never took (down for all of ``history``): its alert
        expired there long ago (four resend intervals after the last re-send)."""
        for receiver, alerts in list(self.forwarded.items()):
            stale = [
                alert_id
                for alert_id in alerts
                if (alert := self.book.alerts.get(alert_id)) is None
                or (alert.ends_at is not None and alert.ends_at < horizon)
            ]
            self._told_resolved(receiver, stale, None)

    def due(self, owns: Owns = everything) -> list[float]:
        """Each owned receiver's next re-send, unless one is in flight (its end wakes the timer)."""
        return [
            at
            for receiver, at in self.resend_at.items()
            if self.forwarded.get(receiver) and ("", receiver, RESEND_TIER) not in self.in_flight
            and owns(resend_key(receiver))
        ]  # fmt: skip


def resend_key(receiver: str) -> str:
    """What decides which member re-sends to an Alertmanager receiver (one member does)."""
    return f"resend:{receiver}"
