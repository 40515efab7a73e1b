"""Discovers containers labelled for an app, through the Docker engine's API (aiodocker).

Listing is refreshed on every container start/stop/die/destroy event and, as a safety
net, every ``resync_seconds``. The Docker socket is privileged: the prober only reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable, Mapping
from datetime import datetime

import aiodocker
import structlog

from ..core.targets import Container

log = structlog.get_logger("autoserve.prober.docker")

PORT_LABEL = "autoserve.port"
WATCHED_EVENTS = ("start", "stop", "die", "destroy", "pause", "unpause", "rename")

# (containers by id, when each started)
OnContainers = Callable[[dict[str, Container], dict[str, float]], None]


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
    def __init__(self, on_change: OnContainers, resync_seconds: float = 30.0) -> None:
        self._on_change = on_change
        self._resync_seconds = resync_seconds
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
            events = asyncio.create_task(self._follow_events(docker))
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
                events.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await events

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
        filters = json.dumps({"type": ["container"], "event": list(WATCHED_EVENTS)})
        while True:
            subscriber = docker.events.subscribe(filters=filters)
            while (event := await subscriber.get()) is not None:
                log.debug("docker event", action=event.get("Action"), id=event.get("id", "")[:12])
                self._refresh.set()
            await docker.events.stop()  # the stream ended (engine restart): subscribe again
            await asyncio.sleep(1.0)
