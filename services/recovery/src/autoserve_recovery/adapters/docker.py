"""Docker through aiodocker: restart, recreate, replace, scale out, stop.

Completion is a Docker event (``start``, ``destroy``), never a sleep loop (the seed polled
every 3 s). Recreated and added containers copy the old one's spec (image, env, labels,
command, limits, host config) and carry ``autoserve.recovery.lineage`` so the budgets of
the slot follow the new container.

On host networking a copy that runs next to the original (replace, scale out) cannot use
its port: it gets a free 127.0.0.1 port (from ``docker.replica_ports``, else one the
kernel picks), as its ``autoserve.port`` label (where discovery probes it and nginx sends
traffic) and as its ``PORT`` environment variable (where the app must listen).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import aiodocker
import structlog

from ..ports import AwaitHealthy, Member, Outcome, RecoveryError
from .copy_ports import PORT_LABEL, PortPolicy, copy_port

log = structlog.get_logger("autoserve.recovery.docker")

LINEAGE_LABEL = "autoserve.recovery.lineage"
CAUSE_LABEL = "autoserve.recovery.cause"  # the failure a replacement was started for
PORT_ENV = "PORT"  # a copy on host networking listens where this says
# Container config keys that make up "the same spec" when a container is created again.
SPEC_KEYS = ("Image", "Env", "Labels", "Cmd", "Entrypoint", "WorkingDir", "User", "ExposedPorts", "StopSignal",
             "Healthcheck", "Tty", "OpenStdin")  # fmt: skip


def docker_time(text: str) -> float:
    """Docker's RFC 3339 times carry nanoseconds; Python takes microseconds."""
    head, _, frac = text.rstrip("Z").partition(".")
    stamp = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.UTC).timestamp()
    return stamp + (float(f"0.{frac}") if frac.isdigit() else 0.0)


def docker_socket_available() -> bool:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return not host.startswith("unix://") or os.path.exists(host.removeprefix("unix://"))


class DockerRuntime:
    name = "docker"

    def __init__(self, selectors: Mapping[str, str] | None = None, url: str | None = None) -> None:
        self._url = url
        self._docker: aiodocker.Docker | None = None
        self._waiters: dict[tuple[str, str], list[asyncio.Future[float]]] = defaultdict(list)
        self._follower: asyncio.Task[None] | None = None
        self.selectors: dict[str, str] = dict(selectors or {})  # app -> "key=value"
        self.ports: dict[str, PortPolicy] = {}  # app -> where its containers listen
        self._copying: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # one port choice at a time

    def owns(self, app_name: str, instance_id: str) -> bool:
        return app_name in self.selectors

    async def start(self) -> DockerRuntime:
        self._docker = aiodocker.Docker(url=self._url)
        self._follower = asyncio.create_task(self._follow())
        return self

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._follower
        if self._docker is not None:
            with contextlib.suppress(Exception):
                await self._docker.events.stop()
            await self._docker.close()

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            raise RecoveryError("docker runtime not started")
        return self._docker

    # -- completion on Docker events ---------------------------------------------------

    async def _follow(self) -> None:
        filters = json.dumps({"type": ["container"], "event": ["start", "destroy", "die"]})
        while True:
            try:
                subscriber = self.docker.events.subscribe(filters=filters)
                while (event := await subscriber.get()) is not None:
                    actor = (event.get("Actor") or {}).get("ID", "")
                    at = int(event.get("timeNano") or 0) / 1e9
                    for future in self._waiters.pop((actor, str(event.get("Action"))), []):
                        if not future.done():
                            future.set_result(at)
                with contextlib.suppress(Exception):
                    await self.docker.events.stop()
            except (aiodocker.DockerError, OSError) as exc:
                log.warning("docker events unavailable", error=str(exc))
            await asyncio.sleep(1.0)  # the engine restarted or is away: subscribe again

    def _expect(self, container_id: str, action: str) -> asyncio.Future[float]:
        """Registered before the request, resolved with the event's time."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters[(container_id, action)].append(future)
        return future

    async def _await(self, future: asyncio.Future[float], timeout: float, what: str) -> float:
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise RecoveryError(f"{what}: no Docker event within {timeout:g}s") from None

    # -- lookups -------------------------------------------------------------------------

    async def _inspect(self, instance_id: str) -> dict[str, Any]:
        try:
            return await self.docker.containers.container(instance_id).show()
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                raise RecoveryError(f"container {instance_id!r} does not exist (any more)") from None
            if exc.status == 900:  # aiodocker's code for "cannot connect"
                raise RecoveryError(f"docker engine unavailable: {exc.message}") from None
            raise RecoveryError(f"docker: {exc.message}") from None
        except (OSError, aiodocker.exceptions.DockerError) as exc:  # socket gone
            raise RecoveryError(f"docker engine unavailable: {exc}") from None

    async def _app_containers(self, app_name: str, running_only: bool = True) -> list[dict[str, Any]]:
        selector = self.selectors.get(app_name)
        if selector is None:
            raise RecoveryError(f"app {app_name!r} has no docker.label: no containers to act on")
        filters: dict[str, list[str]] = {"label": [selector]}
        if running_only:
            filters["status"] = ["running"]
        try:
            found = await self.docker.containers.list(all=not running_only, filters=json.dumps(filters))
        except aiodocker.DockerError as exc:
            raise RecoveryError(
                f"docker: {exc.message}" if exc.status != 900 else f"docker engine unavailable: {exc.message}"
            ) from None
        except OSError as exc:
            raise RecoveryError(f"docker engine unavailable: {exc}") from None
        return [container._container for container in found]  # the listing's summary JSON

    async def lineage(self, instance_id: str) -> str | None:
        """The slot a container created by recovery belongs to (its lineage label)."""
        try:
            info = await self.docker.containers.container(instance_id).show()
        except (OSError, aiodocker.DockerError):
            return None
        return (info["Config"].get("Labels") or {}).get(LINEAGE_LABEL) or None

    async def instances(self, app_name: str) -> list[str]:
        return [c["Id"][:12] for c in await self._app_containers(app_name)]

    async def members(self, app_name: str) -> list[Member]:
        policy = self.ports.get(app_name, PortPolicy())
        return [
            Member(summary["Id"][:12], "127.0.0.1", policy.port_of(summary.get("Labels") or {}))
            for summary in await self._app_containers(app_name)
        ]

    async def _copy_port(self, app_name: str, info: Mapping[str, Any]) -> int | None:
        """A free 127.0.0.1 port for a copy of ``info`` that runs beside it, or None when
        the copy needs none (not host networking: each container has its own address)."""
        if (info.get("HostConfig") or {}).get("NetworkMode") != "host":
            return None
        policy = self.ports.get(app_name, PortPolicy())
        every = await self._app_containers(app_name, running_only=False)
        return copy_port(app_name, policy, {policy.port_of(summary.get("Labels") or {}) for summary in every})

    # -- actions -------------------------------------------------------------------------

    async def restart(self, app_name: str, instance_id: str, timeout: float) -> Outcome:
        info = await self._inspect(instance_id)
        cid = info["Id"]
        started = self._expect(cid, "start")
        try:
            await self.docker.containers.container(cid).restart(t=0, timeout=timeout)
        except aiodocker.DockerError as exc:
            started.cancel()
            raise RecoveryError(f"docker restart {cid[:12]}: {exc.message}") from None
        at = await self._await(started, timeout, f"restart {cid[:12]}")
        # A die before this start was our own doing; one after it is a new failure.
        return Outcome({"container_id": cid, "effective_at": at})

    async def _create_like(
        self, info: Mapping[str, Any], name: str | None, lineage: str, cause: str = "", port: int | None = None
    ) -> tuple[str, float]:
        config = {key: info["Config"][key] for key in SPEC_KEYS if info["Config"].get(key) is not None}
        labels = {**(config.get("Labels") or {}), LINEAGE_LABEL: lineage}
        labels.pop(CAUSE_LABEL, None)
        config["Labels"] = labels | ({CAUSE_LABEL: cause} if cause else {})
        if port is not None:
            config["Labels"][PORT_LABEL] = str(port)
            env = [e for e in config.get("Env") or [] if not e.startswith(f"{PORT_ENV}=")]
            config["Env"] = [*env, f"{PORT_ENV}={port}"]
        config["HostConfig"] = info["HostConfig"]  # limits, network mode, mounts, restart policy
        container = await self.docker.containers.create(config, name=name)
        started = self._expect(container.id, "start")
        await container.start()
        return str(container.id), await self._await(started, 30, f"start {container.id[:12]}")

    async def _remove(self, cid: str, timeout: float) -> None:
        destroyed = self._expect(cid, "destroy")
        try:
            await self.docker.containers.container(cid).delete(force=True)
        except aiodocker.DockerError as exc:
            destroyed.cancel()
            if exc.status != 404:
                raise RecoveryError(f"docker rm {cid[:12]}: {exc.message}") from None
            return
        await self._await(destroyed, timeout, f"remove {cid[:12]}")

    async def recreate(self, app_name: str, instance_id: str, timeout: float) -> Outcome:
        info = await self._inspect(instance_id)
        lineage = (info["Config"].get("Labels") or {}).get(LINEAGE_LABEL) or instance_id
        await self._remove(info["Id"], timeout)
        try:
            new_id, at = await self._create_like(info, info["Name"].lstrip("/") or None, lineage)
        except aiodocker.DockerError as exc:
            raise RecoveryError(f"docker create: {exc.message}") from None
        return Outcome(
            {
                "removed_instance_id": instance_id,
                "new_instance_id": new_id[:12],
                "container_id": new_id,
                "effective_at": at,
            }
        )

    async def replace(
        self, app_name: str, instance_id: str, timeout: float, healthy: AwaitHealthy, cause: str = ""
    ) -> Outcome:
        """Start a new container, wait until the detector calls it healthy, remove the old."""
        info = await self._inspect(instance_id)
        lineage = (info["Config"].get("Labels") or {}).get(LINEAGE_LABEL) or instance_id
        if cause:  # a replica that crashed mid-replace left its replacement behind
            for leftover in await self._caused_by(cause):
                await self._remove(leftover["Id"], timeout)
        async with self._copying[app_name]:
            port = await self._copy_port(app_name, info)
            try:
                new_id, _ = await self._create_like(info, None, lineage, cause, port)
            except aiodocker.DockerError as exc:
                raise RecoveryError(f"docker create: {exc.message}") from None
        wait = timeout * 0.8  # leaves time to clean up within the action's timeout
        if not await healthy(app_name, new_id[:12], wait):
            await self._remove(new_id, timeout)
            raise RecoveryError(f"replacement {new_id[:12]} not healthy within {wait:g}s; kept {instance_id}")
        await self._remove(info["Id"], timeout)  # the old one's death is ours: effective at the end
        return Outcome(
            {"removed_instance_id": instance_id, "new_instance_id": new_id[:12], "container_id": new_id}
            | ({"port": port} if port is not None else {})
        )

    async def _caused_by(self, cause: str) -> list[dict[str, Any]]:
        """Containers recovery started for one failure (replace, scale out)."""
        found = await self.docker.containers.list(all=True, filters=json.dumps({"label": [f"{CAUSE_LABEL}={cause}"]}))
        return [container._container for container in found]

    async def scale_out(
        self, app_name: str, instance_id: str, max_replicas: int, timeout: float, cause: str = ""
    ) -> Outcome:
        running = await self._app_containers(app_name)
        if len(running) >= max_replicas:
            raise RecoveryError(
                f"scale_out: {app_name} already runs {len(running)} of scaling.max_replicas {max_replicas}"
            )
        try:
            template = await self._inspect(instance_id)
        except RecoveryError:
            if not running:
                raise RecoveryError(f"scale_out: no container of {app_name} to copy") from None
            template = await self._inspect(running[0]["Id"])
        async with self._copying[app_name]:
            port = await self._copy_port(app_name, template)
            try:
                new_id, _ = await self._create_like(template, None, "", cause, port)
            except aiodocker.DockerError as exc:
                raise RecoveryError(f"docker create: {exc.message}") from None
        return Outcome(
            {"new_instance_id": new_id[:12], "replicas": len(running) + 1}
            | ({"port": port} if port is not None else {})
        )

    async def took_effect(
        self, app_name: str, instance_id: str, lineage: str, strategy: str, since: float, cause: str
    ) -> Outcome | None:
        """After a takeover: did the crashed replica's ``strategy``, begun at ``since``,
        already happen? Docker's state says so (a restart: the container started after
        ``since``; a replace or scale out: the copy labelled with the cause exists and, for
        a replace, the original is gone). None: not done, or cannot tell."""
        try:
            info: dict[str, Any] | None = await self._inspect(instance_id)
        except RecoveryError:
            info = None  # gone: removed by a replace or recreate, or never there
        if strategy == "restart_container":
            if info is None or not info["State"].get("Running"):
                return None
            started = docker_time(info["State"]["StartedAt"])
            return Outcome({"container_id": info["Id"], "effective_at": started}) if started > since else None
        if strategy == "recreate_container":
            if info is not None:
                return None
            for summary in await self._app_containers(app_name, running_only=False):
                slot = (summary.get("Labels") or {}).get(LINEAGE_LABEL)
                if slot in (instance_id, lineage) and int(summary.get("Created") or 0) >= int(since):
                    new = await self._inspect(summary["Id"])
                    effective = docker_time(new["State"]["StartedAt"])
                    return Outcome({"removed_instance_id": instance_id, "new_instance_id": new["Id"][:12],
                                    "container_id": new["Id"], "effective_at": effective})  # fmt: skip
            return None
        if strategy in ("replace_instance", "scale_out"):
            copies = await self._caused_by(cause)
            if not copies or (strategy == "replace_instance" and info is not None):
                return None  # a half-made replacement is removed and the replace done again
            new_id = copies[0]["Id"]
            details: dict[str, object] = {"new_instance_id": new_id[:12], "container_id": new_id}
            if strategy == "replace_instance":
                details["removed_instance_id"] = instance_id
            return Outcome(details)
        return None

    async def stop(self, app_name: str, instance_id: str, timeout: float) -> Outcome:
        """``docker stop``: the stop signal, then SIGKILL after the container's own
        ``StopTimeout`` (Docker's 10 s when unset), within half the action's time."""
        info = await self._inspect(instance_id)
        grace = min(info["Config"].get("StopTimeout") or 10, timeout / 2)
        try:
            await self.docker.containers.container(info["Id"]).stop(t=max(0, int(grace)), timeout=timeout)
        except aiodocker.DockerError as exc:
            raise RecoveryError(f"docker stop {instance_id}: {exc.message}") from None
        return Outcome({"container_id": info["Id"], "stop_grace_seconds": int(grace)})
