"""Faults under ``autoserve up``: how long the system is not ready after a crash.

- nats-server SIGKILLed (``up`` starts it again on the same store): time until the bus
  accepts connections again (the floor: ``up``'s 1 s restart backoff plus nats-server's
  start), and until every service's ``/readyz`` answers 200 again;
- each service SIGKILLed: time until ``up`` has started a new process (its 1 s backoff),
  and until that process is ready. New process to ready is the service's own start plus
  its replay: the floor a restart cannot go below.

Everything on 127.0.0.1; ``up`` with the demo config (its targets give the services
something to replay) and its own data directory under bench/.work/faults.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from autoserve_cli.services import SERVICES
from autoserve_runtime import free_port, stop_child
from autoserve_runtime.nats_server import accepts, free_ports
from bench.common import LOG_DIR, REPO_DIR, WORK_DIR, Table, descendants, fmt

ROUNDS = 5
POLL_S = 0.02
SERVICE_NAMES = list(SERVICES)


class UpRun:
    def __init__(self) -> None:
        self.data_dir = WORK_DIR / "faults"
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.data_dir.mkdir(parents=True)
        self.nats_port = free_port()
        self.metrics_base = free_ports(len(SERVICE_NAMES))
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with (LOG_DIR / "faults-up.log").open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "autoserve_cli.main", "up", "--demo", "-c", str(REPO_DIR / "examples" / "demo.yaml"),
                 "--no-status", "--data-dir", str(self.data_dir), "--nats-port", str(self.nats_port)],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "AUTOSERVE_METRICS_PORT": str(self.metrics_base)},
            )  # fmt: skip

    def ready(self, service: str) -> bool:
        port = self.metrics_base + SERVICE_NAMES.index(service)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def all_ready(self) -> bool:
        return all(self.ready(s) for s in SERVICE_NAMES)

    def pid_of(self, name: str) -> int | None:
        for pid in descendants(self.process.pid):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            except OSError:
                continue
            if name == "nats-server" and command[0].endswith(b"nats-server"):
                return pid
            if b"autoserve_cli.main" in command and command[command.index(b"autoserve_cli.main") + 1 :][:2] == [
                b"run",
                name.encode(),
            ]:
                return pid
        return None

    def stop(self) -> None:
        stop_child(self.process, 60)


def _until(condition, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    """Poll ``condition``; the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(POLL_S)
    return time.monotonic()


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]  # nearest rank


def _row(table: Table, what: str, floor: list[float], total: list[float]) -> None:
    table.add(
        what, len(total),
        fmt(statistics.median(floor), 2), fmt(_p(floor, 0.95), 2),
        fmt(statistics.median(total), 2), fmt(_p(total, 0.95), 2),
        f"{statistics.median(total) / statistics.median(floor):.2f}x",
    )  # fmt: skip


def fault_tables() -> list[Table]:
    run = UpRun()
    try:
        _until(run.all_ready, 120, "every service ready")
        table = Table(
            f"Faults under autoserve up --demo: seconds from a SIGKILL until ready again ({ROUNDS} rounds each)",
            ["fault", "rounds", "floor p50", "floor p95", "ready again p50", "ready again p95", "vs floor"],
        )
        bus_back, all_back = [], []
        for _ in range(ROUNDS):
            old = run.pid_of("nats-server")
            assert old is not None, "no nats-server under up"
            killed = time.monotonic()
            os.kill(old, signal.SIGKILL)
            _until(lambda o=old: run.pid_of("nats-server") not in (None, o) and accepts(run.nats_port), 60, "the bus")
            bus_back.append(time.monotonic() - killed)
            all_back.append(_until(run.all_ready, 120, "every service ready") - killed)
        _row(table, "nats-server (floor: the bus accepts connections again)", bus_back, all_back)
        for service in SERVICE_NAMES:
            spawned, ready = [], []
            for _ in range(ROUNDS if service == "detector" else 2):
                old = run.pid_of(service)
                assert old is not None, f"no {service} under up"
                killed = time.monotonic()
                os.kill(old, signal.SIGKILL)
                new_at = _until(lambda s=service, o=old: run.pid_of(s) not in (None, o), 60, f"{service} restarted")
                ready_at = _until(lambda s=service: run.ready(s), 120, f"{service} ready")
                spawned.append(new_at - killed)
                ready.append(ready_at - new_at)
                _until(run.all_ready, 120, "every service ready")
            _row(table, f"{service} (floor: new process to ready, its start and replay)", ready,
                 [s + r for s, r in zip(spawned, ready, strict=True)])  # fmt: skip
        table.notes += [
            "ready again = from the SIGKILL until /readyz answers 200 (every service's, for nats-server).",
            "Between the SIGKILL and a new process: up's restart backoff and its notice of the exit"
            " (a pidfd, no polling). The kills come back to back, so the backoff doubles as for a"
            " crash loop (1, 2, 4, 8, 16 s): it is most of the p95. Ready again minus the floor is"
            " what the services themselves take (reconnect, or start and replay).",
            "The detector is killed 5 times, the other services twice each; p95 is nearest rank.",
        ]
        return [table]
    finally:
        run.stop()
