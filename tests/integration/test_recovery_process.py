# ruff: noqa: F811  (pytest fixtures imported from test_recovery_docker are used as parameters)
"""The local-process runtime (for machines without Docker): a killed process is started
again from its record and serves again, through prober, detector and recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from autoserve_events import RecoveryStrategy
from autoserve_prober.service import ProberService
from autoserve_recovery.adapters.process import register
from autoserve_runtime import EmbeddedNatsServer, free_port

from .conftest import LOCALHOST, Outputs, ServiceRunner, apply_yaml, check, config_for, wait_for
from .test_recovery_docker import executed, recoveries  # noqa: F401


def serving(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def http_process(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """``python -m http.server`` on 127.0.0.1, recorded as restartable instance demo/web-1."""
    port = free_port()
    directory = tmp_path / "processes"
    argv = [sys.executable, "-m", "http.server", "--bind", LOCALHOST, str(port), "--directory", str(tmp_path)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    register(directory, "demo", "web-1", argv, port)
    record = directory / "demo" / "web-1.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "pid": process.pid}))
    yield directory, port
    process.kill()
    process.wait()
    pid = json.loads(record.read_text())["pid"]
    if pid != process.pid:
        os.kill(pid, signal.SIGKILL)


async def test_a_killed_local_process_is_started_again_and_serves(
    nats_server: EmbeddedNatsServer, nc: Client, detector_runner: ServiceRunner, recoveries, outputs: Outputs,
    http_process: tuple[Path, int],
) -> None:  # fmt: skip
    directory, port = http_process
    await apply_yaml(nc, config_for({"demo": {"health_check": check(path="/", failure_threshold=2),
                                              "instances": [{"id": "web-1", "host": LOCALHOST, "port": port}]}}))  # fmt: skip
    await detector_runner.start()
    prober = ServiceRunner(lambda: ProberService(nats_server.url, docker=False))
    await prober.start()
    try:
        await recoveries(docker=False, process_dir=directory)
        await wait_for(lambda: serving(port), what="serving")
        old_pid = json.loads((directory / "demo" / "web-1.json").read_text())["pid"]
        os.kill(old_pid, signal.SIGKILL)
        await wait_for(lambda: executed(outputs, RecoveryStrategy.RESTART_CONTAINER), timeout=30, what="a restart")
        restart = executed(outputs, RecoveryStrategy.RESTART_CONTAINER)[0]
        assert restart.success, restart.error
        assert restart.failure_type == "port_not_listening" and restart.details["pid"] != old_pid
        await wait_for(lambda: serving(port), timeout=10, what="serving again")
    finally:
        await prober.stop()
