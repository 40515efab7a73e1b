"""Containers labelled for an app, through the Docker engine's API (aiodocker): discovery
of targets, and ``ContainerObserved`` events (engine events and periodic stats).

Listing is refreshed on every container start/stop/die/destroy event and, as a safety
net, every ``resync_seconds``. With several prober members, each observes only the
containers whose targets it owns. The Docker socket is privileged: the prober only reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime

import aiodocker
import structlog

from autoserve_events import ContainerObserved
from autoserve_runtime import cancel_all

from ..core.containers import observation_from_event, stats_observation
from ..core.targets import Container, short_id

log = structlog.get_logger("autoserve.prober.docker")

PORT_LABEL = "autoserve.port"
LISTING_EVENTS = frozenset({"start", "stop", "die", "destroy", "pause", "unpause", "rename"})

# (containers by id, when each started)
OnContainers = Callable[[dict[str, Container], dict[str, float]], None]
Publish = Callable[[ContainerObserved], object]
Owns = Callable[[str, str], bool]  # (app, instance) -> this member probes it


def docker_available() -> bool:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return not host.startswith("unix://") or os.path.exists(host.removeprefix("unix://"))


def match_app(labels: Mapping[str, str], selectors: Mapping[str, str]) -> str | None:
    """The app whose ``key=value`` label selector the container carries."""
    for app_name, selector in selectors.items():
        key, _, value = selector.partition("=")
        if labels.get(key) == value:
            return app_name
    return None


def to_container(app_name: str, inspected: Mapping) -> Container:
    labels = inspected["Config"].get("Labels") or {}
    network_mode = inspected["HostConfig"].get("NetworkMode", "")
    ip = None
    if network_mode != "host":
        for network in (inspected["NetworkSettings"].get("Networks") or {}).values():
            if network.get("IPAddress"):
                ip = network["IPAddress"]
                break
    port_label = labels.get(PORT_LABEL)
    return Container(
        container_id=inspected["Id"],
        app_name=app_name,
        ip=ip,
        port_label=int(port_label) if port_label and port_label.isdigit() else None,
    )


def started_at(inspected: Mapping) -> float | None:
    text = inspected.get("State", {}).get("StartedAt", "")
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(text[:26].rstrip("Z") + "+00:00").timestamp()
    return None


class DockerSource:
    def __init__(
        self,
        on_change: OnContainers,
        publish: Publish,
        owns: Owns,
        *,
        resync_seconds: float = 30.0,
        stats_seconds: float = 15.0,
    ) -> None:
        self._on_change = on_change
        self._publish = publish
        self._owns = owns
        self._resync_seconds = resync_seconds
        self._stats_seconds = stats_seconds
        self._selectors: dict[str, str] = {}
        self._refresh = asyncio.Event()
        self._seen: dict[str, tuple[Container, float]] = {}

    def watch_labels(self, selectors: Mapping[str, str]) -> None:
        """Which label each app is discovered by; a change triggers a refresh."""
        if dict(selectors) != self._selectors:
            self._selectors = dict(selectors)
            self._refresh.set()

    async def run(self) -> None:
        async with aiodocker.Docker() as docker:
            helpers = [
                asyncio.create_task(self._follow_events(docker)),
                asyncio.create_task(self._sample_stats(docker)),
            ]
            try:
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._refresh.wait(), self._resync_seconds)
                    self._refresh.clear()
                    try:
                        await self._list(docker)
                    except aiodocker.DockerError as exc:
                        log.warning("docker listing failed", error=str(exc))
            finally:
                await cancel_all(helpers)

    async def _list(self, docker: aiodocker.Docker) -> None:
        found: dict[str, tuple[Container, float]] = {}
        if self._selectors:
            for summary in await docker.containers.list(filters={"status": ["running"]}):
                app_name = match_app(summary["Labels"] or {}, self._selectors)
                if app_name is None:
                    continue
                cid = summary["Id"]
                if cid in self._seen and self._seen[cid][0].app_name == app_name:
                    found[cid] = self._seen[cid]
                    continue
                inspected = (await docker.containers.get(cid))._container
                found[cid] = (to_container(app_name, inspected), started_at(inspected) or 0.0)
        if found.keys() != self._seen.keys() or any(found[k][0] != self._seen[k][0] for k in found):
            log.info("containers discovered", count=len(found))
        self._seen = found
        self._on_change({cid: c for cid, (c, _) in found.items()}, {cid: t for cid, (_, t) in found.items()})

    async def _follow_events(self, docker: aiodocker.Docker) -> None:
        filters = json.dumps({"type": ["container"]})
        while True:
            subscriber = docker.events.subscribe(filters=filters)
            while (event := await subscriber.get()) is not None:
                await self._on_event(docker, event)
            await docker.events.stop()  # the stream ended (engine restart): subscribe again
            await asyncio.sleep(1.0)

    async def _on_event(self, docker: aiodocker.Docker, event: dict) -> None:
        action = str(event.get("Action", "")).split(":", 1)[0]
        if action in LISTING_EVENTS:
            self._refresh.set()
        actor = event.get("Actor") or {}
        app_name = match_app(actor.get("Attributes") or {}, self._selectors)
        container_id = str(actor.get("ID", ""))
        if app_name is None or not self._owns(app_name, short_id(container_id)):
            return
        restart_count = None
        if action in ("start", "die"):
            with contextlib.suppress(aiodocker.DockerError):
                restart_count = (await docker.containers.get(container_id))._container.get("RestartCount")
        observation = observation_from_event(app_name, event, restart_count)
        if observation is not None:
            self._publish(observation)

    async def _sample_stats(self, docker: aiodocker.Docker) -> None:
        while True:
            await asyncio.sleep(self._stats_seconds)
            owned = [(cid, c.app_name) for cid, (c, _) in self._seen.items() if self._owns(c.app_name, short_id(cid))]
            results = await asyncio.gather(
                *(asyncio.wait_for(docker.containers.container(cid).stats(stream=False), 10) for cid, _ in owned),
                return_exceptions=True,
            )
            now = time.time()
            for (cid, app_name), result in zip(owned, results, strict=True):
                if isinstance(result, list) and result:
                    self._publish(stats_observation(app_name, cid, result[0], now))
