"""The prober's composition root: the target sources, the workers and the publisher, on the
service host.

Every prober process is a member of the prober (``--workers N`` shards included: each is
one member, named ``<member>-w<i>``), and probes the targets it owns by rendezvous hashing
over the live members (``core.targets.Owners``). When the members change, the targets are
planned again at once: a member's targets go to the others when it leaves or its key
expires. Taken over from a member that stopped gracefully, they keep their slots (the
phase grid is shared); from one that died, they are probed at once (their last probe may
be a TTL old): ``core.targets.takeover_since``. A member that joins catches up the slots
of its share that passed while it loaded the config (the others dropped them at its join).
"""

from __future__ import annotations

import asyncio
import time
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
from .core.targets import Container, Owners, TargetKey, desired_targets, taken_over, takeover_since
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
        self._members: frozenset[str] = frozenset()  # the members at the last change
        self._heard: dict[str, float] = {}  # when each member's last renewal arrived (monotonic)
        self._joined_at: float | None = None  # (wall) while the first targets are not planned yet

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
        self.workers = workers = ProbeWorkers(Prober(http).probe, submit, room=host.publisher, owns=self._owns_key)
        host.closing(workers.stop_all)
        membership = self.membership
        assert membership is not None
        self._owners = Owners(membership.member)
        self._members = membership.members
        if membership.members - {membership.member}:  # others had our share until we joined
            self._joined_at = membership.started_at
        membership.on_change.append(self._on_members)
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
        host.spawn(self._note_renewals(), "member-renewals")
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

    def _on_members(self) -> None:
        """The members or this member's fencing changed: plan the targets again now."""
        membership = self.membership
        assert membership is not None
        departed = self._members - membership.members
        since = takeover_since(departed, self._heard, time.monotonic(), time.time(), membership.ttl)
        self._members = membership.members
        self._reconcile(None, taken_since=since)

    async def _note_renewals(self) -> None:
        """Remember when each member was last heard from, beyond its removal from the view:
        what tells a graceful leave from a death (``takeover_since``)."""
        membership = self.membership
        assert membership is not None
        while True:
            now, view = time.monotonic(), membership.view.heard
            kept = {m: at for m, at in self._heard.items() if now - at < 10 * membership.ttl}
            self._heard = kept | view
            await asyncio.sleep(membership.ttl / 6)

    def _on_containers(self, containers: dict[str, Container], started: dict[str, float]) -> None:
        self.containers = containers
        self.container_started = started
        self._reconcile(None)

    def _reconcile(self, written_at: float | None, *, taken_since: float | None = None) -> None:
        """``initial_delay_seconds`` counts from when an instance appeared: a container's
        start, or the config write that added it while the prober ran. Targets known at
        start-up are probed without that delay, or a prober restart would blind it for the
        delay. ``taken_since``: the members changed, and targets gained from another member
        catch up the slots they missed since then."""
        assert self.workers is not None
        every = desired_targets(self.apps, self.containers)
        desired = {key: target for key, target in every.items() if self._owns_key(key)}
        appeared: dict[TargetKey, float] = {}
        for key, target in desired.items():
            if key in self.workers.targets:
                continue
            if target.container_id is not None:
                if target.container_id in self.container_started:
                    appeared[key] = self.container_started[target.container_id]
            elif written_at is not None:
                appeared[key] = written_at
        since: dict[TargetKey, float] = {}
        if taken_since is not None:
            since = dict.fromkeys(taken_over(desired, self.workers.targets, self._known), taken_since)
        if self._joined_at is not None and self.apps:
            since = {key: self._joined_at for key in desired if key not in appeared} | since
            self._joined_at = None
        self._known = set(every)
        self.workers.apply(desired, appeared, since)
