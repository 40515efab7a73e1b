"""Docker discovery on a real engine: labelled containers become targets and go away with them."""

from __future__ import annotations

import asyncio
import subprocess

from nats.aio.client import Client

from autoserve_prober.service import ProberService
from autoserve_runtime import EmbeddedNatsServer, free_port, provision

from .conftest import Received, apply_yaml, check, config_for, run_httpd, wait_for


async def test_labelled_containers_are_discovered_and_probed(
    nats_server: EmbeddedNatsServer, nc: Client, probes: Received, busybox_image: str, docker_containers: list[str]
) -> None:
    await provision(nc.jetstream())
    service = ProberService(nats_server.url, docker=True)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await apply_yaml(
            nc, config_for({"dock": {"health_check": check(path="/health"), "docker": {"label": "autoserve.app=dock"}}})
        )
        port = free_port()
        container = await asyncio.to_thread(
            run_httpd, busybox_image, port, {"autoserve.app": "dock", "autoserve.port": str(port)}
        )
        docker_containers.append(container)
        stranger = await asyncio.to_thread(run_httpd, busybox_image, free_port(), {"autoserve.app": "someone-else"})
        docker_containers.append(stranger)

        instance = container[:12]
        await wait_for(
            lambda: any(p.is_healthy for p in probes.of("dock", instance)), timeout=30, what="container probed"
        )
        probe = next(p for p in probes.of("dock", instance) if p.is_healthy)
        assert (probe.status_code, probe.response_body) == (200, "ok\n")
        assert service.workers.targets[("dock", instance)].container_id == container
        assert not probes.of("dock", stranger[:12])
        assert set(service.workers.targets) == {("dock", instance)}

        # The container goes away: its worker stops, on the Docker event, without a restart.
        await asyncio.to_thread(subprocess.run, ["docker", "rm", "-f", container], check=True, capture_output=True)
        await wait_for(lambda: not service.workers.targets, timeout=30, what="the worker to stop")
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
