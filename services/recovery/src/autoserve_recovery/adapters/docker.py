"""Docker through aiodocker: restart, recreate, replace, scale out, stop.

Completion is a Docker event (``start``, ``destroy``), never a sleep loop (the seed polled
every 3 s). Recreated and added containers copy the old one's spec (image, env, labels,
command, limits, host config) and carry ``autoserve.recovery.lineage`` so the budgets of
the slot follow the new container.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import aiodocker
import structlog

from .runtime import AwaitHealthy, Member, Outcome, RecoveryError

log = structlog.get_logger("autoserve.recovery.docker")

LINEAGE_LABEL = "autoserve.recovery.lineage"
CAUSE_LABEL = "autoserve.recovery.cause"  # the failure a replacement was started for
PORT_LABEL = "autoserve.port"
# Container config keys that make up "the same spec" when a container is created again.
SPEC_KEYS = ("Image", "Env", "Labels", "Cmd", "Entrypoint", "WorkingDir", "User", "ExposedPorts", "StopSignal",
             "Healthcheck", "Tty", "OpenStdin")  # fmt: skip


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
        self.ports: dict[str, int] = {}  # app -> default port (docker.port or health_check.port)

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
        members = []
        for summary in await self._app_containers(app_name):
            labels = summary.get("Labels") or {}
            port = labels.get(PORT_LABEL)
            port_number = int(port) if port and port.isdigit() else self.ports.get(app_name)
            if port_number:
                members.append(Member(summary["Id"][:12], "127.0.0.1", port_number))
        return members

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
        self, info: Mapping[str, Any], name: str | None, lineage: str, cause: str = ""
    ) -> tuple[str, float]:
        config = {key: info["Config"][key] for key in SPEC_KEYS if info["Config"].get(key) is not None}
        labels = {**(config.get("Labels") or {}), LINEAGE_LABEL: lineage}
        labels.pop(CAUSE_LABEL, None)
        config["Labels"] = labels | ({CAUSE_LABEL: cause} if cause else {})
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
            for leftover in await self.docker.containers.list(
                all=True, filters=json.dumps({"label": [f"{CAUSE_LABEL}={cause}"]})
            ):
                await self._remove(leftover.id, timeout)
        try:
            new_id, _ = await self._create_like(info, None, lineage, cause)
        except aiodocker.DockerError as exc:
            raise RecoveryError(f"docker create: {exc.message}") from None
        wait = timeout * 0.8  # leaves time to clean up within the action's timeout
        if not await healthy(app_name, new_id[:12], wait):
            await self._remove(new_id, timeout)
            raise RecoveryError(f"replacement {new_id[:12]} not healthy within {wait:g}s; kept {instance_id}")
        await self._remove(info["Id"], timeout)  # the old one's death is ours: effective at the end
        return Outcome({"removed_instance_id": instance_id, "new_instance_id": new_id[:12], "container_id": new_id})

    async def scale_out(self, app_name: str, instance_id: str, max_replicas: int, timeout: float) -> Outcome:
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
        try:
            new_id, _ = await self._create_like(template, None, "")
        except aiodocker.DockerError as exc:
            raise RecoveryError(f"docker create: {exc.message}") from None
        return Outcome({"new_instance_id": new_id[:12], "replicas": len(running) + 1})

    async def stop(self, app_name: str, instance_id: str, timeout: float) -> Outcome:
        info = await self._inspect(instance_id)
        try:
            await self.docker.containers.container(info["Id"]).stop(t=int(timeout), timeout=timeout + 5)
        except aiodocker.DockerError as exc:
            raise RecoveryError(f"docker stop {instance_id}: {exc.message}") from None
        return Outcome({"container_id": info["Id"]})
