"""Notification: when each group tells its receiver (``group_wait``, ``group_interval``,
``repeat_interval``, ``send_resolved``), when its alerts escalate tier by tier, and the
notification log (``NotificationLogged``) that makes the fold know what was sent.

A delivered notification comes back as its log entry; held-back alerts are logged as
``suppressed`` (once per reason), so a restart decides nothing twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from autoserve_config import AlertingConfig
from autoserve_events import NotificationLogged, derived_event_id

from .alerts import Alert, AlertBook, AlertView, Group
from .forwarding import Forwarding
from .notification import Emit, InFlight, Notification, Owns, everything
from .routing import Tier
from .suppression import Suppression

# How long after its resolve an alert another member never announced is dropped here: well
# past the owner's next flush, so a late log entry (it was announced after all) comes first.
TIDY_AFTER = 600.0


@dataclass(eq=False)
class Notifier:
    book: AlertBook
    suppression: Suppression
    forwarding: Forwarding
    in_flight: InFlight
    send_resolved: dict[str, bool] = field(default_factory=dict)  # receiver -> its send_resolved

    def configure(self, config: AlertingConfig) -> None:
        self.send_resolved = {name: r.send_resolved for name, r in config.receivers.items()}

    # -- the notification log --------------------------------------------------------------------

    def apply_log(self, log: NotificationLogged) -> None:
        self.in_flight.discard((log.group_key, log.receiver, log.tier))
        self.forwarding.logged(log)
        group = self.book.groups.get(log.group_key)
        if group is None:
            return
        if log.tier == 0:
            self._apply_group_log(group, log)
        else:
            self._apply_tier_log(group, log)
        if not group.alerts and (group.key, group.receiver, 0) not in self.in_flight:
            del self.book.groups[group.key]

    def _apply_group_log(self, group: Group, log: NotificationLogged) -> None:
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
                self.book.leave_group(group, alert_id)
        elif log.outcome == "suppressed":
            group.suppressed.update(log.suppressed)

    def _apply_tier_log(self, group: Group, log: NotificationLogged) -> None:
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
                if (alert := self.book.alerts.get(alert_id)) is not None:
                    alert.escalated.add((group.key, log.tier, log.receiver))

    # -- time ------------------------------------------------------------------------------------

    def tick(self, now: float, emit: Emit, notifications: list[Notification], owns: Owns = everything) -> None:
        """Flush the groups that are due, and escalate what is due in each: the groups this
        member owns (another member's are folded from its log entries, never decided here)."""
        for group in list(self.book.groups.values()):
            if not owns(group.key):
                continue
            if group.next_flush <= now and (group.key, group.receiver, 0) not in self.in_flight:
                self._flush(group, now, emit, notifications)
            if group.route.escalation and group.key in self.book.groups:
                self._escalate(group, now, emit, notifications)

    def _flush(self, group: Group, now: float, emit: Emit, notifications: list[Notification]) -> None:
        due_at = group.next_flush
        send_resolved = self.send_resolved.get(group.receiver, True)
        firing: list[Alert] = []
        resolved: list[Alert] = []
        newly_suppressed: dict[str, str] = {}
        for alert_id in list(group.alerts):
            alert = self.book.alerts[alert_id]
            if alert.status == "resolved":
                if alert_id in group.notified and send_resolved:
                    resolved.append(alert)
                else:
                    self.book.leave_group(group, alert_id)  # never announced, or not wanted: dropped
                continue
            why = self.suppression.why(alert, now)
            if why is not None:
                if group.suppressed.get(alert_id) != why:
                    newly_suppressed[alert_id] = why
                continue
            if alert.status == "firing":
                firing.append(alert)
        if newly_suppressed:
            emit(self._held_back(group, group.receiver, 0, newly_suppressed, now))
        ids = frozenset(a.alert_id for a in firing)
        repeat = bool(ids) and group.sent_at is not None and now - group.sent_at >= group.route.repeat_interval
        group.next_flush = now + group.route.group_interval
        if not (ids - group.sent_firing) and not resolved and not repeat:
            if not group.alerts:
                del self.book.groups[group.key]
            return
        self._decide(group, group.receiver, 0, group.seq + 1, firing, resolved, now, notifications, due_at)

    def _tiers(self, group: Group) -> Iterator[tuple[int, Tier, str, float, list[Alert]]]:
        """Each escalation (tier, receiver) of ``group`` with nothing in flight: when a failed
        send may be retried, and the firing alerts not yet escalated there."""
        for tier_index, tier in enumerate(group.route.escalation, start=1):
            for receiver in tier.receivers:
                if (group.key, receiver, tier_index) in self.in_flight:
                    continue
                waiting = [
                    alert for alert_id in group.alerts
                    if (alert := self.book.alerts[alert_id]).status == "firing"
                    and (group.key, tier_index, receiver) not in alert.escalated
                ]  # fmt: skip
                retry_at = group.tier_retry_at.get((tier_index, receiver), float("-inf"))
                yield tier_index, tier, receiver, retry_at, waiting

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
                why = self.suppression.why(alert, now)
                if why is None:
                    firing.append(alert)  # an escalation held back before goes now, once
                elif known.get(alert.alert_id) != (why := f"escalation held back: {why}"):
                    held[alert.alert_id] = why  # newly held (or for another reason): recorded
            if held:
                emit(self._held_back(group, receiver, tier_index, held, now))
            if firing:
                seq = group.tier_seq.get((tier_index, receiver), 0) + 1
                due_at = max(min(a.starts_at + tier.after for a in firing), retry_at)
                self._decide(group, receiver, tier_index, seq, firing, [], now, notifications, due_at)

    def _held_back(self, group: Group, receiver: str, tier: int, why: dict[str, str], now: float) -> NotificationLogged:
        """The log entry of alerts held back from ``receiver`` (its id: the same reasons, the same id)."""
        items = sorted(why.items())
        return NotificationLogged(
            event_id=derived_event_id(group.key, group.created_at, receiver, tier, "suppressed", json.dumps(items)),
            receiver=receiver, group_key=group.key, outcome="suppressed", timestamp=now,
            app_name=group.labels.get("app", ""), tier=tier, suppressed=dict(items),
        )  # fmt: skip

    def _decide(self, group: Group, receiver: str, tier: int, seq: int, firing: list[Alert], resolved: list[Alert],
                now: float, notifications: list[Notification], due_at: float) -> None:  # fmt: skip
        notification = Notification(
            notification_id=derived_event_id(group.key, group.created_at, receiver, tier, seq),
            receiver=receiver,
            group_key=group.key,
            group_labels=dict(group.labels),
            route_id=group.route.id,
            tier=tier,
            seq=seq,
            app_name=group.labels.get("app", ""),
            firing=tuple(AlertView.of(a) for a in firing),
            resolved=tuple(AlertView.of(a) for a in resolved),
            dependents=self.suppression.dependents({a.app for a in firing}),
            created_at=now,
            valid_for=self.forwarding.valid_for(receiver),
            due_at=due_at,
        )
        self.in_flight.add(notification.key)
        notifications.append(notification)

    def due(self, now: float, owns: Owns = everything) -> list[float]:
        """Each owned group's flush, unless its delivery is in flight (its end wakes the timer);
        each escalation tier's time, or its retry after a failure. One due already waits, held
        back, for an input or a silence's end."""
        due: list[float] = []
        for group in self.book.groups.values():
            if not owns(group.key):
                continue  # its owner decides; its log entries (or a takeover) wake this one
            if (group.key, group.receiver, 0) not in self.in_flight:
                due.append(group.next_flush)
            for _, tier, _, retry_at, waiting in self._tiers(group):
                due += [at for a in waiting if (at := max(a.starts_at + tier.after, retry_at)) > now]
        return due

    def tidy(self, now: float, owns: Owns) -> None:
        """What a flush would drop from a group another member owns, where no log entry will
        say it: alerts that resolved long ago without ever being announced, and groups left
        empty. Without it, a standby's memory would keep every blip."""
        for group in list(self.book.groups.values()):
            if owns(group.key):
                continue
            for alert_id in list(group.alerts):
                alert = self.book.alerts.get(alert_id)
                ended = alert is not None and alert.ends_at is not None and alert.ends_at < now - TIDY_AFTER
                if ended and alert_id not in group.notified:
                    self.book.leave_group(group, alert_id)
            if not group.alerts and (group.key, group.receiver, 0) not in self.in_flight:
                del self.book.groups[group.key]
