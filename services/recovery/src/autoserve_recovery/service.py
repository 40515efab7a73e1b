"""The recovery service's composition root: it connects, provisions, follows the apps in KV,
rebuilds state from the state feed, then wires the parts one ``FailureDetected`` goes
through, top to bottom (README: "The parts")::

    work.WorkFeed ─▶ decisions.Decisions ─▶ runner.ActionRunner ─▶ records.StreamRecords
                                                  └─▶ rolling.RollingRestart

SIGTERM drains the work feed (the actions in flight get ``drain_seconds``), then closes
what was opened, in reverse order, each step bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from autoserve_config import AppSpec
from autoserve_events import APPS_BUCKET, EVENTS_STREAM
from autoserve_runtime import (
    EventPublisher,
    PullConsumer,
    cancel_all,
    close_nats,
    connect,
    count_published,
    follow_apps,
    provision,
    watch_publisher,
)

from .adapters.claims import Claims, claims_bucket
from .adapters.docker import DockerRuntime, docker_socket_available
from .adapters.health import HealthChecks
from .adapters.nginx import NginxUpstreams
from .adapters.process import ProcessRuntime
from .core import RecoveryState
from .core.strategies import LADDER
from .decisions import Decisions
from .feeds import WORK_DURABLE, StateFold, state_feed, work_subscription
from .leases import InstanceLeases
from .records import StreamRecords
from .rolling import RollingRestart
from .runner import ActionRunner
from .runtimes import LocalRuntimes
from .settings import RecoverySettings
from .work import WorkFeed

log = structlog.get_logger("autoserve.recovery")
SERVICE = "recovery"


class RecoveryService:
    def __init__(self, nats_url: str, settings: RecoverySettings | None = None) -> None:
        self.nats_url = nats_url
        self.settings = s = settings or RecoverySettings()
        self.ready = asyncio.Event()
        self.apps: dict[str, AppSpec] = {}
        self.state = RecoveryState()
        self.fold = StateFold(self.state)
        self.runtimes = LocalRuntimes(None, ProcessRuntime(s.process_dir) if s.process_dir else None)
        self.lb = NginxUpstreams(s.nginx) if s.nginx else None
        self.health = HealthChecks()  # the app's own health check, run directly (rolling restart)
        self._apps_loaded = asyncio.Event()

    @property
    def state_seq(self) -> int:
        return self.fold.seq

    def _on_apps(self, apps: dict[str, AppSpec], _written_at: float | None) -> None:
        self.apps = apps
        self.runtimes.configure(apps)
        self._apps_loaded.set()

    def spec(self, app_name: str) -> AppSpec | None:
        return self.apps.get(app_name)

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        nc = await connect(self.nats_url, f"autoserve-recovery-{s.replica}")
        js = nc.jetstream()
        await provision(js)
        counts = PullConsumer(SERVICE, js, EVENTS_STREAM, WORK_DURABLE)  # /metrics: counts and lag
        claims = Claims(await claims_bucket(js), s.replica, s.lease_seconds)
        if s.docker if s.docker is not None else docker_socket_available():
            self.runtimes.docker = await DockerRuntime(url=s.docker_url).start()
        watcher = asyncio.create_task(follow_apps(await js.key_value(APPS_BUCKET), self._on_apps))
        await self._apps_loaded.wait()
        publisher = EventPublisher(js).start()
        watch_publisher(SERVICE, publisher)
        self.records = StreamRecords(js, count_published(SERVICE, publisher.submit), self.state, counts)

        # The parts, in the order one input goes through them.
        leases = InstanceLeases(claims, self.fold, self.records, s.lease_seconds)
        runner = ActionRunner(self.state, claims, self.runtimes, self.lb, self.fold, self.records, s.replica)
        decisions = Decisions(self.state, self.spec, self.runtimes, leases, runner, s.limits, self.records.announce,
                              balancing=self.lb is not None)  # fmt: skip
        rolling = runner.rolling = RollingRestart(
            self.state, self.runtimes, self.lb, self.health, leases, self.records, decisions.restore_left_out,
            self.spec, replica=s.replica, watch_seconds=s.history_seconds,
        )  # fmt: skip
        self.fold.on_health = decisions.announce_panic
        work = WorkFeed(SERVICE, decisions, self.fold, counts, publisher, concurrency=s.concurrency,
                        drain_seconds=s.drain_seconds, retry_seconds=s.lease_seconds)  # fmt: skip

        started = time.monotonic()
        state = await state_feed(js, self.fold.on_message).start(since=time.time() - s.history_seconds)
        if not await state.caught_up(timeout=120.0):
            log.warning("replay did not finish in time; continuing", seq=self.fold.seq)
        self.fold.live = True
        log.info("state rebuilt", seq=self.fold.seq, seconds=round(time.monotonic() - started, 3),
                 instances=len(self.state.instances), replica=s.replica)  # fmt: skip
        sub = await work_subscription(js, s.lease_seconds)
        counts.bound(sub)
        work.start(sub, stop)
        self.ready.set()
        try:
            await stop.wait()
        finally:
            log.info("recovery stopping", replica=s.replica, in_flight=work.in_flight)
            await work.drain()
            await cancel_all([watcher])
            await rolling.close()
            await self.health.close()
            # Every step is bounded: NATS may be going away at the same moment (``up`` stops
            # everything at once), and a drain against a dead server waits for its timeout.
            await state.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.unsubscribe(), 2)
            await publisher.close()
            if self.runtimes.docker is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.runtimes.docker.close(), 5)
            try:
                await asyncio.wait_for(close_nats(nc), 5)
            except TimeoutError:
                await nc.close()
            log.info("recovery stopped", executed=len(self.records.executed))


__all__ = ["LADDER", "RecoveryService", "RecoverySettings"]
