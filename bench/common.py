"""Shared pieces of the benchmarks: scratch paths, result tables, /proc sampling, and the
real components (nginx, nats-server, the prober service) started as child processes.

Everything listens on and talks to 127.0.0.1 only. Every wait is bounded in time.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client
from nats.js import JetStreamContext

from autoserve_events import PROBES_STREAM
from autoserve_runtime import EmbeddedNatsServer, connect, free_port, spawn_child, stop_child

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / ".work"
LOG_DIR = WORK_DIR / "logs"
VENV_BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


# ---------------------------------------------------------------------------- tables


@dataclass
class Table:
    """One result table, rendered both with rich (terminal) and as Markdown (RESULTS.md)."""

    title: str
    columns: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(cell) for cell in cells])

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.columns))) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def rich(self) -> object:
        from rich.table import Table as RichTable

        table = RichTable(title=self.title, caption="\n".join(self.notes) or None, caption_justify="left")
        for i, column in enumerate(self.columns):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in self.rows:
            table.add_row(*row)
        return table


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


# ---------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (one scan of /proc per level, bounded depth)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, level = [pid], [pid]
    for _ in range(8):
        level = [child for p in level for child in parents.get(p, [])]
        if not level:
            break
        found += level
    return found


def total_cpu(pids: Sequence[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def total_rss(pids: Sequence[int]) -> int:
    return sum(rss_bytes(pid) for pid in pids)


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all CPUs, /proc/stat), to spot other load."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK  # guest time is already in user


def own_cpu() -> float:
    """This process and its waited-for children (wrk, the transport subprocesses)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class CpuWindow:
    """CPU seconds of named process groups over one window, and of everything else on the
    machine ("other": load that is none of ours, e.g. another test run on the same box)."""

    def __init__(self, groups: dict[str, Sequence[int]]) -> None:
        self.groups = groups
        self.start_values = self._snapshot()
        self.started = time.monotonic()

    def _snapshot(self) -> dict[str, float]:
        values = {name: total_cpu(pids) for name, pids in self.groups.items()}
        values["_own"], values["_machine"] = own_cpu(), machine_busy()
        return values

    def stop(self) -> dict[str, float]:
        end = self._snapshot()
        used = {name: end[name] - self.start_values[name] for name in end}
        used["other"] = max(0.0, used.pop("_machine") - sum(used.values()))
        used.pop("_own")
        used["wall"] = time.monotonic() - self.started
        return used


_quiet_budget_s = [90.0]  # for the whole run: waiting for a quiet machine never costs more


async def wait_quiet(groups: dict[str, Sequence[int]], *, limit: float = 0.25, max_wait: float = 20.0) -> float:
    """Before a measured window, wait (bounded, per window and per run) until load from
    outside the benchmark is under ``limit`` of one core, so windows are measured on a
    quiet machine when possible. Returns the seconds waited; "other load" is always
    reported, so a window measured on a busy machine shows it."""
    waited = 0.0
    deadline = time.monotonic() + min(max_wait, _quiet_budget_s[0])
    while True:
        window = CpuWindow(groups)
        await asyncio.sleep(1.0)
        used = window.stop()
        waited += used["wall"]
        if used["other"] / used["wall"] < limit or time.monotonic() >= deadline:
            _quiet_budget_s[0] = max(0.0, _quiet_budget_s[0] - max(0.0, waited - 1.0))
            return waited


def machine() -> tuple[int, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return len(os.sched_getaffinity(0)), model  # what nproc prints


# ---------------------------------------------------------------------------- processes


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}; see {LOG_DIR}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


NGINX_CONF = """\
# Written by bench/common.py: a static /health target for the benchmarks.
daemon off;
master_process off;
worker_rlimit_nofile 65536;
pid {work}/nginx.pid;
error_log {work}/logs/nginx-error.log warn;
events {{
    worker_connections 32768;
    multi_accept on;
}}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {work}/nginx-tmp/body;
    proxy_temp_path {work}/nginx-tmp/proxy;
    fastcgi_temp_path {work}/nginx-tmp/fastcgi;
    uwsgi_temp_path {work}/nginx-tmp/uwsgi;
    scgi_temp_path {work}/nginx-tmp/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /health {{
            default_type text/plain;
            return 200 "ok";
        }}
    }}
}}
"""


class Nginx:
    """One nginx process (``master_process off``) serving ``/health`` on 127.0.0.1."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"

    def start(self) -> Nginx:
        (WORK_DIR / "nginx-tmp").mkdir(parents=True, exist_ok=True)
        conf = WORK_DIR / "nginx.conf"
        conf.write_text(NGINX_CONF.format(work=WORK_DIR, port=self.port))
        # Started through a link named bench-nginx: `pkill -x nginx` (scripts/ensure-system.sh,
        # run by `make system` and the test suite) must not take the benchmark's target down.
        link = WORK_DIR / "bench-nginx"
        link.unlink(missing_ok=True)
        link.symlink_to(shutil.which("nginx") or "/usr/sbin/nginx")
        with (LOG_DIR / "nginx.out").open("ab") as out:
            self.process = spawn_child([str(link), "-p", str(WORK_DIR), "-c", str(conf)], stdout=out, stderr=out)
        wait_for_port(self.port, self.process, "nginx")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_child(self.process, 5.0)


def nats_server(name: str = "nats") -> EmbeddedNatsServer:
    """A fresh nats-server (not started yet) with its data under bench/.work/<name>: a
    stream or consumer left by an earlier run would change what a section measures."""
    data = WORK_DIR / name
    shutil.rmtree(data, ignore_errors=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return EmbeddedNatsServer(data, log_file=LOG_DIR / f"{name}.log")


def autoserve(*args: str, timeout: float = 120.0) -> str:
    """Run the ``autoserve`` command line to completion (bounded) and return its output."""
    done = subprocess.run(
        [str(VENV_BIN / "autoserve"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"autoserve {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout.strip()


# ---------------------------------------------------------------------------- prober


def write_config(
    name: str,
    apps: dict[str, int],
    port: int,
    *,
    keep_alive: bool = True,
) -> Path:
    """A config file with ``count`` instances per app, all probing 127.0.0.1:``port``/health
    every second. Written by hand (flow style) because 10,000 instances is a big file."""
    lines = ["apps:"]
    for app, count in apps.items():
        lines += [
            f"  {app}:",
            "    health_check:",
            "      protocol: HTTP",
            "      path: /health",
            f"      port: {port}",
            "      initial_delay_seconds: 0",
            "      period_seconds: 1",
            "      timeout_seconds: 1",
            f"      keep_alive: {'true' if keep_alive else 'false'}",
            "    instances:",
        ]
        lines += [f"      - {{id: {app}-{i:05d}, host: 127.0.0.1}}" for i in range(count)]
    path = WORK_DIR / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def apply_config(path: Path, nats_url: str) -> str:
    return autoserve("apply", "-c", str(path), "--nats-url", nats_url)


class ProberProcess:
    """``autoserve run prober --no-docker`` as a child process, its logs under bench/.work."""

    def __init__(self, nats_url: str, workers: int = 1, label: str = "prober") -> None:
        self.nats_url = nats_url
        self.workers = workers
        self.label = label
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ProberProcess:
        command = [str(VENV_BIN / "autoserve"), "run", "prober", "--nats-url", self.nats_url, "--no-docker"]
        command += ["--workers", str(self.workers)]
        env = {**os.environ, "AUTOSERVE_LOG_LEVEL": "warning"}
        env.pop("AUTOSERVE_BENCH_PATCHES", None)
        with (LOG_DIR / f"{self.label}.log").open("ab") as log:
            self.process = spawn_child(command, stdout=log, stderr=log, env=env)
        return self

    def pids(self) -> list[int]:
        assert self.process is not None
        return descendants(self.process.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            stop_child(self.process, 15.0)


# ---------------------------------------------------------------------------- NATS


async def environment(stack: AsyncExitStack) -> tuple[Nginx, EmbeddedNatsServer, Bus]:
    """nginx, nats-server and the benchmark's NATS connection, each stopped by ``stack``."""
    nginx = Nginx()
    stack.callback(nginx.stop)
    nginx.start()
    nats = nats_server()
    stack.callback(nats.stop)
    nats.start()
    bus = await Bus.open(nats.url)
    stack.push_async_callback(bus.close)
    return nginx, nats, bus


class Bus:
    """The benchmark's own NATS connection: stream sequence numbers and purges only."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()

    @classmethod
    async def open(cls, url: str) -> Bus:
        return cls(await connect(url, "autoserve-bench", timeout=10.0))

    async def last_seq(self) -> int:
        info = await self.js.stream_info(PROBES_STREAM)
        return info.state.last_seq

    async def purge(self) -> None:
        await self.js.purge_stream(PROBES_STREAM)

    async def wait_for_probes(self, since: int, count: int, timeout: float) -> bool:
        """True once ``count`` probes beyond sequence ``since`` are stored (within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.last_seq() - since >= count:
                return True
            await asyncio.sleep(0.2)
        return False

    async def close(self) -> None:
        await self.nc.close()


async def until(condition: Callable[[], Awaitable[bool] | bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if await result if asyncio.iscoroutine(result) else result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:g}s")
        await asyncio.sleep(0.05)
