"""SIGTERM while an action is in flight: ``autoserve run recovery`` as its own process, a
local process that ignores SIGTERM as the target (its restart takes half the action
timeout: the SIGKILL comes after it). Either the action finishes within the drain and is
recorded, or it is cut off, its input given back, and a restarted service does it. Exit
status 0 either way, and never a second action."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from autoserve_events import EVENTS_STREAM, RecoveryExecuted, RecoveryStrategy, subject_for
from autoserve_recovery.adapters.process import register
from autoserve_recovery.feeds import WORK_DURABLE
from autoserve_runtime import EmbeddedNatsServer, free_port

from ..support.recovery import publish_copies, stopped, work_settled
from .conftest import LOCALHOST, Outputs, apply_yaml, check, config_for, stored_events, wait_for
from .test_recovery_claims import consumer_bound, lease_holder

AUTOSERVE = str(Path(sys.executable).parent / "autoserve")

# Listens on argv[1], notes each start in argv[2], and ignores SIGTERM: a restart waits
# for the SIGKILL (half the action timeout), which keeps the action in flight that long.
STUBBORN = """
import signal, socket, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen()
with open(sys.argv[2], "a") as starts:
    starts.write("started\\n")
while True:
    server.accept()[0].close()
"""


@dataclass
class Target:
    data_dir: Path
    record: Path
    starts: Path
    port: int

    def started(self) -> int:
        return len(self.starts.read_text().splitlines()) if self.starts.exists() else 0

    def pid(self) -> int:
        return int(json.loads(self.record.read_text())["pid"])


@pytest.fixture
def stubborn(tmp_path: Path) -> Iterator[Target]:
    """demo/web-1: a restartable local process that ignores SIGTERM; killed afterwards."""
    port, data_dir, starts = free_port(), tmp_path / "data", tmp_path / "starts.txt"
    argv = [sys.executable, "-c", STUBBORN, str(port), str(starts)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    register(data_dir / "processes", "demo", "web-1", argv, port)
    record = data_dir / "processes" / "demo" / "web-1.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "pid": process.pid}))
    target = Target(data_dir, record, starts, port)
    deadline = time.monotonic() + 20
    while target.started() < 1 and time.monotonic() < deadline:
        time.sleep(0.02)  # its first start, before any test acts on it (bounded)
    assert target.started() == 1
    yield target
    process.kill()
    process.wait()
    with contextlib.suppress(ProcessLookupError, ValueError, OSError):
        if target.pid() != process.pid:
            os.kill(target.pid(), signal.SIGKILL)


def spawn(nats_url: str, replica: str, target: Target, log: Path, drain_seconds: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AUTOSERVE_RECOVERY_REPLICA": replica, "AUTOSERVE_RECOVERY_LEASE_SECONDS": "2",
           "AUTOSERVE_RECOVERY_DOCKER": "0", "AUTOSERVE_DATA_DIR": str(target.data_dir),
           "AUTOSERVE_RECOVERY_DRAIN_SECONDS": str(drain_seconds), "AUTOSERVE_LOG_FORMAT": "json"}  # fmt: skip
    with log.open("ab") as out:
        command = [AUTOSERVE, "run", "recovery", "--nats-url", nats_url, "--metrics-port", str(free_port())]
        return subprocess.Popen(command, env=env, stdout=out, stderr=out)


def log_events(log: Path) -> list[str]:
    return [json.loads(line)["event"] for line in log.read_text().splitlines() if line.startswith("{")]


def config(action_timeout: float) -> str:
    return config_for({"demo": {"health_check": check(path="/"), "recovery": {"action_timeout_seconds": action_timeout},
                                "instances": [{"id": "web-1", "host": LOCALHOST, "port": 1}]}})  # fmt: skip


async def sigterm_mid_action(nc: Client, process: subprocess.Popen[bytes], key: str) -> None:
    """SIGTERM once the action's claim is written (the action begins right after it)."""
    await wait_for(lambda: lease_holder(nc, key), 30, "the restart in flight")
    process.send_signal(signal.SIGTERM)


async def test_sigterm_lets_the_action_in_flight_finish_and_record_it(
    nats_server: EmbeddedNatsServer, nc: Client, outputs: Outputs, stubborn: Target, tmp_path: Path
) -> None:
    # action_timeout 6: the SIGKILL after 3 s, the restart done in about 3.5 s; drain 7 s.
    await apply_yaml(nc, config(6))
    log = tmp_path / "p1.log"
    process = spawn(nats_server.url, "p1", stubborn, log, drain_seconds=7)
    try:
        await wait_for(lambda: consumer_bound(nc), 30, "recovery consuming")
        failure = stopped("demo", "web-1")
        await publish_copies(nc, failure, 1)
        await sigterm_mid_action(nc, process, f"f.{failure.event_id}.restart_container")
        code = await asyncio.to_thread(process.wait, 20)
    finally:
        if process.poll() is None:
            process.kill()
    events = log_events(log)
    assert code == 0, log.read_text()[-3000:]
    assert (
        "stopping by cancellation" not in events
        and "drain time ran out: actions cut off, their inputs given back" not in events
    )
    assert events.index("recovery stopping") < events.index("recovery executed")  # it finished during the drain
    (event,) = [e for e in await stored_events(nc, RecoveryExecuted) if e.failure_event_id == failure.event_id]
    assert event.success and event.strategy is RecoveryStrategy.RESTART_CONTAINER, event
    assert event.details["replica"] == "p1" and event.details["pid"] == stubborn.pid()
    assert stubborn.started() == 2  # one restart
    assert await work_settled(nc)  # acknowledged before the exit
    assert (await lease_holder(nc, f"f.{failure.event_id}.restart_container")).done


async def test_sigterm_gives_back_an_action_that_outlasts_the_drain_and_a_restarted_service_does_it_once(
    nats_server: EmbeddedNatsServer, nc: Client, outputs: Outputs, stubborn: Target, tmp_path: Path
) -> None:
    # action_timeout 12: the SIGKILL after 6 s, far past the 2 s drain.
    await apply_yaml(nc, config(12))
    first_log, second_log = tmp_path / "p1.log", tmp_path / "p2.log"
    first = spawn(nats_server.url, "p1", stubborn, first_log, drain_seconds=2)
    second: subprocess.Popen[bytes] | None = None
    failure = stopped("demo", "web-1")
    key = f"f.{failure.event_id}.restart_container"
    naked: list[dict] = []  # nats-server's advisory for each negative acknowledgement

    async def on_nak(msg: Msg) -> None:
        naked.append(json.loads(msg.data))

    advisories = await nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.MSG_NAKED.{EVENTS_STREAM}.{WORK_DURABLE}", cb=on_nak)
    try:
        await wait_for(lambda: consumer_bound(nc), 30, "recovery consuming")
        original = stubborn.pid()
        await publish_copies(nc, failure, 1)
        await sigterm_mid_action(nc, first, key)
        code = await asyncio.to_thread(first.wait, 20)
        await wait_for(lambda: naked, timeout=10, what="the input given back (a nak advisory)")
        seq = (await nc.jetstream().get_last_msg(EVENTS_STREAM, subject_for(failure))).seq
        assert [advisory["stream_seq"] for advisory in naked] == [seq]
        events = log_events(first_log)
        assert code == 0, first_log.read_text()[-3000:]
        assert "drain time ran out: actions cut off, their inputs given back" in events
        assert "stopping by cancellation" not in events  # the service gave it back itself, within the grace
        assert "recovery executed" not in events and outputs.events(RecoveryExecuted) == []
        claim = await lease_holder(nc, key)
        assert claim is not None and claim.owner == "p1" and not claim.done  # begun, not recorded
        assert stubborn.started() == 1 and stubborn.pid() == original  # cut off before the SIGKILL

        second = spawn(nats_server.url, "p2", stubborn, second_log, drain_seconds=7)
        await wait_for(lambda: outputs.events(RecoveryExecuted), timeout=60, what="the restart done by p2")
        await wait_for(lambda: work_settled(nc), 30, "the failure acknowledged")
    finally:
        await advisories.unsubscribe()
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                await asyncio.to_thread(process.wait, 20)
    assert second is not None and second.returncode == 0
    (event,) = [e for e in await stored_events(nc, RecoveryExecuted) if e.failure_event_id == failure.event_id]
    assert event.success and event.details["replica"] == "p2" and "already_done" not in event.details, event
    assert stubborn.started() == 2 and stubborn.pid() == event.details["pid"] != original  # restarted once
    assert (await lease_holder(nc, key)).done
