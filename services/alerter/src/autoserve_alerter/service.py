"""The alerter's composition root: config from KV, the replay, the durable consumer, the
timer and the dispatcher around the pure core, on the service host.

Start-up: (1) fold, without publishing, the alerting-relevant events of the last
``alerting.history`` up to the durable consumer's ack floor; (2) consume live from there
and wait until the backlog is folded, the alerter's own notification log included; (3) only
then tick. So a restarted alerter knows what it sent and sends it not again, and any
group flush or escalation that fell due while it was down is due at once.

Replicas: every member folds every event (each has a durable of its own, its member slot's),
so each holds the state of every group; each group is notified by one member, its owner by
rendezvous hashing over the live members (``membership.owns``). When a member dies, the
others own its groups once its membership key expires, and flush what is due at once; what
its log entries say was sent is not sent again.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import replace
from typing import Any

import aiohttp
import structlog

from autoserve_config import AlertingConfig, AppSpec, parse_duration
from autoserve_events import (
    APPS_BUCKET,
    SETTINGS_BUCKET,
    AlertAcknowledged,
    AnyEvent,
    Event,
    HealthChanged,
    SilenceCreated,
    durables,
)
from autoserve_events.catalogue import NotificationOutcome
from autoserve_runtime import ConsumerSpec, add_counter, follow_apps
from autoserve_runtime.host import Consume, Host, HostedService, Plan, Watch
from autoserve_runtime.membership import MEMBER_SLOTS, slot_durable
from autoserve_runtime.ownership import owner_of
from autoserve_runtime.timer import DueTimer

from .adapters.dispatch import Dispatcher
from .adapters.receivers import build_receivers
from .adapters.settings import follow_alerting_settings
from .core.alerter import Alerter, Notification
from .core.handover import FORGET_AFTER, Handover

log = structlog.get_logger("autoserve.alerter")

SERVICE = "alerter"
CONSUMER = ConsumerSpec.of(durables.ALERTER)  # the fold ignores the few types it does not use
MAX_SLEEP_SECONDS = 60.0
# Inputs that can make something due sooner even when they cause no event themselves: a
# silence (its end), an acknowledgement, a health verdict (a dependency's state).
WAKING = (SilenceCreated, AlertAcknowledged, HealthChanged)


class AlerterService(HostedService):
    name = SERVICE
    member_slots = MEMBER_SLOTS  # a durable each: every member folds every event

    def __init__(
        self,
        nats_url: str,
        *,
        tick_seconds: float = 0.05,
        backoff: tuple[float, float] = (0.5, 30.0),
        max_sleep: float = MAX_SLEEP_SECONDS,
    ) -> None:
        super().__init__(nats_url)
        self.core = Alerter()
        self.apps: dict[str, AppSpec] = {}
        self.ticks = 0  # ticks that ran (tests: an idle alerter does not tick)
        self.dispatcher = Dispatcher(self._delivered, initial_backoff=backoff[0], max_backoff=backoff[1])
        self.notifications: deque[Notification] = deque(maxlen=1000)  # the latest decided here (tests, logs)
        self.ticked_at: float | None = None  # the time of the last tick that completed
        self._session: aiohttp.ClientSession | None = None
        self.timer = DueTimer(SERVICE, self._step, min_wait=tick_seconds, max_wait=max_sleep)
        self.handover = Handover(me="", started_at=time.time())
        self.maybe_repeated: dict[tuple[str, str], int] = {}  # (receiver, type) -> notifications
        self._owners_before: frozenset[str] = frozenset()
        self._last_seen: dict[str, float] = {}  # member -> its last renewal seen (wall clock)

    def _on_apps(self, apps: dict[str, AppSpec], _written_at: float | None) -> None:
        self.apps = apps
        self.core.set_apps(apps)
        self.timer.wakeup.set()  # dependencies or apps changed: what is due may have too

    def _on_settings(self, config: AlertingConfig) -> None:
        self.core.configure(config)
        if self._session is not None:
            self.dispatcher.use(build_receivers(config.receivers, self._session))
        log.info("alerting settings loaded", receivers=sorted(config.receivers), enabled=config.enabled,
                 windows=[w.name for w in config.maintenance_windows])  # fmt: skip
        self.timer.wakeup.set()  # new timers (group_wait, windows, resend intervals)

    # -- on the service host --------------------------------------------------------------

    async def open(self, host: Host) -> None:
        self._session = aiohttp.ClientSession(headers={"User-Agent": "AutoServe-Alerter/1.0"})
        host.closing(self._session.close)
        host.closing(self.dispatcher.close)
        assert self.membership is not None
        self.handover.me = self.membership.member
        self.core.owns = self._owns
        self._owners_before = self._owners()
        self.membership.on_change.append(self._on_members)
        add_counter("alerter_notifications_maybe_repeated",
                    "Notifications sent after a takeover (or a restart) that the previous owner of the group may "
                    "have sent already, unlogged: a receiver that ignores the id (Slack, email) shows them twice",
                    lambda: dict(self.maybe_repeated), ("receiver", "type"))  # fmt: skip

    def plan(self) -> Plan:
        # The whole notification log above the ack floor is folded before anything is sent.
        assert self.membership is not None
        consumer = replace(CONSUMER, durable=slot_durable(CONSUMER.durable, self.membership.slot))
        return Plan(
            watches=[
                Watch(APPS_BUCKET, follow_apps, self._on_apps),
                Watch(SETTINGS_BUCKET, follow_alerting_settings, self._on_settings),
            ],
            consumes=[Consume(consumer, self._process, self._history_seconds, catch_up=True)],
        )

    # -- ownership: one member notifies each group ----------------------------------------

    def _owns(self, key: str) -> bool:
        return self.membership is None or self.membership.owns(key)

    def _owners(self) -> frozenset[str]:
        """The members ownership is computed over now: while this one is fenced, the others
        own its groups."""
        m = self.membership
        if m is None:
            return frozenset()
        return m.members - {m.member} if m.fenced else m.members | {m.member}

    def owns_what(self) -> str:
        owned = sum(1 for key in self.core.groups if self._owns(key))
        return f"{owned} of {len(self.core.groups)} groups"

    def _on_members(self) -> None:
        """Members or fencing changed: remember the groups taken from another member (for the
        repeat count), and wake the timer: what they have due is ours now."""
        self._seen_renewals()
        before, after = self._owners_before, self._owners()
        self._owners_before = after
        now = time.time()
        ttl = self.membership.ttl if self.membership is not None else 0.0

        def alive_until(member: str) -> float:
            # A previous owner may act until its lease lapses (last renewal + TTL), and a
            # renewal is seen here up to a third of a TTL late.
            return self._last_seen.get(member, now) + ttl * 4 / 3

        if before and after:
            taken = self.handover.moved(self.core.groups, lambda k: owner_of(k, before), lambda k: owner_of(k, after),
                                        alive_until)  # fmt: skip
            if taken:
                log.info("groups taken over", groups=taken, members=sorted(after))
        self.handover.forget(self.core.groups, now)
        self.timer.wakeup.set()

    def _seen_renewals(self) -> None:
        if self.membership is not None:
            for member, record in self.membership.view.records.items():
                self._last_seen[member] = max(self._last_seen.get(member, 0.0), record.renewed_at)
            # Members named host-pid come and go with every restart: forget the long gone.
            horizon = time.time() - FORGET_AFTER
            self._last_seen = {m: at for m, at in self._last_seen.items() if at >= horizon}

    async def _watch_renewals(self) -> None:
        """Each member's last renewal, sampled every third of a TTL: when one dies, its
        record is gone from the view before the change is told."""
        while self.membership is not None:
            self._seen_renewals()
            await asyncio.sleep(self.membership.ttl / 3)

    def _history_seconds(self) -> float:
        return parse_duration(self.core.config.history)

    async def started(self, host: Host) -> None:
        host.spawn(self._watch_renewals(), "alerter-renewals")
        host.spawn(self.timer.run(), "alerter-timer")

    def stopped(self) -> dict[str, Any]:
        return {
            "sent": self.dispatcher.sent,
            "failed": self.dispatcher.failed,
            "alerts": len(self.core.active_alerts()),
        }

    def _process(self, event: AnyEvent) -> list[Event]:
        out = self.core.handle(event)
        # Wake the timer when something may be due sooner: a new alert (group_wait 0), a
        # resolve, an acknowledgement, a silence. A failure that only keeps an alert alive
        # moves its due time later, so an alert storm does not tick once per event.
        if out or isinstance(event, WAKING):
            self.timer.wakeup.set()
        return out

    # -- the timer (autoserve_runtime.timer): woken by ``_process``, ``_delivered`` and settings --

    def _step(self, now: float) -> float | None:
        assert self.publisher is not None
        if self.membership is not None and self.membership.fenced:
            return None  # our lease may have lapsed: decide nothing; the end of it wakes us
        if self.core.config.enabled:
            decisions = self.core.tick(now, tuple(self.apps))
            for event in decisions.events:
                self.publisher.submit(event)
            for notification in decisions.notifications:
                self.notifications.append(notification)
                self.dispatcher.submit(notification)
        self.ticked_at = now
        self.ticks += 1
        return self.core.next_due(now) if self.core.config.enabled else None

    @property
    def tick_errors(self) -> int:
        return self.timer.errors

    def _delivered(
        self, notification: Notification, outcome: NotificationOutcome, attempts: int, error: str | None
    ) -> None:
        if outcome == "sent" and self.handover.maybe_repeated(notification):
            receiver = self.dispatcher.receivers.get(notification.receiver)
            kind = type(receiver).__name__.removesuffix("Receiver").lower() if receiver is not None else ""
            key = (notification.receiver, kind)
            self.maybe_repeated[key] = self.maybe_repeated.get(key, 0) + 1
            log.warning("notification may repeat one a previous owner of its group sent and had not logged",
                        receiver=notification.receiver, group=notification.group_key,
                        notification=notification.notification_id)  # fmt: skip
        log_entry = self.core.delivered(notification, outcome, time.time(), attempts, error)
        if log_entry is not None and self.publisher is not None:  # a re-send to Alertmanager is not logged
            self.publisher.submit(log_entry)
        self.timer.wakeup.set()  # the group may have more to say now
