"""The prober's composition root: the target sources, the workers and the publisher, on the
service host.

Every prober process is a member of the prober (``--workers N`` shards included: each is
one member, named ``<member>-w<i>``), and probes the targets it owns by rendezvous hashing
over the live members (``core.targets.Owners``). When the members change, the targets are
planned again at once: a member's targets go to the others when it leaves or its key
expires, and the taken-over ones are probed at once (their last probe may be a TTL old).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from autoserve_config import AppSpec
from autoserve_events import APPS_BUCKET, Event
from autoserve_probes import HttpProbe, Prober
from autoserve_runtime import EventPublisher, add_counter, add_gauge, count_published, follow_apps
from autoserve_runtime.host import Host, HostedService, Plan, Watch
from autoserve_runtime.membership import default_member

from .adapters.docker_source import DockerSource, docker_available
from .core.targets import Container, Owners, TargetKey, desired_targets, taken_over
from .workers import ProbeWorkers

log = structlog.get_logger("autoserve.prober")


class ProberService(HostedService):
    name = "prober"

    def __init__(
        self,
        nats_url: str,
        *,
        shard: int = 0,
        shards: int = 1,
        docker: bool | None = None,
        container_stats_seconds: float = 15.0,
    ) -> None:
        super().__init__(nats_url)
        self.shard = shard
        self.shards = shards
        if shards > 1:  # one host's shards are distinct members
            self.member = default_member(f"-w{shard}")
        self.use_docker = docker_available() if docker is None else docker
        self.container_stats_seconds = container_stats_seconds
        self.apps: dict[str, AppSpec] = {}
        self.containers: dict[str, Container] = {}
        self.container_started: dict[str, float] = {}
        self.workers: ProbeWorkers | None = None
        self._docker: DockerSource | None = None
        self._host: Host | None = None
        self._owners: Owners | None = None
        self._known: set[TargetKey] = set()  # every member's targets, at the last reconcile

    @property
    def client_name(self) -> str:
        return f"autoserve-prober-{self.shard}"

    def owns_what(self) -> str:
        return f"{len(self.workers.targets) if self.workers else 0} targets"

    async def open(self, host: Host) -> None:
        self._host = host
        submit = self._observe(host.publisher)
        http = await HttpProbe().start()
        host.closing(http.close)
        self.workers = workers = ProbeWorkers(Prober(http).probe, submit, room=host.publisher)
        host.closing(workers.stop_all)
        assert self.membership is not None
        self._owners = Owners(self.membership.member)
        self.membership.on_change.append(lambda: self._reconcile(None, moved=True))
        if self.use_docker:
            self._docker = DockerSource(
                self._on_containers, submit, self._owns, stats_seconds=self.container_stats_seconds
            )
        else:
            log.info("no Docker engine socket: container discovery off")

    def plan(self) -> Plan:
        # Not ready before the targets are known: a prober that probes nothing says so.
        return Plan(watches=[Watch(APPS_BUCKET, follow_apps, self._on_apps)], config_wait=None)

    async def started(self, host: Host) -> None:
        if self._docker is not None:
            host.spawn(self._docker.run(), "docker-discovery")

    def stopped(self) -> dict[str, Any]:
        stats = self.publisher.stats if self.publisher else None
        member = self.membership.member if self.membership else None
        return {
            "member": member,
            "shard": self.shard,
            "published": stats.acked if stats else 0,
            "stalls": stats.stalls if stats else 0,
        }

    def _observe(self, publisher: EventPublisher) -> Callable[[Event], None]:
        """/metrics: probes by result (rate() gives probes per second), targets, missed slots."""
        add_gauge("probe_targets", "Targets this prober member owns and probes", lambda: len(self.workers.targets))
        add_counter("probe_missed_slots", "Probe slots skipped: the probe before overran", self._missed_slots)
        return count_published("prober", publisher.submit)

    def _missed_slots(self) -> int:
        return self.workers.stats.missed_slots if self.workers else 0

    def _on_apps(self, apps: dict[str, AppSpec], written_at: float | None) -> None:
        self.apps = apps
        if self._docker is not None:
            self._docker.watch_labels({name: spec.docker.label for name, spec in apps.items() if spec.docker})
        self._reconcile(written_at)

    def _owns(self, app_name: str, instance_id: str) -> bool:
        return self._owns_key((app_name, instance_id))

    def _owns_key(self, key: TargetKey) -> bool:
        membership, owners = self.membership, self._owners
        if membership is None or owners is None:
            return True
        stopping = self._host is not None and self._host.stopping.is_set()
        return owners.owns(key, membership.members, fenced=membership.fenced, stopping=stopping)

    def _on_containers(self, containers: dict[str, Container], started: dict[str, float]) -> None:
        self.containers = containers
        self.container_started = started
        self._reconcile(None)

    def _reconcile(self, written_at: float | None, *, moved: bool = False) -> None:
        """``initial_delay_seconds`` counts from when an instance appeared: a container's
        start, or the config write that added it while the prober ran. Targets known at
        start-up are probed without that delay, or a prober restart would blind it for the
        delay. ``moved``: the members (or this member's fencing) changed; targets it gains
        that existed before were another member's, and are probed at once."""
        assert self.workers is not None
        every = desired_targets(self.apps, self.containers)
        desired = {key: target for key, target in every.items() if self._owns_key(key)}
        at_once = taken_over(desired, self.workers.targets, self._known) if moved else set()
        self._known = set(every)
        appeared: dict[TargetKey, float] = {}
        for key, target in desired.items():
            if key in self.workers.targets:
                continue
            if target.container_id is not None:
                if target.container_id in self.container_started:
                    appeared[key] = self.container_started[target.container_id]
            elif written_at is not None:
                appeared[key] = written_at
        self.workers.apply(desired, appeared, at_once)
