# ruff: noqa: F811  (pytest fixtures imported from test_recovery_docker are used as parameters)
"""The local-process runtime (for machines without Docker): a killed process is started
again from its record and serves again, through prober, detector and recovery."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from autoserve_events import RecoveryStrategy
from autoserve_runtime import free_port

from ..support.processes import recorded_process, serving
from .conftest import Outputs, WatchLocally, check, wait_for
from .test_recovery_docker import executed, recoveries  # noqa: F401


async def test_a_killed_local_process_is_started_again_and_serves(
    recoveries, outputs: Outputs, http_process: tuple[Path, int], watch_locally: WatchLocally
) -> None:
    directory, port = http_process
    await watch_locally("web-1", port, health_check=check(path="/", failure_threshold=2))
    await recoveries(docker=False, process_dir=directory)
    await wait_for(lambda: serving(port), what="serving")
    old_pid = json.loads((directory / "demo" / "web-1.json").read_text())["pid"]
    os.kill(old_pid, signal.SIGKILL)
    await wait_for(lambda: executed(outputs, RecoveryStrategy.RESTART_CONTAINER), timeout=30, what="a restart")
    restart = executed(outputs, RecoveryStrategy.RESTART_CONTAINER)[0]
    assert restart.success, restart.error
    assert restart.failure_type == "port_not_listening" and restart.details["pid"] != old_pid
    await wait_for(lambda: serving(port), timeout=10, what="serving again")


# Serves "/" on the port given, then crashes (exit 1, nothing closed) after the seconds given.
CRASHER = (
    "import http.server, os, sys, threading;"
    "server = http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler);"
    "threading.Timer(float(sys.argv[2]), os._exit, (1,)).start();"
    "server.serve_forever()"
)


@pytest.fixture
def crash_looping_process(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A process that crashes 2 s after every start, recorded as demo/web-3 (the demo's web-3)."""
    port = free_port()
    directory = tmp_path / "processes"
    with recorded_process([sys.executable, "-c", CRASHER, str(port), "2"], directory, "demo", "web-3", port,
                          cwd=tmp_path):  # fmt: skip
        yield directory, port


async def test_a_crash_looping_local_process_keeps_coming_back_past_the_old_escalation_point(
    recoveries, outputs: Outputs, crash_looping_process: tuple[Path, int], watch_locally: WatchLocally
) -> None:
    """Issue 9: after 3 restarts and a recreate, recovery went on to replace_instance, which
    a local process cannot do, and the demo's web-3 stayed down. Now the chain ends at the
    process runtime's limit: every attempt is a restart or a recreate that works, the ones
    past the limit say so, and the process serves again after each crash."""
    directory, port = crash_looping_process
    fast = {"backoff_initial_seconds": 0.2, "backoff_max_seconds": 0.5, "max_restarts": 3}
    await watch_locally("web-3", port, health_check=check(path="/", failure_threshold=1), recovery=fast)
    await recoveries(docker=False, process_dir=directory)

    def remediations() -> list:
        return [e for e in executed(outputs, instance="web-3") if e.strategy is not RecoveryStrategy.REMOVE_FROM_LB]

    # 3 restarts, a recreate, then where replace_instance and scale_out used to come.
    await wait_for(lambda: len(remediations()) >= 7, timeout=90, what="seven remediations of web-3")
    done = remediations()
    assert all(e.success for e in done), [(e.strategy, e.error) for e in done]
    assert {e.strategy for e in done} <= {RecoveryStrategy.RESTART_CONTAINER, RecoveryStrategy.RECREATE_CONTAINER}
    past = [e for e in done[4:] if "chain_end" in e.details]
    assert past and all(e.details["escalation_wanted"] == "replace_instance" for e in past), done[4:]
    assert "process runtime's limit" in past[0].details["chain_end"]
    assert len({e.details["pid"] for e in done}) == len(done)  # a fresh process every time
    await wait_for(lambda: serving(port), timeout=15, what="serving again after the last restart")
