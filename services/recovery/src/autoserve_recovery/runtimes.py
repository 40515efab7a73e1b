"""Which runtime runs an instance (Docker, a local process), and an app's members: the
``Runtimes`` port over the two runtime adapters."""

from __future__ import annotations

import os
from collections.abc import Mapping

from autoserve_config import AppSpec

from .adapters.copy_ports import PortPolicy
from .adapters.docker import DockerRuntime
from .adapters.process import ProcessRuntime
from .ports import Member, RecoveryError, Runtime


class LocalRuntimes:
    def __init__(self, docker: DockerRuntime | None, process: ProcessRuntime | None) -> None:
        self.docker = docker
        self.process = process

    def configure(self, apps: Mapping[str, AppSpec]) -> None:
        """Which containers are each app's, and where they listen (from the apps in KV)."""
        if self.docker is None:
            return
        self.docker.selectors = {name: s.docker.label for name, s in apps.items() if s.docker}
        self.docker.ports = {
            name: PortPolicy(
                s.docker.port, s.health_check.port, tuple(s.docker.replica_ports) if s.docker.replica_ports else None
            )
            for name, s in apps.items()
            if s.docker
        }

    def runtime_for(self, app_name: str, instance_id: str, spec: AppSpec) -> Runtime:
        if spec.docker is not None:
            if self.docker is None:
                raise RecoveryError(
                    "docker engine unavailable: this recovery service runs without Docker "
                    f"(no socket; DOCKER_HOST={os.environ.get('DOCKER_HOST', 'unix:///var/run/docker.sock')})"
                )
            return self.docker
        if self.process is not None and self.process.owns(app_name, instance_id):
            return self.process
        if instance_id not in {i.id for i in spec.instances}:
            raise RecoveryError(f"unknown instance {instance_id!r} of app {app_name!r}: not in its instances")
        raise RecoveryError(
            f"instance {instance_id!r} of {app_name!r} has no runtime: not a container (no docker.label) "
            "and no local process record"
        )

    async def members(self, app_name: str, spec: AppSpec) -> list[Member]:
        members = [Member(i.id, i.host, i.port or spec.health_check.port) for i in spec.instances]
        if spec.docker is not None and self.docker is not None:
            members += await self.docker.members(app_name)
        return members

    async def lineage(self, app_name: str, instance_id: str, spec: AppSpec) -> str | None:
        if spec.docker is None or self.docker is None:
            return None
        return await self.docker.lineage(instance_id)
