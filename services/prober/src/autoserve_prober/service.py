"""The prober's composition root: wires NATS, the target sources, the workers and the
publisher, and stops them in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from autoserve_config import AppSpec
from autoserve_events import APPS_BUCKET, Event
from autoserve_probes.http import HttpProbe
from autoserve_probes.probe import Prober
from autoserve_runtime import (
    EventPublisher,
    add_counter,
    add_gauge,
    cancel_all,
    close_nats,
    connect,
    count_published,
    follow_apps,
    provision,
    watch_publisher,
)

from .adapters.docker_source import DockerSource, docker_available
from .core.targets import Container, TargetKey, desired_targets, shard_of
from .workers import ProbeWorkers

log = structlog.get_logger("autoserve.prober")


class ProberService:
    def __init__(
        self,
        nats_url: str,
        *,
        shard: int = 0,
        shards: int = 1,
        docker: bool | None = None,
        container_stats_seconds: float = 15.0,
    ) -> None:
        self.nats_url = nats_url
        self.shard = shard
        self.shards = shards
        self.use_docker = docker_available() if docker is None else docker
        self.container_stats_seconds = container_stats_seconds
        self.apps: dict[str, AppSpec] = {}
        self.containers: dict[str, Container] = {}
        self.container_started: dict[str, float] = {}
        self.workers: ProbeWorkers | None = None
        self.publisher: EventPublisher | None = None
        self.ready = asyncio.Event()
        self._docker: DockerSource | None = None

    async def run(self, stop: asyncio.Event) -> None:
        nc = await connect(self.nats_url, f"autoserve-prober-{self.shard}")
        js = nc.jetstream()
        await provision(js)
        kv = await js.key_value(APPS_BUCKET)
        self.publisher = EventPublisher(js).start()
        submit = self._observe(self.publisher)
        http = await HttpProbe().start()
        self.workers = ProbeWorkers(Prober(http).probe, submit)
        tasks = [asyncio.create_task(follow_apps(kv, self._on_apps), name="follow-apps")]
        if self.use_docker:
            self._docker = DockerSource(
                self._on_containers, submit, self._owns, stats_seconds=self.container_stats_seconds
            )
            tasks.append(asyncio.create_task(self._docker.run(), name="docker-discovery"))
        else:
            log.info("no Docker engine socket: container discovery off")
        log.info("prober started", shard=self.shard, shards=self.shards, nats=self.nats_url)
        try:
            await stop.wait()
        finally:
            log.info("prober stopping")
            await cancel_all(tasks)
            await self.workers.stop_all()
            await self.publisher.close()
            await http.close()
            await close_nats(nc)
            log.info("prober stopped", published=self.publisher.stats.acked, dropped=self.publisher.stats.dropped)

    def _observe(self, publisher: EventPublisher) -> Callable[[Event], None]:
        """/metrics: probes by result (rate() gives probes per second), targets, missed slots."""
        watch_publisher("prober", publisher)
        add_gauge("probe_targets", "Targets this prober (shard) probes", lambda: len(self.workers.targets))
        add_counter("probe_missed_slots", "Probe slots skipped: the probe before overran", self._missed_slots)
        return count_published("prober", publisher.submit)

    def _missed_slots(self) -> int:
        return self.workers.stats.missed_slots if self.workers else 0

    def _on_apps(self, apps: dict[str, AppSpec], written_at: float | None) -> None:
        self.apps = apps
        if self._docker is not None:
            self._docker.watch_labels({name: spec.docker.label for name, spec in apps.items() if spec.docker})
        self._reconcile(written_at)
        self.ready.set()

    def _owns(self, app_name: str, instance_id: str) -> bool:
        return self.shards == 1 or shard_of((app_name, instance_id), self.shards) == self.shard

    def _on_containers(self, containers: dict[str, Container], started: dict[str, float]) -> None:
        self.containers = containers
        self.container_started = started
        self._reconcile(None)

    def _reconcile(self, written_at: float | None) -> None:
        """``initial_delay_seconds`` counts from when an instance appeared: a container's
        start, or the config write that added it while the prober ran. Targets known at
        start-up are probed at once, or a prober restart would blind it for the delay."""
        assert self.workers is not None
        desired = desired_targets(self.apps, self.containers, self.shard, self.shards)
        appeared: dict[TargetKey, float] = {}
        for key, target in desired.items():
            if key in self.workers.targets:
                continue
            if target.container_id is not None:
                if target.container_id in self.container_started:
                    appeared[key] = self.container_started[target.container_id]
            elif written_at is not None:
                appeared[key] = written_at
        self.workers.apply(desired, appeared)
