"""Local processes, for a machine without a Docker engine (the ``make run`` demo).

A process that may be restarted registers itself in ``<dir>/<app>/<instance>.json``:
``{"argv": [...], "pid": N, "port": P, "cwd": "...", "log": "..."}``. A restart stops
the process (SIGTERM, then SIGKILL after half the timeout; the exit is awaited on a pidfd,
not polled), starts the same command again in its own session, writes the new pid, and
waits until the port accepts connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from autoserve_events import RecoveryStrategy

from ..core.strategies import Capabilities
from ..ports import AwaitHealthy, Member, Outcome, RecoveryError

# A fresh process from the recorded command is all a local process can get: a restart, or a
# recreate (the same thing here). Replace and scale out need an image and a port of their
# own; the decision core stops the escalation here instead of trying them (and failing).
CAPABILITIES = Capabilities(
    "process",
    frozenset(
        {RecoveryStrategy.RESTART_CONTAINER, RecoveryStrategy.RECREATE_CONTAINER, RecoveryStrategy.ROLLING_RESTART}
    ),
)


def register(
    directory: Path, app_name: str, instance_id: str, argv: list[str], port: int, log: Path | None = None
) -> None:
    """Called by a process that wants to be restartable (see ``autoserve_cli.demo``)."""
    path = directory / app_name / f"{instance_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"argv": argv, "pid": os.getpid(), "port": port, "cwd": os.getcwd(), "log": str(log) if log else None}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


async def _exited(pid: int, timeout: float) -> bool:
    """Wait for ``pid`` to exit, on a pidfd: the kernel tells us, no polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await asyncio.wait_for(done, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def _accepting(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
            writer.close()
            return True
        await asyncio.sleep(0.05)  # a new process needs a moment to bind; bounded by the deadline
    return False


def _spawn(record: dict) -> subprocess.Popen[bytes]:
    """The same command again, in its own session so it outlives a restart of ours."""
    log = open(record["log"], "ab") if record.get("log") else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(record["argv"], cwd=record.get("cwd"), stdout=log, stderr=log, start_new_session=True)
    finally:
        if log is not subprocess.DEVNULL:
            log.close()


class ProcessRuntime:
    name = "process"
    capabilities = CAPABILITIES

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.children: list[subprocess.Popen[bytes]] = []

    def _path(self, app_name: str, instance_id: str) -> Path:
        return self.directory / app_name / f"{instance_id}.json"

    def owns(self, app_name: str, instance_id: str) -> bool:
        return self._path(app_name, instance_id).exists()

    def _record(self, app_name: str, instance_id: str) -> dict:
        try:
            return json.loads(self._path(app_name, instance_id).read_text())
        except (OSError, ValueError) as exc:
            raise RecoveryError(f"no process record for {app_name}/{instance_id}: {exc}") from None

    async def _terminate(self, pid: int, timeout: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            if not await _exited(pid, timeout):
                os.kill(pid, signal.SIGKILL)
                await _exited(pid, 5)
        for child in list(self.children):  # reap what we started ourselves
            if child.poll() is not None:
                self.children.remove(child)

    async def restart(self, app_name: str, instance_id: str, timeout: float) -> Outcome:
        record = self._record(app_name, instance_id)
        deadline = time.monotonic() + timeout  # one budget for the stop and the start
        await self._terminate(int(record["pid"]), min(timeout / 2, 10))  # SIGKILL after half: room to start
        spawned_at = time.time()
        try:
            child = await asyncio.to_thread(_spawn, record)
        except OSError as exc:
            raise RecoveryError(f"cannot start {record['argv'][0]}: {exc}") from None
        self.children.append(child)
        record["pid"] = child.pid
        record["started_at"] = spawned_at
        path = self._path(app_name, instance_id)
        path.with_suffix(".tmp").write_text(json.dumps(record))
        os.replace(path.with_suffix(".tmp"), path)
        if not await _accepting(int(record["port"]), deadline - time.monotonic()):
            raise RecoveryError(f"restarted {instance_id} (pid {child.pid}) but port {record['port']} does not accept")
        return Outcome({"pid": child.pid, "effective_at": spawned_at})

    async def recreate(self, app_name: str, instance_id: str, timeout: float) -> Outcome:
        return await self.restart(app_name, instance_id, timeout)  # a fresh process is a fresh instance

    async def replace(
        self, app_name: str, instance_id: str, timeout: float, healthy: AwaitHealthy, cause: str = ""
    ) -> Outcome:
        raise RecoveryError("replace_instance needs a container runtime; local processes keep their port")

    async def scale_out(
        self, app_name: str, instance_id: str, max_replicas: int, timeout: float, cause: str = ""
    ) -> Outcome:
        raise RecoveryError("scale_out needs a container runtime; local processes keep their port")

    async def took_effect(
        self, app_name: str, instance_id: str, lineage: str, strategy: str, since: float, cause: str
    ) -> Outcome | None:
        """A restart (or recreate) a crashed replica began: the record names a process
        started after ``since`` that is still alive."""
        if strategy not in ("restart_container", "recreate_container"):
            return None
        record = self._record(app_name, instance_id)
        started = float(record.get("started_at") or 0)
        try:
            os.kill(int(record["pid"]), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, someone else's
        return Outcome({"pid": record["pid"], "effective_at": started}) if started > since else None

    async def stop(self, app_name: str, instance_id: str, timeout: float) -> Outcome:
        await self._terminate(int(self._record(app_name, instance_id)["pid"]), timeout)
        return Outcome()

    async def instances(self, app_name: str) -> list[str]:
        return sorted(p.stem for p in (self.directory / app_name).glob("*.json"))

    async def members(self, app_name: str) -> list[Member]:
        return [Member(i, "127.0.0.1", int(self._record(app_name, i)["port"])) for i in await self.instances(app_name)]
