# ruff: noqa: F811  (pytest fixtures imported from test_recovery_docker are used as parameters)
"""The load balancer: a real nginx on 127.0.0.1 whose upstream file the recovery service
owns. Traffic is checked with real requests through nginx."""

from __future__ import annotations

import asyncio
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client

from autoserve_events import FailureDetected, HealthChanged, RecoveryStrategy
from autoserve_prober.service import ProberService
from autoserve_recovery.adapters.nginx import NginxSettings, parse_down, render, upstream_name
from autoserve_recovery.ports import Member
from autoserve_runtime import free_port

from .conftest import LOCALHOST, Outputs, apply_yaml, wait_for
from .test_recovery_docker import app, app_config, docker, executed, recoveries, run_box, system  # noqa: F401

S = RecoveryStrategy
TRAFFIC_ONLY = {"strategies": {"health_check_failed": ["remove_from_lb"]}}


@dataclass
class Nginx:
    prefix: Path
    port: int

    @property
    def conf(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def upstreams(self) -> Path:
        return self.prefix / "upstreams"

    def settings(self) -> NginxSettings:
        return NginxSettings(self.upstreams, ("nginx", "-p", str(self.prefix), "-c", str(self.conf), "-s", "reload"))

    def start(self, app_name: str, members: list[Member]) -> None:
        self.upstreams.mkdir(parents=True, exist_ok=True)
        (self.upstreams / f"{app_name}.conf").write_text(render(app_name, members, set()))
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf.write_text(f"""{user}worker_processes 1;
pid {self.prefix}/nginx.pid;
error_log {self.prefix}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {self.prefix}/tmp-body;
    proxy_temp_path {self.prefix}/tmp-proxy;
    fastcgi_temp_path {self.prefix}/tmp-fastcgi;
    uwsgi_temp_path {self.prefix}/tmp-uwsgi;
    scgi_temp_path {self.prefix}/tmp-scgi;
    include {self.upstreams}/*.conf;
    server {{
        listen {LOCALHOST}:{self.port};
        location / {{ proxy_pass http://{upstream_name(app_name)}; proxy_connect_timeout 1s; }}
    }}
}}
""")
        subprocess.run(["nginx", "-p", str(self.prefix), "-c", str(self.conf)], check=True, capture_output=True)

    def get(self, path: str) -> str:
        try:
            with urllib.request.urlopen(f"http://{LOCALHOST}:{self.port}{path}", timeout=2) as response:
                return response.read().decode().strip()
        except OSError as exc:
            return f"error: {exc}"

    def spread(self, requests: int = 12) -> set[str]:
        return {self.get("/who") for _ in range(requests)}

    def down(self, app_name: str) -> set[str]:
        return parse_down((self.upstreams / f"{app_name}.conf").read_text())


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    server = Nginx(tmp_path / "nginx", free_port())
    server.prefix.mkdir()
    yield server
    if (server.prefix / "nginx.pid").exists():
        subprocess.run(["nginx", "-p", str(server.prefix), "-c", str(server.conf), "-s", "quit"], capture_output=True)


async def boxes(image: str, app: str, count: int) -> list[tuple[str, int]]:
    """``count`` busybox httpd containers, each answering /who with its own name."""
    started = []
    for index in range(count):
        port = free_port()
        container = await asyncio.to_thread(run_box, image, app, port=port)
        await asyncio.to_thread(docker, "exec", container, "/bin/busybox", "sh", "-c", f"echo box{index} > /www/who")
        started.append((container, port))
    return started


def health_fails(container: str) -> None:
    docker("exec", container, "/bin/busybox", "rm", "/www/health")  # 404 from now on


def health_returns(container: str) -> None:
    docker("exec", container, "/bin/busybox", "sh", "-c", "echo ok > /www/health")


def healthy(outputs: Outputs, container: str) -> bool | None:
    changes = [e for e in outputs.events(HealthChanged) if e.instance_id == container[:12]]
    return changes[-1].healthy if changes else None


async def test_nginx_stops_routing_to_a_failed_instance_and_routes_to_it_again_when_healthy(
    app: str, nc: Client, system: ProberService, recoveries, outputs: Outputs, busybox_image: str, nginx: Nginx
) -> None:
    (c0, p0), (c1, p1) = await boxes(busybox_image, app, 2)
    nginx.start(app, [Member(c0[:12], LOCALHOST, p0), Member(c1[:12], LOCALHOST, p1)])
    assert nginx.spread() == {"box0", "box1"}
    await apply_yaml(nc, app_config(app, **TRAFFIC_ONLY))
    await recoveries(nginx=nginx.settings())
    await wait_for(lambda: healthy(outputs, c0) and healthy(outputs, c1), timeout=30, what="both healthy")

    await asyncio.to_thread(health_fails, c1)
    await wait_for(lambda: executed(outputs, S.REMOVE_FROM_LB), timeout=30, what="removal from the LB")
    removal = executed(outputs, S.REMOVE_FROM_LB)[0]
    assert removal.success and removal.instance_id == c1[:12] and removal.details["down"] == [c1[:12]]
    assert nginx.down(app) == {c1[:12]}
    await wait_for(lambda: nginx.spread() == {"box0"}, timeout=10, what="nginx routing around box1")

    await asyncio.to_thread(health_returns, c1)
    await wait_for(lambda: len(executed(outputs, S.REMOVE_FROM_LB)) == 2, timeout=30, what="restored to the LB")
    restore = executed(outputs, S.REMOVE_FROM_LB)[1]
    assert restore.success and restore.details["operation"] == "restore" and restore.failure_type is None
    assert nginx.down(app) == set()
    await wait_for(lambda: nginx.spread() == {"box0", "box1"}, timeout=10, what="nginx routing to box1 again")


async def test_with_three_of_four_failing_the_ejection_cap_holds_and_panic_is_announced(
    app: str, nc: Client, system: ProberService, recoveries, outputs: Outputs, busybox_image: str, nginx: Nginx
) -> None:
    started = await boxes(busybox_image, app, 4)
    nginx.start(app, [Member(c[:12], LOCALHOST, p) for c, p in started])
    await apply_yaml(nc, app_config(app, **TRAFFIC_ONLY, max_ejection_percent=50))
    await recoveries(nginx=nginx.settings())
    await wait_for(lambda: all(healthy(outputs, c) for c, _ in started), timeout=30, what="all healthy")
    failing = [c for c, _ in started[1:]]
    for count, container in enumerate(failing[:2], start=1):
        await asyncio.to_thread(health_fails, container)
        await wait_for(
            lambda n=count: len(executed(outputs, S.REMOVE_FROM_LB)) == n, timeout=30, what=f"ejection {count}"
        )
    assert nginx.down(app) == {failing[0][:12], failing[1][:12]}  # the cap: 2 of 4
    await asyncio.to_thread(health_fails, failing[2])

    def panic(value: bool = True) -> list[FailureDetected]:
        return [e for e in outputs.events(FailureDetected) if e.details.get("panic") is value]

    def restores() -> list:
        return [e for e in executed(outputs, S.REMOVE_FROM_LB) if e.details.get("operation") == "restore"]

    await wait_for(lambda: panic(), timeout=30, what="panic announced")
    announcement = panic()[0]
    assert announcement.severity == "critical" and announcement.is_critical
    assert "panic mode: 3 of 4 instances unhealthy" in announcement.message
    assert (announcement.details["unhealthy"], announcement.details["instances"]) == (3, 4)
    # Panic routes to every instance (Envoy): the two ejected ones go back in, recorded.
    await wait_for(lambda: len(restores()) == 2, timeout=30, what="the ejected instances restored")
    assert {e.instance_id for e in restores()} == {failing[0][:12], failing[1][:12]}
    assert all(e.success and e.details["panic"] is True for e in restores())
    assert all(e.failure_event_id == announcement.cause_event_id for e in restores())
    assert nginx.down(app) == set()
    await wait_for(lambda: nginx.spread(24) == {"box0", "box1", "box2", "box3"}, timeout=10, what="all four routed")
    # More failures come and nothing is ejected while the panic lasts.
    third = failing[2][:12]
    await wait_for(lambda: sum(1 for e in outputs.events(FailureDetected) if e.instance_id == third) >= 4, timeout=30,
                   what="more failures of the third")  # fmt: skip
    assert len(executed(outputs, S.REMOVE_FROM_LB)) == 4 and nginx.down(app) == set()
    assert len(panic()) == 1
    # Two come back: the panic ends, and the one still failing is taken out by its next failure.
    for container in failing[:2]:
        await asyncio.to_thread(health_returns, container)
    await wait_for(lambda: panic(False), timeout=30, what="panic left")
    await wait_for(lambda: nginx.down(app) == {third}, timeout=30, what="the still failing one ejected again")
    await wait_for(lambda: nginx.spread() == {"box0", "box1", "box2"}, timeout=10, what="routing around it")
    assert len(panic()) == 1 and len(panic(False)) == 1


async def test_a_failed_reload_puts_the_previous_upstream_file_back(tmp_path: Path) -> None:
    from autoserve_recovery.adapters.nginx import NginxUpstreams
    from autoserve_recovery.ports import RecoveryError

    members = [Member("a", LOCALHOST, 18001), Member("b", LOCALHOST, 18002)]
    good = NginxUpstreams(NginxSettings(tmp_path, ("true",)))
    await good.set_down("web", members, "a", True)
    before = (tmp_path / "web.conf").read_text()
    broken = NginxUpstreams(
        NginxSettings(tmp_path, ("nginx", "-p", str(tmp_path), "-c", "/nonexistent.conf", "-s", "reload"))
    )
    with pytest.raises(RecoveryError, match="nginx reload failed"):
        await broken.set_down("web", members, "b", True)
    assert (tmp_path / "web.conf").read_text() == before and parse_down(before) == {"a"}
    with pytest.raises(RecoveryError, match="instance 'zz' is not a member of web's upstream"):
        await good.set_down("web", members, "zz", True)
