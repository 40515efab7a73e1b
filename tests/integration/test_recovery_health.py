# ruff: noqa: F811  (pytest fixtures imported from test_recovery_docker are used as parameters)
"""The app's health check as the recovery service runs it (a rolling restart waits for
each member with it): the prober's own check, so an https app with required headers and
its own expected status codes can be rolled. Real TLS servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from autoserve_config import AppSpec, HealthCheckConfig
from autoserve_events import RecoveryExecuted, RecoveryStrategy
from autoserve_recovery.adapters.health import HealthChecks
from autoserve_recovery.adapters.process import register
from autoserve_recovery.ports import Member
from autoserve_runtime import free_port

from ..conftest import allow_secret_file, plant_secret
from ..support.recovery import check_failed, publish_copies
from .conftest import LOCALHOST, Outputs, apply_yaml, check, config_for, wait_for
from .test_recovery_docker import executed, recoveries  # noqa: F401

S = RecoveryStrategy
TOKEN = plant_secret("s3cret-health-token", "health check header token")

# An https app: /health answers 204 to a request with the right X-Token, 401 to any other.
# While its marker file exists, a start takes 30 s before it listens.
SERVER = """
import http.server, os, ssl, sys, time
port, cert, key, slow = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[5]
token = open(sys.argv[4]).read()  # a file: a command line is recorded and shown by ps
if os.path.exists(slow):
    time.sleep(30)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/health" and self.headers.get("X-Token") == token
        self.send_response(204 if ok else 401)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


def secure_check(**overrides: object) -> dict:
    return check(path="/health", scheme="https", verify_ssl=False, headers={"X-Token": TOKEN},
                 expected_status_codes=[204], failure_threshold=2, **overrides)  # fmt: skip


@pytest.fixture
def https_processes(tmp_path: Path, tls_cert: tuple[Path, Path]) -> Iterator[tuple[str, Path, dict[str, int]]]:
    """Two https servers, recorded as restartable instances web-1 and web-2 of one app
    (``<tmp>/<instance>.slow`` makes the next start of one slow)."""
    app = f"tls-{uuid.uuid4().hex[:8]}"
    directory = tmp_path / "processes"
    script = tmp_path / "https_server.py"
    script.write_text(SERVER)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    allow_secret_file(token_file)
    ports, started = {}, []
    for instance in ("web-1", "web-2"):
        port = free_port()
        slow = tmp_path / f"{instance}.slow"
        argv = [sys.executable, str(script), str(port), str(tls_cert[0]), str(tls_cert[1]), str(token_file), str(slow)]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        register(directory, app, instance, argv, port)
        record = directory / app / f"{instance}.json"
        record.write_text(json.dumps({**json.loads(record.read_text()), "pid": process.pid}))
        ports[instance] = port
        started.append(process)
    yield app, directory, ports
    for process in started:
        process.kill()
        process.wait()
    for instance in ports:
        pid = json.loads((directory / app / f"{instance}.json").read_text())["pid"]
        if pid not in {p.pid for p in started}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def pid_of(directory: Path, app: str, instance: str) -> int:
    return int(json.loads((directory / app / f"{instance}.json").read_text())["pid"])


def rolling_config(app: str, ports: dict[str, int], **recovery: object) -> str:
    instances = [{"id": i, "host": LOCALHOST, "port": p} for i, p in ports.items()]
    rules = {"strategies": {"health_check_failed": ["rolling_restart"]}, "escalate": False, **recovery}
    return config_for({app: {"health_check": secure_check(), "instances": instances, "recovery": rules}})


def rollings(outputs: Outputs) -> list[RecoveryExecuted]:
    return [e for e in executed(outputs, S.ROLLING_RESTART) if "member_of" not in e.details]


async def test_a_rolling_restart_of_an_https_app_waits_for_each_member_with_its_own_check(
    nc: Client, recoveries, outputs: Outputs, https_processes: tuple[str, Path, dict[str, int]]
) -> None:
    app, directory, ports = https_processes
    await apply_yaml(nc, rolling_config(app, ports, action_timeout_seconds=20))
    checks = HealthChecks()
    spec = AppSpec(health_check=HealthCheckConfig(**secure_check()))
    try:  # both answer before the failure is published
        for instance, port in ports.items():
            assert await checks.answers(app, Member(instance, LOCALHOST, port), spec, time.monotonic() + 10) is None
    finally:
        await checks.close()
    before = {i: pid_of(directory, app, i) for i in ports}
    await recoveries(docker=False, process_dir=directory)
    await publish_copies(nc, check_failed(app, "web-2"))  # the failure that causes the rolling restart

    await wait_for(lambda: rollings(outputs), timeout=60, what="a rolling restart")
    (rolling,) = rollings(outputs)
    assert rolling.success, rolling.error
    assert rolling.details["restarted"] == ["web-2", "web-1"]  # the failing one first
    (member,) = [e for e in executed(outputs, S.ROLLING_RESTART) if "member_of" in e.details]
    assert (member.instance_id, member.success, member.details["member_of"]) == ("web-1", True, "web-2")
    after = {i: pid_of(directory, app, i) for i in ports}
    assert all(after[i] != before[i] for i in ports), (before, after)
    assert rolling.details["pid"] == after["web-2"] and member.details["pid"] == after["web-1"]


async def test_the_direct_check_honours_scheme_verify_ssl_headers_and_expected_codes(
    https_target: int, https_processes: tuple[str, Path, dict[str, int]]
) -> None:
    app, _, ports = https_processes
    checks = HealthChecks()
    deadline = lambda seconds: time.monotonic() + seconds  # noqa: E731
    try:
        fixture = Member("i-1", LOCALHOST, https_target)  # the prober tests' TLS target: GET /health, 200
        unverified = AppSpec(health_check=HealthCheckConfig(**check(path="/health", scheme="https", verify_ssl=False)))
        assert await checks.answers("a", fixture, unverified, deadline(10)) is None
        verified = AppSpec(health_check=HealthCheckConfig(**check(path="/health", scheme="https")))
        assert (await checks.check("a", fixture, verified) or "").startswith("TLS error")  # self-signed
        plain = AppSpec(health_check=HealthCheckConfig(**check(path="/health")))
        assert await checks.check("a", fixture, plain) is not None  # plain HTTP to a TLS port never passes

        secured = Member("web-1", LOCALHOST, ports["web-1"])
        assert await checks.answers(app, secured, AppSpec(health_check=HealthCheckConfig(**secure_check())),
                                    deadline(10)) is None  # fmt: skip
        no_token = AppSpec(health_check=HealthCheckConfig(**{**secure_check(), "headers": None}))
        assert await checks.check(app, secured, no_token) == "Unexpected status code: 401"
        wants_200 = AppSpec(health_check=HealthCheckConfig(**{**secure_check(), "expected_status_codes": [200]}))
        error = await checks.answers(app, secured, wants_200, deadline(0.5))
        assert error is not None and "Unexpected status code: 204" in error
    finally:
        await checks.close()


async def test_a_rolling_restart_that_runs_out_of_time_says_which_timeout_and_where(
    nc: Client, recoveries, outputs: Outputs, https_processes: tuple[str, Path, dict[str, int]]
) -> None:
    app, directory, ports = https_processes
    await apply_yaml(nc, rolling_config(app, ports, action_timeout_seconds=8))
    await recoveries(docker=False, process_dir=directory)
    web1 = pid_of(directory, app, "web-1")
    (directory.parent / "web-2.slow").touch()  # web-2 comes back, but only after the action's time
    await publish_copies(nc, check_failed(app, "web-2"))  # the failure that causes the rolling restart

    await wait_for(lambda: rollings(outputs), timeout=60, what="a rolling restart")
    (rolling,) = rollings(outputs)
    assert not rolling.success
    # Its own deadline, not _act's cancellation ("did not finish within ..."), and no
    # misleading error of a step that was given no time.
    assert rolling.error.startswith("rolling_restart: action_timeout_seconds (8s) ran out while restarting web-2 ("), (
        rolling.error
    )
    assert "does not accept" in rolling.error and rolling.error.endswith("; stopped there (restarted: none)")
    assert rolling.duration_ms < 8000
    assert pid_of(directory, app, "web-1") == web1  # the next member was not started on no time
    assert [e for e in executed(outputs, S.ROLLING_RESTART) if "member_of" in e.details] == []
