"""``autoserve up`` as a supervisor, with real processes: a crashed service or nats-server
is started again and the rest keep running; SIGTERM stops each child with one SIGTERM;
SIGKILL of ``up`` leaves nothing behind, not even what the recovery service restarted."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest

from autoserve_runtime import free_port, stop_child
from autoserve_runtime.nats_server import free_ports

from ..support.processes import http_server, recorded_process, serving
from .conftest import LOCALHOST, check, config_for
from .test_cli import AUTOSERVE, wait_until

SERVICES = ("prober", "detector", "breaker", "recovery", "reporter", "alerter")  # up's start order
pytestmark = pytest.mark.timeout(300)  # a whole `up` starts on a shared 2-core machine


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Running, not a zombie (a zombie holds no port and no memory, but is a reaping bug
    when it is ours: see ``zombie``)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def cmdline(pid: int) -> list[str]:
    try:
        return [p.decode() for p in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    except OSError:
        return []


@dataclass
class Up:
    process: subprocess.Popen[bytes]
    data: Path
    output: Path
    nats_port: int
    metrics_base: int

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def children(self) -> dict[str, int]:
        """up's live children by name (services, nats-server, the watchdog)."""
        found: dict[str, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            stat = _stat(int(entry.name))
            if stat is None or stat[0] == "Z" or int(stat[1]) != self.process.pid:
                continue
            argv = cmdline(int(entry.name))
            if argv and argv[0].endswith("nats-server"):
                found["nats-server"] = int(entry.name)
            elif "run" in argv and "autoserve_cli.main" in argv:
                found[argv[argv.index("run") + 1]] = int(entry.name)
            elif "autoserve_cli.watchdog" in argv:
                found["watchdog"] = int(entry.name)
        return found

    def metrics_port(self, service: str) -> int:
        return self.metrics_base + SERVICES.index(service)

    def ready(self, service: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{LOCALHOST}:{self.metrics_port(service)}/readyz", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def metric(self, service: str, name: str) -> float:
        url = f"http://{LOCALHOST}:{self.metrics_port(service)}/metrics"
        with urllib.request.urlopen(url, timeout=2) as response:
            lines = response.read().decode().splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))

    def all_ready(self) -> bool:
        assert self.process.poll() is None, self.text()[-3000:]
        return set(SERVICES) <= self.children().keys() and all(self.ready(s) for s in SERVICES)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """An HTTP server recorded as restartable instance web/web-1 under up's data dir."""
    port = free_port()
    data = tmp_path / "data"
    with recorded_process(
        http_server(port, tmp_path), data / "processes", "web", "web-1", port, start_new_session=True
    ):
        yield data, port


@pytest.fixture
def start_up(tmp_path: Path, target: tuple[Path, int]) -> Iterator[Callable[[], Up]]:
    data, port = target
    config = tmp_path / "up.yaml"
    config.write_text(config_for({"web": {"health_check": check(path="/", failure_threshold=1),
                                          "instances": [{"id": "web-1", "host": LOCALHOST, "port": port}],
                                          "recovery": {"backoff_initial_seconds": 0.2}}}))  # fmt: skip
    started: list[Up] = []

    def start() -> Up:
        nats_port, base = free_port(), free_ports(len(SERVICES))
        output = tmp_path / "up.out"
        env = {**os.environ, "AUTOSERVE_METRICS_PORT": str(base), "AUTOSERVE_REPORTER_LISTEN": f"{LOCALHOST}:{free_port()}",
               "AUTOSERVE_STATUS_LISTEN": f"{LOCALHOST}:{free_port()}"}  # fmt: skip
        with output.open("wb") as out:
            process = subprocess.Popen(
                [AUTOSERVE, "up", "-c", str(config), "--data-dir", str(data), "--nats-port", str(nats_port), "--no-status"],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        up = Up(process, data, output, nats_port, base)
        started.append(up)
        wait_until(up.all_ready, 150, "every service under up to answer /readyz with 200")
        return up

    yield start
    for up in started:
        stop_child(up.process, 60)


def test_a_killed_service_is_restarted_and_the_others_keep_running(start_up: Callable[[], Up]) -> None:
    up = start_up()
    before = up.children()
    os.kill(before["detector"], signal.SIGKILL)

    wait_until(lambda: up.children().get("detector") not in (None, before["detector"]), 30, "a new detector")
    wait_until(up.all_ready, 60, "every service ready again")
    after = up.children()
    assert {k: v for k, v in after.items() if k != "detector"} == {k: v for k, v in before.items() if k != "detector"}
    assert _stat(before["detector"]) is None  # reaped: no zombie
    assert up.process.poll() is None
    text = up.text()
    assert "detector died (signal SIGKILL)" in text and "restart 1 in 1s" in text, text[-2000:]
    assert str(up.data / "logs" / "detector.log") in text


async def test_a_killed_nats_server_is_restarted_on_its_store_and_services_reconnect(
    start_up: Callable[[], Up],
) -> None:
    up = start_up()
    before = up.children()
    old = before["nats-server"]
    old_argv = cmdline(old)
    os.kill(old, signal.SIGKILL)

    wait_until(lambda: up.children().get("nats-server") not in (None, old), 30, "a new nats-server")
    new = up.children()["nats-server"]
    assert cmdline(new) == old_argv  # the same port and the same -sd store
    assert _stat(old) is None  # reaped: no zombie
    wait_until(up.all_ready, 60, "every service ready again on the new nats-server")
    assert {k: v for k, v in up.children().items() if k != "nats-server"} == {
        k: v for k, v in before.items() if k != "nats-server"
    }  # services reconnected, none restarted
    assert all(up.metric(s, "autoserve_nats_reconnects") >= 1 for s in SERVICES)
    # The pipeline works on the restarted server: fresh probes arrive, and the stream kept what it had.
    nc = await nats.connect(f"nats://{LOCALHOST}:{up.nats_port}")
    try:
        sub = await nc.subscribe("autoserve.probe.completed.>")
        await sub.next_msg(timeout=30)
        info = await nc.jetstream().stream_info("AUTOSERVE_PROBES")
        assert info.state.first_seq == 1 and info.state.messages > 1
    finally:
        await nc.close()
    assert "nats-server died (signal SIGKILL)" in up.text()


def test_sigterm_stops_each_child_with_one_sigterm_and_exit_0(start_up: Callable[[], Up]) -> None:
    up = start_up()
    children = up.children()
    began = time.monotonic()
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(60) == 0, up.text()[-3000:]
    took = time.monotonic() - began
    text = up.text()
    for name in (*SERVICES, "nats-server"):
        assert f"{name} stopped (exit code 0)" in text, text[-3000:]
    for name in SERVICES:  # a second SIGTERM makes a service stop at once, cutting its drain
        assert "a second signal" not in (up.data / "logs" / f"{name}.log").read_text(), name
    assert took < 15 + 10, took  # within the grace: nobody needed a SIGKILL
    assert "SIGKILL" not in text
    # Services first, the bus last.
    assert text.index("nats-server stopped") > max(text.index(f"{s} stopped") for s in SERVICES)
    assert not any(alive(pid) for pid in children.values())


def test_sigkill_of_up_leaves_no_process_behind(start_up: Callable[[], Up], target: tuple[Path, int]) -> None:
    data, port = target
    up = start_up()
    record = data / "processes" / "web" / "web-1.json"
    first = json.loads(record.read_text())["pid"]
    wait_until(lambda: serving(port), 30, "the target serving")
    os.kill(first, signal.SIGKILL)  # the recovery service restarts it: then it is recovery's child
    wait_until(lambda: json.loads(record.read_text())["pid"] != first and serving(port), 60, "recovery's restart")
    restarted = json.loads(record.read_text())["pid"]
    assert int(_stat(restarted)[1]) == up.children()["recovery"]  # type: ignore[index]
    pids = [*up.children().values(), restarted]
    ports = [up.nats_port, port, *(up.metrics_port(s) for s in SERVICES)]

    up.process.kill()  # no cleanup code runs in up
    up.process.wait()
    wait_until(lambda: not any(alive(pid) for pid in pids), 40, "every process up started, and recovery's, to be gone")
    wait_until(lambda: all(_free(p) for p in ports), 10, "their ports to be free again")
    assert not list((data / "processes").glob("*/*.json"))  # nothing left for a next run to trip on
