# ruff: noqa: F811  (fixtures imported from other tests are used as parameters)
"""The whole flow on a 3-node JetStream cluster with two members of every service, each an
``autoserve run`` process: a container dies, and it is detected, restarted once, reported
once and alerted once, however many members saw it."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from nats.aio.msg import Msg

from autoserve_cli.services import SERVICES
from autoserve_events import FailureDetected, FailureType, HealthChanged, RecoveryExecuted, decode
from autoserve_runtime import free_port
from autoserve_runtime.nats_cluster import EmbeddedNatsCluster

from ..support.cluster import LOCALHOST, Services, apply, client
from ..support.waiting import wait_for
from .conftest import check, run_httpd
from .test_alerter import Hook, hook  # noqa: F401 (a fixture)
from .test_recovery_docker import app, serving  # noqa: F401 (a fixture)

pytestmark = pytest.mark.cluster

MEMBERS = ("a", "b")


def firing(hook: Hook, app: str) -> list[dict]:
    """The firing notifications about ``app`` the webhook receiver got."""
    return [body for body in hook.payloads() if body.get("status") == "firing" and app in str(body)]


def flow_config(app: str, hook: Hook) -> str:
    spec = {"health_check": check(path="/health", failure_threshold=2), "docker": {"label": f"autoserve.app={app}"}}
    alerting = {
        "receivers": {"team": {"type": "webhook", "url": hook.url}},
        "route": {"receiver": "team", "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"},
    }
    return yaml.safe_dump({"apps": {app: spec}, "alerting": alerting})


async def test_a_dead_container_is_detected_restarted_reported_and_alerted_once_with_two_members_of_each(
    cluster: EmbeddedNatsCluster, tmp_path: Path, busybox_image: str, app: str, hook: Hook
) -> None:
    config = tmp_path / "flow.yaml"
    config.write_text(flow_config(app, hook))
    await apply(config, cluster.url, replicas=3)
    port = free_port()
    container = run_httpd(busybox_image, port, {"autoserve.app": app, "autoserve.port": str(port)})

    services = Services(cluster.url, tmp_path / "logs", tmp_path / "data")
    services.extra_env = {"prober": {"AUTOSERVE_DOCKER": "true"}, "recovery": {"AUTOSERVE_RECOVERY_DOCKER": "true"}}
    nc = await client(cluster.url)
    events: list = []

    async def on_event(msg: Msg) -> None:
        event = decode(msg.data)
        if getattr(event, "app_name", None) == app:
            events.append(event)

    await nc.subscribe("autoserve.event.>", cb=on_event)

    def of(kind: type) -> list:
        return [e for e in events if isinstance(e, kind)]

    try:
        for name in SERVICES:
            for member in MEMBERS:
                services.start(name, member=member)
        reporters = [f"reporter-{m}" for m in MEMBERS]
        for key in services.processes:
            if key not in reporters:
                await wait_for(lambda k=key: services.ready(k), 120, f"{key} /readyz 200", every=0.2)
        # The reporter is active/standby: one ready (the lease holder), the other alive.
        await wait_for(lambda: sum(services.ready(k) for k in reporters) == 1, 120, "one active reporter", every=0.2)
        await wait_for(lambda: any(h.healthy for h in of(HealthChanged)), 60, "the container healthy")

        await asyncio.to_thread(subprocess.run, ["docker", "kill", container], check=True, capture_output=True)
        stopped = [FailureType.CONTAINER_STOPPED]
        await wait_for(lambda: any(f.failure_type in stopped for f in of(FailureDetected)), 60, "its death detected")
        await wait_for(lambda: any(r.success for r in of(RecoveryExecuted)), 90, "a successful restart")
        await wait_for(lambda: serving(port), 60, "the restarted container serving")
        await wait_for(lambda: of(HealthChanged)[-1].healthy, 60, "healthy (again, if the death was seen as unhealthy)")
        await wait_for(lambda: len(firing(hook, app)) >= 1, 60, "the alert notified")

        # Restarted once: one recovery action, and the engine saw one start after the kill.
        restarts = [r for r in of(RecoveryExecuted) if r.success]
        assert len(restarts) == 1, restarts
        # Detected once: each health transition published once (JetStream keeps one copy).
        transitions = [(h.healthy, h.timestamp) for h in of(HealthChanged)]
        assert len(transitions) == len(set(transitions)), transitions

        # Reported once: the active reporter (the lease holder) shows one incident.
        async def one_incident() -> bool:
            for port_ in services.reporter_ports.values():
                try:
                    async with httpx.AsyncClient(base_url=f"http://{LOCALHOST}:{port_}", timeout=5) as http:
                        reply = await http.get(f"/v1/apps/{app}/incidents")
                except httpx.HTTPError:
                    continue
                if reply.status_code == 200:
                    incidents = reply.json()["incidents"]
                    return len(incidents) == 1 and incidents[0]["recovered_by"] == "restart_container"
            return False

        await wait_for(one_incident, 60, "one incident, recovered by restart_container", every=0.5)
        # Alerted once: one firing notification for the group, whichever member was active.
        assert len(firing(hook, app)) == 1, hook.payloads()
    finally:
        await nc.close()
        services.stop()
