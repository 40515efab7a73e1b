"""The recovery service's composition root, on the service host: it follows the apps in KV,
wires the parts one ``FailureDetected`` goes through, top to bottom (README: "The parts"),
rebuilds their state from the state feed, then pulls work::

    work.WorkFeed ─▶ decisions.Decisions ─▶ runner.ActionRunner ─▶ records.StreamRecords
                                                  └─▶ rolling.RollingRestart

SIGTERM drains the work feed (the actions in flight get ``drain_seconds``), then closes
what was opened, in reverse order, each step bounded.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from autoserve_config import AppSpec
from autoserve_events import APPS_BUCKET, EVENTS_STREAM
from autoserve_runtime import PullConsumer, count_published, follow_apps
from autoserve_runtime.host import Host, HostedService, Plan, Watch

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
REPLAY_SECONDS = 120.0  # the state feed's catch-up before work is taken anyway


class RecoveryService(HostedService):
    name = SERVICE

    def __init__(self, nats_url: str, settings: RecoverySettings | None = None) -> None:
        super().__init__(nats_url)
        self.settings = s = settings or RecoverySettings()
        self.apps: dict[str, AppSpec] = {}
        self.state = RecoveryState()
        self.fold = StateFold(self.state)
        self.runtimes = LocalRuntimes(None, ProcessRuntime(s.process_dir) if s.process_dir else None)
        self.lb = NginxUpstreams(s.nginx) if s.nginx else None
        self.health = HealthChecks()  # the app's own health check, run directly (rolling restart)
        self.records: StreamRecords | None = None
        self.work: WorkFeed | None = None
        self._counts: PullConsumer | None = None

    @property
    def client_name(self) -> str:
        return f"autoserve-recovery-{self.settings.replica}"

    @property
    def state_seq(self) -> int:
        return self.fold.seq

    def _on_apps(self, apps: dict[str, AppSpec], _written_at: float | None) -> None:
        self.apps = apps
        self.runtimes.configure(apps)

    def spec(self, app_name: str) -> AppSpec | None:
        return self.apps.get(app_name)

    async def open(self, host: Host) -> None:
        s = self.settings
        host.closing(self.health.close)
        if s.docker if s.docker is not None else docker_socket_available():
            docker = self.runtimes.docker = await DockerRuntime(url=s.docker_url).start()
            host.closing(docker.close, timeout=5.0)

    def plan(self) -> Plan:
        # No decision before the apps are known: an unknown app is refused, not remedied.
        return Plan(watches=[Watch(APPS_BUCKET, follow_apps, self._on_apps)], config_wait=None)

    async def prepare(self, host: Host) -> None:
        """The parts, in the order one input goes through them; then their state."""
        s, js = self.settings, host.js
        counts = PullConsumer(SERVICE, js, EVENTS_STREAM, WORK_DURABLE)  # /metrics: counts and lag
        claims = Claims(await claims_bucket(js), s.replica, s.lease_seconds)
        self.records = records = StreamRecords(js, count_published(SERVICE, host.publisher.submit), self.state, counts)
        leases = InstanceLeases(claims, self.fold, records, s.lease_seconds)
        runner = ActionRunner(self.state, claims, self.runtimes, self.lb, self.fold, records, s.replica)
        decisions = Decisions(self.state, self.spec, self.runtimes, leases, runner, s.limits, records.announce,
                              balancing=self.lb is not None)  # fmt: skip
        rolling = runner.rolling = RollingRestart(
            self.state, self.runtimes, self.lb, self.health, leases, records, decisions.restore_left_out,
            self.spec, replica=s.replica, watch_seconds=s.history_seconds,
        )  # fmt: skip
        host.closing(rolling.close)
        self.fold.on_health = decisions.announce_panic
        self.work = WorkFeed(SERVICE, decisions, self.fold, counts, host.publisher, concurrency=s.concurrency,
                             drain_seconds=s.drain_seconds, retry_seconds=s.lease_seconds)  # fmt: skip
        self._counts = counts

        started = time.monotonic()
        state = await state_feed(js, self.fold.on_message).start(since=time.time() - s.history_seconds)
        host.closing(state.stop)
        if not await state.caught_up(timeout=REPLAY_SECONDS):
            log.warning("replay did not finish in time; continuing", seq=self.fold.seq)
        self.fold.live = True
        log.info("state rebuilt", seq=self.fold.seq, seconds=round(time.monotonic() - started, 3),
                 instances=len(self.state.instances), replica=s.replica)  # fmt: skip

    async def started(self, host: Host) -> None:
        assert self.work is not None and self._counts is not None
        sub = await work_subscription(host.js, self.settings.lease_seconds)
        self._counts.bound(sub)
        host.closing(sub.unsubscribe, timeout=2.0)
        self.work.start(sub, host.stopping)
        host.closing(self.work.drain, timeout=self.settings.drain_seconds + 10.0)

    def stopped(self) -> dict[str, Any]:
        return {"replica": self.settings.replica, "executed": len(self.records.executed) if self.records else 0}


__all__ = ["LADDER", "RecoveryService", "RecoverySettings"]
