"""Recovery on a real Docker engine, end to end: the prober observes, the detector
classifies, the recovery service acts. Host networking, 127.0.0.1 only, a local image.
Each test uses its own app name and label, so parallel runs do not see its containers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from nats.aio.client import Client

from autoserve_events import RecoveryExecuted, RecoveryStrategy
from autoserve_prober.service import ProberService
from autoserve_recovery.service import RecoveryService, RecoverySettings
from autoserve_runtime import EmbeddedNatsServer, free_port

from .conftest import LOCALHOST, Outputs, ServiceRunner, apply_yaml, check, config_for, wait_for

S = RecoveryStrategy


@pytest.fixture
def app() -> Iterator[str]:
    """A unique app name; every container labelled with it is removed afterwards."""
    name = f"rbox-{uuid.uuid4().hex[:8]}"
    yield name
    ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=autoserve.app={name}"],
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)


def app_config(app: str, failure_threshold: int = 2, **recovery: object) -> str:
    spec: dict = {"health_check": check(path="/health", failure_threshold=failure_threshold),
                  "docker": {"label": f"autoserve.app={app}"}}  # fmt: skip
    if recovery:
        spec["recovery"] = recovery
    return config_for({app: spec})


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout.strip()


def run_box(image: str, app: str, *command: str, port: int | None = None) -> str:
    """A container of ``app`` with host networking; by default busybox httpd on ``port``."""
    argv = command or ("/bin/busybox", "httpd", "-f", "-p", f"{LOCALHOST}:{port}", "-h", "/www")
    labels = ["--label", f"autoserve.app={app}"] + (["--label", f"autoserve.port={port}"] if port else [])
    return docker("run", "-d", "--network", "host", *labels, image, *argv)


def serving(port: int, path: str = "/health") -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{port}{path}", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def executed(
    outputs: Outputs, strategy: RecoveryStrategy | None = None, instance: str | None = None
) -> list[RecoveryExecuted]:
    return [
        e
        for e in outputs.events(RecoveryExecuted)
        if (strategy is None or e.strategy is strategy) and (instance is None or e.instance_id == instance)
    ]


class DockerEvents:
    """``docker events`` for one app's containers, by action: the ground truth."""

    def __init__(self, app: str) -> None:
        self.process = subprocess.Popen(
            ["docker", "events", "--format", "{{json .}}", "--filter", "type=container",
             "--filter", f"label=autoserve.app={app}"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: list[dict] = []

    async def pump(self) -> None:
        assert self.process.stdout is not None
        while line := await asyncio.to_thread(self.process.stdout.readline):
            self.lines.append(json.loads(line))

    def count(self, action: str, container: str | None = None) -> int:
        return sum(
            1 for e in self.lines if e.get("Action") == action and (container is None or e.get("id") == container)
        )

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(5)


@pytest.fixture
async def docker_events(app: str) -> AsyncIterator[DockerEvents]:
    events = DockerEvents(app)
    task = asyncio.create_task(events.pump())
    yield events
    events.stop()
    await asyncio.wait_for(task, 10)


@pytest.fixture
async def system(nats_server: EmbeddedNatsServer, detector_runner: ServiceRunner) -> AsyncIterator[ProberService]:
    """Prober (with Docker) and detector live; a test applies its config first."""
    await detector_runner.start()
    prober = ServiceRunner(lambda: ProberService(nats_server.url, docker=True))
    service = await prober.start()
    yield service
    await prober.stop()


@pytest.fixture
async def recoveries(nats_server: EmbeddedNatsServer) -> AsyncIterator:
    """Start recovery replicas; all stopped at the end."""
    runners: list[ServiceRunner] = []

    async def start(replica: str = "r1", **settings: object) -> RecoveryService:
        options = {"replica": replica, "docker": True, "lease_seconds": 3.0, **settings}
        runner = ServiceRunner(lambda: RecoveryService(nats_server.url, RecoverySettings(**options)))
        runners.append(runner)
        return await runner.start()

    yield start
    for runner in runners:
        await runner.stop()


async def test_a_killed_container_is_restarted_and_serves_again(
    app: str, nc: Client, system: ProberService, recoveries, outputs: Outputs, busybox_image: str,
    docker_events: DockerEvents,
) -> None:  # fmt: skip
    await apply_yaml(nc, app_config(app))
    await recoveries()
    port = free_port()
    container = await asyncio.to_thread(run_box, busybox_image, app, port=port)
    await wait_for(lambda: (app, container[:12]) in system.workers.targets, timeout=30, what="discovery")
    await wait_for(lambda: serving(port), what="serving before the kill")
    killed_at = time.time()
    await asyncio.to_thread(docker, "kill", container)
    await wait_for(lambda: executed(outputs, S.RESTART_CONTAINER), timeout=30, what="a restart")
    await wait_for(lambda: serving(port), timeout=10, what="serving again")
    restart = executed(outputs, S.RESTART_CONTAINER)[0]
    assert restart.success and restart.error is None, restart
    assert restart.failure_type == "container_stopped" and restart.instance_id == container[:12], restart
    # On the die event, not after probe thresholds (a generous bound: the machine is shared).
    assert restart.timestamp - killed_at < 5.0, restart
    assert restart.details["container_id"] == container and restart.details["backoff_level"] == 1
    await wait_for(lambda: docker_events.count("start", container) >= 2, what="docker start event")
    assert docker_events.count("restart", container) == 1
    assert len(executed(outputs)) == 1, executed(outputs)  # the die of our own restart is not a new failure


async def test_a_container_that_crashes_at_start_escalates_with_backoff(
    app: str, nc: Client, system: ProberService, recoveries, outputs: Outputs, busybox_image: str,
) -> None:  # fmt: skip
    rules = {"max_restarts": 1, "backoff_initial_seconds": 1, "backoff_max_seconds": 8, "action_timeout_seconds": 4}
    await apply_yaml(nc, app_config(app, **rules))
    await recoveries()
    await asyncio.to_thread(run_box, busybox_image, app, "/bin/busybox", "sh", "-c", "exit 3")
    await wait_for(lambda: len(executed(outputs)) >= 3, timeout=60, what="three escalating actions")
    first, second, third = executed(outputs)[:3]
    assert [first.strategy, second.strategy, third.strategy] == [
        S.RESTART_CONTAINER, S.RECREATE_CONTAINER, S.REPLACE_INSTANCE,
    ]  # fmt: skip
    assert first.success and second.success
    assert not third.success and "not healthy within 3.2s" in third.error  # it crashes at start too
    assert second.details["removed_instance_id"] == first.instance_id
    assert third.instance_id == second.details["new_instance_id"]  # the recreated one, same slot
    # Backoff, visible in the timestamps: 1 s after the restart, then 2 s after the recreate.
    assert second.timestamp - (first.timestamp + first.duration_ms / 1000) >= 1.0
    assert third.timestamp - (second.timestamp + second.duration_ms / 1000) >= 2.0
    assert [e.details["backoff_level"] for e in (first, second, third)] == [1, 2, 3]
