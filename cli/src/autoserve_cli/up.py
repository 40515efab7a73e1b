"""``autoserve up``: the whole system on one machine.

An embedded nats-server (unless ``--nats-url``), streams and buckets provisioned, the
config applied, every built service as its own process, and a live status table. Ctrl-C
or SIGTERM stops everything in order, services first and the bus last (see
``autoserve_runtime.process``), so no process is ever orphaned.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from autoserve_config import Config
from autoserve_runtime import EmbeddedNatsServer, connect, endpoint_for, free_port, provision, spawn_child, stop_child
from autoserve_runtime.observability import PORT_ENV

from .apply import store_config
from .services import SERVICES
from .status import LatestProbes, live_table, rows_that_fit


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


def _spawn(name: str, args: list[str], logs: Path, env: dict[str, str]) -> Child:
    log = logs / f"{name}.log"
    with log.open("ab") as out:
        process = spawn_child([sys.executable, *args], stdout=out, stderr=out, env=env)
    return Child(name, process, log)


def _stop(children: list[Child]) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.terminate()
    for child in children:
        stop_child(child.process)


def _stop_registered(directory: Path, kill: bool = True) -> None:
    """Demo targets the recovery service restarted are not our children: stop them too."""
    import json

    for record in directory.glob("*/*.json"):
        if kill:
            with contextlib.suppress(OSError, ValueError, KeyError):
                os.kill(int(json.loads(record.read_text())["pid"]), signal.SIGTERM)
        record.unlink(missing_ok=True)


def _endpoints(env: dict[str, str]) -> str:
    """Where each service serves /healthz, /readyz and /metrics (its fixed default port)."""
    shown = []
    for name in SERVICES:
        endpoint = endpoint_for(name, env)
        shown.append(f"{name} {endpoint.url}" if endpoint.port else f"{name} off")
    return ", ".join(shown)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nats-server binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def _prepare(nats_url: str, config: Config | None) -> str:
    nc = await connect(nats_url, "autoserve-up", timeout=10)
    try:
        js = nc.jetstream()
        await provision(js)
        return str(await store_config(js, config)) if config else "no config given; using what is in KV"
    finally:
        await nc.close()


async def _watch(nats_url: str, children: list[Child], show_status: bool, console: Console) -> int:
    nc = await connect(nats_url, "autoserve-up-status", timeout=10)
    view = LatestProbes()
    await view.follow(nc.jetstream())
    stop = asyncio.Event()
    failed: list[Child] = []

    async def supervise() -> None:
        while not stop.is_set():
            # Demo targets may exit: the recovery service restarts them (its process runtime).
            failed.extend(c for c in children if c.process.poll() is not None and not c.name.startswith("demo-"))
            if failed:
                stop.set()
            await asyncio.sleep(0.5)

    supervisor = asyncio.create_task(supervise())
    try:
        if show_status:
            await live_table(lambda: view.table("AutoServe Health — Ctrl-C to stop", max_rows=rows_that_fit()), stop)
        else:
            await stop.wait()
    finally:
        supervisor.cancel()
        await nc.close()
    for child in failed:
        console.print(f"[red]{child.name} exited with {child.process.returncode}[/]; see {child.log}")
    return 1 if failed else 0


def up(config: Config | None, args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    data_dir: Path = args.data_dir.resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server: EmbeddedNatsServer | None = None
    children: list[Child] = []

    def terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        nats_url = args.nats_url
        if nats_url is None:
            port = args.nats_port if _port_free(args.nats_port) else free_port()
            server = EmbeddedNatsServer(data_dir / "nats", port=port, log_file=logs / "nats-server.log").start()
            nats_url = server.url
            console.print(f"embedded nats-server at [bold]{nats_url}[/] (JetStream data in {data_dir / 'nats'})")
        console.print(f"config: {asyncio.run(_prepare(nats_url, config))}")
        env = {**os.environ, "AUTOSERVE_NATS_URL": nats_url, "AUTOSERVE_DATA_DIR": str(data_dir)}
        env.pop(PORT_ENV, None)  # one port cannot serve every service: each takes its own default
        if args.demo:  # one process per target, so the recovery service can restart each
            from .demo import TARGETS

            _stop_registered(data_dir / "processes", kill=False)  # records of an earlier run
            for target in TARGETS:
                children.append(_spawn(f"demo-{target}", ["-m", "autoserve_cli.demo", "--target", target], logs, env))
        for name in SERVICES:
            command = ["-m", "autoserve_cli.main", "run", name]
            if name == "prober":
                command += ["--workers", str(args.prober_workers)]
            children.append(_spawn(name, command, logs, env))
        console.print(f"started: {', '.join(c.name for c in children)} (logs in {logs})")
        console.print(f"health and metrics: {_endpoints(env)}")
        return asyncio.run(_watch(nats_url, children, not args.no_status, console))
    except KeyboardInterrupt:
        return 0
    finally:
        console.print("stopping…")
        _stop(children)
        _stop_registered(data_dir / "processes")
        if server is not None:
            server.stop()
        console.print("stopped")
