# ruff: noqa: F811  (pytest fixtures imported from the other recovery tests are used as parameters)
"""Replace and scale out on host networking, through the whole system (prober, detector,
recovery, nginx): each copy gets its own 127.0.0.1 port (``autoserve.port`` label and
``PORT``), is probed there, and nginx routes to it."""

from __future__ import annotations

import asyncio
import json

from nats.aio.client import Client

from autoserve_events import HealthChanged, RecoveryStrategy
from autoserve_prober.service import ProberService
from autoserve_recovery.ports import Member
from autoserve_runtime import free_port

from .conftest import LOCALHOST, Outputs, apply_yaml, check, config_for, wait_for
from .test_recovery_docker import DockerEvents, app, docker, docker_events, executed, recoveries, system  # noqa: F401
from .test_recovery_nginx import Nginx, health_fails, nginx  # noqa: F401

S = RecoveryStrategy


def run_port_box(image: str, app: str, port: int, name: str, *extra: str) -> str:
    """A box that follows the convention: it listens on $PORT, and answers /who with its
    name and port. Its start writes /www/health, so a restart or a copy is healthy."""
    script = (f"echo ok > /www/health; echo {name}-$PORT > /www/who; "
              "exec /bin/busybox httpd -f -p 127.0.0.1:$PORT -h /www")  # fmt: skip
    return docker("run", "-d", "--network", "host", "--label", f"autoserve.app={app}",
                  "--label", f"autoserve.port={port}", "-e", f"PORT={port}", *extra, image, "/bin/busybox", "sh", "-c", script)  # fmt: skip


def copies_config(
    app: str, strategies: dict, max_replicas: int = 5, replica_ports: list[int] | None = None, **recovery: object
) -> str:
    docker_section = {"label": f"autoserve.app={app}"} | ({"replica_ports": replica_ports} if replica_ports else {})
    return config_for({app: {
        "health_check": check(path="/health", failure_threshold=2),
        "docker": docker_section,
        "scaling": {"max_replicas": max_replicas},
        "recovery": {"strategies": strategies, "escalate": False, "backoff_initial_seconds": 1,
                     "backoff_max_seconds": 1, "action_timeout_seconds": 30, **recovery},
    }})  # fmt: skip


def inspect(container: str) -> dict:
    return json.loads(docker("inspect", container))[0]


def health_of(outputs: Outputs, instance: str) -> list[HealthChanged]:
    return [e for e in outputs.events(HealthChanged) if e.instance_id == instance[:12]]


async def test_replace_starts_a_copy_on_its_own_port_and_removes_the_old_one_once_the_copy_is_healthy(
    app: str, nc: Client, system: ProberService, recoveries, outputs: Outputs, busybox_image: str, nginx: Nginx,
    docker_events: DockerEvents,
) -> None:  # fmt: skip
    port = free_port()
    old = await asyncio.to_thread(run_port_box, busybox_image, app, port, "old")
    nginx.start(app, [Member(old[:12], LOCALHOST, port)])
    await apply_yaml(nc, copies_config(app, {"health_check_failed": ["replace_instance"]}))
    await recoveries(nginx=nginx.settings())
    await wait_for(lambda: health_of(outputs, old), timeout=30, what="the old box healthy")
    assert nginx.get("/who") == f"old-{port}"

    await asyncio.to_thread(health_fails, old)  # running, serving /who, failing /health
    await wait_for(lambda: executed(outputs, S.REPLACE_INSTANCE), timeout=60, what="a replace")
    (replace,) = executed(outputs, S.REPLACE_INSTANCE)
    assert replace.success, replace.error
    new, new_port = str(replace.details["container_id"]), int(replace.details["port"])
    assert new_port != port and replace.details["removed_instance_id"] == old[:12]
    config = (await asyncio.to_thread(inspect, new))["Config"]
    assert config["Labels"]["autoserve.port"] == str(new_port) and f"PORT={new_port}" in config["Env"]
    assert config["Labels"]["autoserve.recovery.lineage"] == old[:12]
    # The copy was probed on its own port and healthy before the old one was removed.
    (became_healthy,) = [e for e in health_of(outputs, new) if e.healthy]
    await wait_for(lambda: docker_events.count("destroy", old) == 1, timeout=10, what="the old box removed")
    (destroyed,) = [e for e in docker_events.lines if e.get("Action") == "destroy" and e.get("id") == old]
    assert became_healthy.timestamp < int(destroyed["timeNano"]) / 1e9
    # nginx follows (its reload takes effect a moment later): the copy is the upstream now.
    await wait_for(lambda: nginx.get("/who") == f"old-{new_port}", timeout=10, what="nginx routing to the copy")
    text = (nginx.upstreams / f"{app}.conf").read_text()
    assert f"127.0.0.1:{new_port};  # {new[:12]}" in text and old[:12] not in text


async def test_scale_out_adds_replicas_on_free_ports_up_to_max_replicas_and_then_refuses(
    app: str, nc: Client, system: ProberService, recoveries, outputs: Outputs, busybox_image: str, nginx: Nginx,
) -> None:  # fmt: skip
    port = free_port()
    low = free_port()
    first = await asyncio.to_thread(run_port_box, busybox_image, app, port, "box")
    nginx.start(app, [Member(first[:12], LOCALHOST, port)])
    # A short window: the failing box asks for another scale out after each one.
    await apply_yaml(nc, copies_config(app, {"health_check_failed": ["scale_out"]}, max_replicas=3,
                                       replica_ports=[low, low + 50], restart_window_seconds=1))  # fmt: skip
    await recoveries(nginx=nginx.settings())
    await wait_for(lambda: health_of(outputs, first), timeout=30, what="the first box healthy")

    await asyncio.to_thread(health_fails, first)
    await wait_for(lambda: len(executed(outputs, S.SCALE_OUT)) >= 3, timeout=60, what="three scale outs")
    added, again, refused = executed(outputs, S.SCALE_OUT)[:3]
    assert added.success and again.success, (added.error, again.error)
    assert (added.details["replicas"], again.details["replicas"]) == (2, 3)
    ports = [int(added.details["port"]), int(again.details["port"])]
    assert all(low <= p <= low + 50 for p in ports) and len({port, *ports}) == 3
    assert not refused.success and "already runs 3 of scaling.max_replicas 3" in refused.error
    running = docker("ps", "-q", "--no-trunc", "--filter", f"label=autoserve.app={app}").split()
    assert len(running) == 3
    # Each copy is probed on its own port and becomes healthy; nginx routes to both.
    for event in (added, again):
        await wait_for(lambda e=event: any(h.healthy for h in health_of(outputs, e.details["new_instance_id"])),
                       timeout=30, what="a copy healthy")  # fmt: skip
    await wait_for(lambda: {f"box-{p}" for p in ports} <= nginx.spread(24), timeout=10, what="nginx routing to copies")
