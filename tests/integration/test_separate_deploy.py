"""Separate deployment, as deploy/README.md tells an operator: nats-server on the deploy
config, the admin provisions and applies, then every service runs as its own
``autoserve run X`` process with its own least-privilege credentials and its own inbox
prefix. A target dies; the failure is detected, the process is restarted, and ``autoserve
report`` shows it; a user's service asks the breaker. The server refuses nothing along the
way, and no planted password appears in any log."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from nats.aio.msg import Msg

from autoserve_cli.services import SERVICES
from autoserve_events import FailureDetected, HealthChanged, RecoveryExecuted, decode
from autoserve_runtime import free_port, spawn_child, stop_child
from autoserve_runtime.breaker_client import BreakerClient

from ..support.processes import http_server, recorded_process
from ..support.secure_nats import AUTOSERVE, SecureNats, command, get, inbox, session
from .conftest import LOCALHOST, check, config_for, wait_for


@pytest.fixture
def target(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """``python -m http.server``, recorded as the restartable local process demo/web-1."""
    port = free_port()
    processes = tmp_path / "data" / "processes"
    with recorded_process(http_server(port, tmp_path), processes, "demo", "web-1", port) as record:
        yield record, port


async def test_each_service_in_its_own_process_with_its_own_credentials_runs_the_full_flow(
    tmp_path: Path, target: tuple[Path, int]
) -> None:
    record, port = target
    secure_nats = SecureNats(tmp_path / "nats").start()
    logs = tmp_path / "logs"
    logs.mkdir()
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    children: dict[str, subprocess.Popen[bytes]] = {}
    outputs: list[str] = []
    try:
        # 1. The admin creates the streams and buckets and stores the config.
        config = tmp_path / "demo.yaml"
        config.write_text(config_for({"demo": {
            "health_check": check(path="/", failure_threshold=2),
            "instances": [{"id": "web-1", "host": LOCALHOST, "port": port}],
        }}))  # fmt: skip
        admin_env = {**os.environ, **secure_nats.env("admin", secrets_dir)}
        applied = await command("apply", "-c", str(config), env=admin_env)
        outputs += [applied.stdout, applied.stderr]
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout.strip() == f"applied to {secure_nats.url}: created: demo"

        # 2. Every service as its own process, with its own user. Passwords reach them three
        #    ways: a file, an environment variable, and (detector) inside the URL itself.
        reporter_port = free_port()
        health_ports = {name: free_port() for name in SERVICES}
        extra = {
            "prober": {"AUTOSERVE_DOCKER": "false"},
            "recovery": {"AUTOSERVE_RECOVERY_DOCKER": "false", "AUTOSERVE_DATA_DIR": str(tmp_path / "data"),
                         "AUTOSERVE_RECOVERY_REPLICA": "r1"},
            "reporter": {"AUTOSERVE_CLICKHOUSE_URL": f"chdb://{tmp_path / 'clickhouse'}",
                         "AUTOSERVE_REPORTER_LISTEN": f"{LOCALHOST}:{reporter_port}"},
        }  # fmt: skip
        for i, name in enumerate(SERVICES):
            env = {**os.environ, "AUTOSERVE_METRICS_PORT": str(health_ports[name]), **extra.get(name, {})}
            for var in [v for v in env if v.startswith("AUTOSERVE_NATS_")]:
                del env[var]
            if name == "detector":
                password = secure_nats.passwords[name]
                env["AUTOSERVE_NATS_URL"] = f"nats://{name}:{password}@{LOCALHOST}:{secure_nats.port}"
                env["AUTOSERVE_NATS_INBOX_PREFIX"] = inbox(name)
            else:
                env |= secure_nats.env(name, secrets_dir if i % 2 else None)
            log = (logs / f"{name}.log").open("wb")
            children[name] = spawn_child([AUTOSERVE, "run", name], env=env, stdout=log, stderr=subprocess.STDOUT)
        for name, health_port in health_ports.items():
            await wait_for(
                lambda p=health_port, n=name: (
                    get(f"http://{LOCALHOST}:{p}/readyz") == 200 or children[n].poll() is not None
                ),
                timeout=90,
                what=f"{name} ready",
            )
            assert children[name].poll() is None, (logs / f"{name}.log").read_text()[-3000:]

        # 3. Watch as the read-only operator does; then the target dies.
        operator = await session(secure_nats, "operator")
        events: list = []

        async def on_event(msg: Msg) -> None:
            events.append(decode(msg.data))

        await operator.nc.subscribe("autoserve.event.>", cb=on_event)

        def of(kind: type) -> list:
            return [e for e in events if isinstance(e, kind) and (e.app_name, e.instance_id) == ("demo", "web-1")]

        await wait_for(lambda: get(f"http://{LOCALHOST}:{port}/") == 200, what="target serving")
        old_pid = json.loads(record.read_text())["pid"]
        os.kill(old_pid, signal.SIGKILL)
        await wait_for(lambda: bool(of(FailureDetected)), timeout=60, what="FailureDetected")
        await wait_for(lambda: any(r.success for r in of(RecoveryExecuted)), timeout=60, what="a successful recovery")
        restart = next(r for r in of(RecoveryExecuted) if r.success)
        assert restart.strategy == "restart_container" and restart.details["pid"] != old_pid
        assert restart.failure_event_id in {f.event_id for f in of(FailureDetected)}
        await wait_for(lambda: get(f"http://{LOCALHOST}:{port}/") == 200, timeout=30, what="target serving again")
        await wait_for(lambda: any(h.healthy for h in of(HealthChanged)[1:]), timeout=30, what="healthy again")
        await operator.nc.close()

        # A user's service asks the breaker, as the `client` user: the answer comes back on
        # the client's own inbox (the breaker may answer, never publish there on its own).
        client = await session(secure_nats, "client")
        try:
            answer = await BreakerClient(client.nc, timeout=5).check("demo", "web-1")
            assert answer.known and answer.state in ("closed", "open", "half_open"), answer
        finally:
            await client.nc.close()

        # 4. The report, from ClickHouse through the reporter.
        report_env = {**os.environ, "AUTOSERVE_REPORTER_URL": f"http://{LOCALHOST}:{reporter_port}"}
        deadline = time.monotonic() + 30
        while True:
            shown = await command("report", "demo", "--json", env=report_env)
            outputs += [shown.stdout, shown.stderr]
            assert shown.returncode == 0, shown.stderr
            report = json.loads(shown.stdout)
            if min(report["failed_checks"], report["successful_checks"]) > 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert report["app_name"] == "demo" and report["failed_checks"] > 0 and report["successful_checks"] > 0
        assert [i["instance_id"] for i in report["instances"]] == ["web-1"]

        async def incident_recovered() -> bool:  # the reporter stores in batches: wait for them
            async with httpx.AsyncClient(base_url=f"http://{LOCALHOST}:{reporter_port}") as client:
                incidents = (await client.get("/v1/apps/demo/incidents")).json()["incidents"]
            return any(i["recovered_by"] == "restart_container" for i in incidents)

        await wait_for(incident_recovered, timeout=30, what="the incident, recovered by restart_container")

        # 5. A clean stop: SIGTERM drains every service, exit status 0.
        for child in children.values():
            child.send_signal(signal.SIGTERM)
        for name, child in children.items():
            assert child.wait(30) == 0, (logs / f"{name}.log").read_text()[-3000:]
    finally:
        for child in children.values():
            stop_child(child)
        secure_nats.stop()

    # Least privilege was enough: the server refused nothing any service asked for.
    assert secure_nats.violations() == []
    # No planted credential in any log: services, the server, the commands' output.
    texts = {p.name: p.read_text(errors="replace") for p in [*logs.iterdir(), secure_nats.log_file]}
    texts["commands"] = "\n".join(outputs)
    assert all(texts[f"{name}.log"].strip() for name in SERVICES)  # the scan read real logs
    # The detector got its password inside its URL; it logs the URL, without the password.
    assert f'"nats": "nats://{LOCALHOST}:{secure_nats.port}"' in texts["detector.log"]
    for user, password in secure_nats.passwords.items():
        leaked = [name for name, text in texts.items() if password in text]
        assert leaked == [], f"{user}'s password appears in {leaked}"
