"""The alerter's composition root: config from KV, the replay, the durable consumer, the
timer and the dispatcher around the pure core.

Start-up: (1) fold, without publishing, the alerting-relevant events of the last
``alerting.history`` up to the durable consumer's ack floor; (2) consume live from there
and wait until the backlog is folded, the alerter's own notification log included; (3) only
then tick. So a restarted alerter knows what it sent and sends it not again, and any
group flush or escalation that fell due while it was down is due at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

import aiohttp
import structlog
from nats.js import JetStreamContext

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
from autoserve_events.subjects import EVENTS_WILDCARD
from autoserve_runtime import (
    ConsumerSpec,
    EventConsumer,
    EventPublisher,
    cancel_all,
    close_nats,
    connect,
    follow_apps,
    provision,
)

from .adapters.dispatch import Dispatcher
from .adapters.receivers import build_receivers
from .adapters.settings import follow_alerting_settings
from .core.alerter import Alerter, Notification

log = structlog.get_logger("autoserve.alerter")

SERVICE = "alerter"
CONSUMER = ConsumerSpec.of(durables.ALERTER)  # the fold ignores the few types it does not use
CONFIG_WAIT_SECONDS = 10.0
# The timer sleeps until the core's next due time, woken at once by inputs and ended
# deliveries; this bounds the sleep anyway (a due time the core did not foresee, a clock step).
MAX_SLEEP_SECONDS = 60.0
TICK_ERROR_LOG_EVERY = 60.0  # a tick that keeps failing is logged once a minute, with a count
# Inputs that can make something due sooner even when they cause no event themselves: a
# silence (its end), an acknowledgement, a health verdict (a dependency's state).
WAKING = (SilenceCreated, AlertAcknowledged, HealthChanged)


class AlerterService:
    def __init__(
        self,
        nats_url: str,
        *,
        tick_seconds: float = 0.05,
        backoff: tuple[float, float] = (0.5, 30.0),
        max_sleep: float = MAX_SLEEP_SECONDS,
    ) -> None:
        self.nats_url = nats_url
        self.core = Alerter()
        self.apps: dict[str, AppSpec] = {}
        self.tick_seconds = tick_seconds  # the wait when the core's due time is already past (never a spin)
        self.max_sleep = max_sleep
        self.ticks = 0  # ticks that ran (tests: an idle alerter does not tick)
        self.ready = asyncio.Event()
        self.consumer: EventConsumer | None = None
        self.publisher: EventPublisher | None = None
        self.dispatcher = Dispatcher(self._delivered, initial_backoff=backoff[0], max_backoff=backoff[1])
        self.replayed = 0
        self.notifications: deque[Notification] = deque(maxlen=1000)  # the latest decided here (tests, logs)
        self.ticked_at: float | None = None  # the time of the last tick that completed
        self.tick_errors = 0
        self._session: aiohttp.ClientSession | None = None
        self._apps_loaded = asyncio.Event()
        self._settings_loaded = asyncio.Event()
        self._wakeup = asyncio.Event()

    # -- configuration ---------------------------------------------------------------------

    def _on_apps(self, apps: dict[str, AppSpec], _written_at: float | None) -> None:
        self.apps = apps
        self.core.set_apps(apps)
        self._apps_loaded.set()
        self._wakeup.set()  # dependencies or apps changed: what is due may have too

    def _on_settings(self, config: AlertingConfig) -> None:
        self.core.configure(config)
        if self._session is not None:
            self.dispatcher.receivers = build_receivers(config.receivers, self._session)
            for name, receiver in self.dispatcher.receivers.items():
                problem = getattr(receiver, "problem", None)
                if problem:
                    log.error("receiver misconfigured; its notifications will fail", receiver=name, problem=problem)
        log.info("alerting settings loaded", receivers=sorted(config.receivers), enabled=config.enabled,
                 windows=[w.name for w in config.maintenance_windows])  # fmt: skip
        self._settings_loaded.set()
        self._wakeup.set()  # new timers (group_wait, windows, resend intervals)

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        nc = await connect(self.nats_url, "autoserve-alerter")
        js = nc.jetstream()
        await provision(js)
        self._session = aiohttp.ClientSession(headers={"User-Agent": "AutoServe-Alerter/1.0"})
        tasks = [
            asyncio.create_task(follow_apps(await js.key_value(APPS_BUCKET), self._on_apps), name="follow-apps"),
            asyncio.create_task(
                follow_alerting_settings(await js.key_value(SETTINGS_BUCKET), self._on_settings), name="follow-alerting"
            ),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(self._apps_loaded.wait(), self._settings_loaded.wait()),
                                   CONFIG_WAIT_SECONDS)  # fmt: skip
        self.publisher = publisher = EventPublisher(js).start()
        self.consumer = consumer = EventConsumer(js, publisher, CONSUMER, SERVICE, self._process)
        try:
            started = time.monotonic()
            floor = await consumer.ack_floor()
            history = parse_duration(self.core.config.history)
            self.replayed = await consumer.replay(time.time() - history, floor, EVENTS_WILDCARD)
            await consumer.start()
            await self._caught_up(js)
            log.info("state rebuilt", replayed=self.replayed, up_to_seq=floor, alerts=len(self.core.active_alerts()),
                     groups=len(self.core.groups), seconds=round(time.monotonic() - started, 3))  # fmt: skip
            tasks.append(asyncio.create_task(self._tick_forever(), name="alerter-timer"))
            self.ready.set()
            log.info("alerter started", nats=self.nats_url)
            await stop.wait()
        finally:
            log.info("alerter stopping")
            await cancel_all(tasks)
            await consumer.stop()
            await self.dispatcher.close()
            await publisher.close()
            await self._session.close()
            await close_nats(nc)
            log.info("alerter stopped", sent=self.dispatcher.sent, failed=self.dispatcher.failed,
                     **vars(consumer.stats))  # fmt: skip

    async def _caught_up(self, js: JetStreamContext, timeout: float = 60.0) -> None:
        """Until the live consumer has folded what was stored before it started: the
        notification log above the ack floor must be known before anything is sent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await js.consumer_info(CONSUMER.stream, CONSUMER.durable)
            delivered = info.delivered.stream_seq if info.delivered else 0
            highest = self.consumer.highest_seq if self.consumer is not None else 0
            if info.num_pending == 0 and (info.num_ack_pending == 0 or highest >= delivered):
                return
            await asyncio.sleep(0.02)
        log.warning("backlog not folded in time; continuing")

    def _process(self, event: AnyEvent) -> list[Event]:
        out = self.core.handle(event)
        # Wake the timer when something may be due sooner: a new alert (group_wait 0), a
        # resolve, an acknowledgement, a silence. A failure that only keeps an alert alive
        # moves its due time later, so an alert storm does not tick once per event.
        if out or isinstance(event, WAKING):
            self._wakeup.set()
        return out

    # -- the timer -------------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        """Tick, then sleep until the core's next due time (at most ``max_sleep``) or until
        woken: by an input that may make something due sooner (``_process``), a delivery
        that ended (``_delivered``), or new settings. The wake flag is cleared before the
        tick, so an input folded while it runs wakes the next sleep at once."""
        logged_at = float("-inf")
        while True:
            self._wakeup.clear()
            now = time.time()
            wait = self.tick_seconds  # after a failed tick: try again soon, not in a spin
            try:
                self.tick(now)
                if self.core.config.enabled:
                    wait = self.core.next_due(now) - time.time()
                    if wait <= 0:
                        wait = self.tick_seconds  # due but not done (cannot be, as the core goes): no spin
                else:
                    wait = self.max_sleep  # disabled: settings wake it
            except Exception:
                # One bad decision must not stop every later notification: log it and go on.
                self.tick_errors += 1
                if time.monotonic() - logged_at >= TICK_ERROR_LOG_EVERY:
                    logged_at = time.monotonic()
                    log.exception("alerter tick failed; ticking on", errors=self.tick_errors)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), min(wait, self.max_sleep))

    def tick(self, now: float) -> None:
        if self.core.config.enabled:
            decisions = self.core.tick(now, tuple(self.apps))
            for event in decisions.events:
                self._publish(event)
            for notification in decisions.notifications:
                self.notifications.append(notification)
                self.dispatcher.submit(notification)
        self.ticked_at = now
        self.ticks += 1

    def _delivered(
        self, notification: Notification, outcome: NotificationOutcome, attempts: int, error: str | None
    ) -> None:
        log_entry = self.core.delivered(notification, outcome, time.time(), attempts, error)
        if log_entry is not None:  # a re-send to Alertmanager is not logged
            self._publish(log_entry)
        self._wakeup.set()  # the group may have more to say now

    def _publish(self, event: Event) -> None:
        if self.publisher is None:
            raise RuntimeError("the alerter publishes only once it runs")
        self.publisher.submit(event)
