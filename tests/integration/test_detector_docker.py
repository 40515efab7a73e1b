"""Container failures end to end on a real Docker engine: the prober observes, the
detector classifies. Containers use host networking and a locally built image."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client

from autoserve_events import FailureDetected, FailureType
from autoserve_prober.service import ProberService
from autoserve_runtime import EmbeddedNatsServer, free_port

from .conftest import Outputs, ServiceRunner, apply_yaml, check, config_for, run_httpd, wait_for

LABEL = {"autoserve.app": "boxes"}
CONFIG = config_for({"boxes": {"health_check": check(path="/health"), "docker": {"label": "autoserve.app=boxes"}}})
CONFIG += "detector:\n  max_restart_count: 2\n"


@pytest.fixture
async def watching(
    nats_server: EmbeddedNatsServer, nc: Client, detector_runner: ServiceRunner
) -> AsyncIterator[ProberService]:
    """Prober (with Docker observation) and detector, both live, config applied."""
    await apply_yaml(nc, CONFIG)
    await detector_runner.start()
    prober = ServiceRunner(lambda: ProberService(nats_server.url, docker=True))
    service = await prober.start()
    await wait_for(lambda: service._docker is not None and service._docker._selectors, what="label selectors loaded")
    yield service
    await prober.stop()


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout.strip()


def of_type(outputs: Outputs, failure_type: FailureType, instance: str) -> list[FailureDetected]:
    return [e for e in outputs.events(FailureDetected) if e.failure_type is failure_type and e.instance_id == instance]


async def test_a_killed_container_is_container_stopped(
    watching: ProberService, outputs: Outputs, busybox_image: str, docker_containers: list[str]
) -> None:
    container = await asyncio.to_thread(run_httpd, busybox_image, free_port(), LABEL)
    docker_containers.append(container)
    await wait_for(lambda: ("boxes", container[:12]) in watching.workers.targets, timeout=30, what="discovery")
    await asyncio.to_thread(docker, "kill", container)
    await wait_for(
        lambda: of_type(outputs, FailureType.CONTAINER_STOPPED, container[:12]), timeout=30, what="CONTAINER_STOPPED"
    )
    stopped = of_type(outputs, FailureType.CONTAINER_STOPPED, container[:12])[0]
    assert (stopped.severity, stopped.is_critical, stopped.details["exit_code"]) == ("critical", True, 137)
    assert stopped.details["container_id"] == container


async def test_an_oom_killed_container_is_container_oom_killed(
    watching: ProberService, outputs: Outputs, busybox_image: str, docker_containers: list[str]
) -> None:
    # 8 MiB and no swap, then an allocation without end: the kernel's OOM killer ends it.
    container = await asyncio.to_thread(
        docker, "run", "-d", "--network", "host", "-m", "8m", "--memory-swap", "8m",
        "--label", "autoserve.app=boxes", busybox_image, "/bin/busybox", "tail", "/dev/zero",
    )  # fmt: skip
    docker_containers.append(container)
    await wait_for(lambda: of_type(outputs, FailureType.CONTAINER_OOM_KILLED, container[:12]), timeout=60, what="OOM")
    oom = of_type(outputs, FailureType.CONTAINER_OOM_KILLED, container[:12])[0]
    assert (oom.severity, oom.is_critical) == ("critical", True)
    assert (await asyncio.to_thread(docker, "inspect", "-f", "{{.State.OOMKilled}}", container)) == "true"


async def test_a_crash_looping_container_is_container_restart_loop(
    watching: ProberService, outputs: Outputs, busybox_image: str, docker_containers: list[str]
) -> None:
    container = await asyncio.to_thread(
        docker, "run", "-d", "--network", "host", "--restart", "always", "--label", "autoserve.app=boxes",
        busybox_image, "/bin/busybox", "sh", "-c", "exit 3",
    )  # fmt: skip
    docker_containers.append(container)
    await wait_for(
        lambda: of_type(outputs, FailureType.CONTAINER_RESTART_LOOP, container[:12]), timeout=60, what="restart loop"
    )
    loop = of_type(outputs, FailureType.CONTAINER_RESTART_LOOP, container[:12])[0]
    assert loop.severity == "high"
    assert loop.details["restarts"] == 3  # more than max_restart_count (2), reported at the crossing
    assert len(of_type(outputs, FailureType.CONTAINER_RESTART_LOOP, container[:12])) == 1
    stopped = of_type(outputs, FailureType.CONTAINER_STOPPED, container[:12])
    assert stopped and stopped[0].details["exit_code"] == 3


async def test_container_stats_are_observed(
    nats_server: EmbeddedNatsServer, nc: Client, busybox_image: str, docker_containers: list[str]
) -> None:
    from autoserve_events import ContainerObserved, decode

    observed: list[ContainerObserved] = []

    async def on_message(msg) -> None:
        observed.append(decode(msg.data))

    await nc.subscribe("autoserve.probe.container.>", cb=on_message)
    await apply_yaml(nc, CONFIG)
    prober = ServiceRunner(lambda: ProberService(nats_server.url, docker=True, container_stats_seconds=1))
    await prober.start()
    try:
        container = await asyncio.to_thread(
            docker, "run", "-d", "--network", "host", "-m", "64m", "--label", "autoserve.app=boxes",
            busybox_image, "/bin/busybox", "httpd", "-f", "-p", f"127.0.0.1:{free_port()}", "-h", "/www",
        )  # fmt: skip
        docker_containers.append(container)
        await wait_for(lambda: any(o.event == "stats" for o in observed), timeout=30, what="a stats sample")
        sample = next(o for o in observed if o.event == "stats")
        assert (sample.app_name, sample.instance_id, sample.container_id) == ("boxes", container[:12], container)
        assert 0 < sample.memory_percent < 100 and 0 < sample.memory_usage_bytes < 64 * 2**20
        assert sample.cpu_percent is None or sample.cpu_percent >= 0
        assert any(o.event == "start" for o in observed)
    finally:
        await prober.stop()
