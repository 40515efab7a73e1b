"""``autoserve up``: the whole system on one machine, supervised.

An embedded nats-server (unless ``--nats-url``), or with ``--cluster N`` a local N-node
JetStream cluster of them, streams and buckets provisioned (replicated N times on the
cluster), the config applied, every built service as its own process, and a live status table.

``up`` is their supervisor (the pure core is ``supervise``; this is its adapter): a
service that dies is started again with a backoff and the others keep running; a dead
nats-server (or cluster node) is reaped and started again on the same ports and store. Ctrl-C or SIGTERM
stops everything in order, services first and the bus last, one SIGTERM each and SIGKILL
after the grace period. A watchdog process (``watchdog``) stops what is left if ``up``
itself is killed, including the demo targets the recovery service restarted.
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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from autoserve_config import Config
from autoserve_runtime import (
    EmbeddedNatsServer,
    ReplicasError,
    connect,
    endpoint_for,
    free_port,
    provision,
    spawn_child,
    stream_replicas,
)
from autoserve_runtime.bus import redact_url
from autoserve_runtime.nats_cluster import EmbeddedNatsCluster
from autoserve_runtime.observability import PORT_ENV
from autoserve_runtime.ownership import member_name

from .apply import store_config
from .cluster_status import ClusterWatch
from .services import SERVICES
from .status import following, live_status
from .supervise import Exited, Policy, Restart, Signal, Start, Supervisor
from .watchdog import clean_up, starttime

# Each service drains within its own grace (10 s; recovery drain_seconds + 3): room for it.
GRACE_SECONDS = 15.0
SERVICES_GROUP, TARGETS_GROUP, BUS_GROUP = 0, 1, 2  # stop order
BUS = "nats-server"  # the single one; a cluster's nodes are nats-1 .. nats-N
CLUSTER = "nats"
EXIT_USAGE = 2


@dataclass
class Child:
    name: str
    log: Path
    launch: Callable[[], subprocess.Popen[bytes]]
    process: subprocess.Popen[bytes] | None = None


def _python_child(args: list[str], log: Path, env: dict[str, str]) -> Callable[[], subprocess.Popen[bytes]]:
    def launch() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return spawn_child([sys.executable, *args], stdout=out, stderr=out, env=env)

    return launch


class Watchdog:
    """The other end of a pipe held by ``autoserve_cli.watchdog`` (see there why)."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        read, write = os.pipe()  # both ends non-inheritable: no other child holds the pipe open
        with log.open("ab") as out:
            # Its own session, no PDEATHSIG: it must outlive us to clean up after us.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "autoserve_cli.watchdog", str(data_dir)],
                stdin=read, stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip
        os.close(read)
        self._pipe = os.fdopen(write, "w", buffering=1)

    def _say(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._pipe.write(line + "\n")

    def started(self, pid: int) -> None:
        self._say(f"+ {pid} {starttime(pid) or 0}")

    def reaped(self, pid: int) -> None:
        self._say(f"- {pid}")

    def bye(self) -> None:
        """We stopped everything ourselves: it has nothing to do."""
        self._say("bye")
        with contextlib.suppress(OSError, ValueError):
            self._pipe.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)


class Runner:
    """Carries out the supervisor's actions on real processes; exits arrive on pidfds."""

    def __init__(
        self, children: dict[str, Child], supervisor: Supervisor, watchdog: Watchdog, console: Console
    ) -> None:
        self.children = children
        self.supervisor = supervisor
        self.watchdog = watchdog
        self.console = console
        self.servers: dict[str, EmbeddedNatsServer] = {}  # the bus: one nats-server, or each node
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, name: str) -> None:
        child = self.children[name]
        child.process = child.launch()
        self.watchdog.started(child.process.pid)
        self.supervisor.started(name, time.monotonic())
        self._watch_exit(child, child.process)

    def _watch_exit(self, child: Child, process: subprocess.Popen[bytes]) -> None:
        loop = asyncio.get_running_loop()
        fd = os.pidfd_open(process.pid)  # readable once it exits: no polling

        def on_exit() -> None:
            if process.poll() is None:  # reaps it: no zombie
                return
            loop.remove_reader(fd)
            os.close(fd)
            self.watchdog.reaped(process.pid)
            self.execute(self.supervisor.exited(child.name, process.returncode, time.monotonic()))
            self._wake.set()  # a restart may now be due

        loop.add_reader(fd, on_exit)

    def execute(self, actions: list) -> None:  # type: ignore[type-arg]
        for action in actions:
            if isinstance(action, Start):
                self._restart(action.name)
            elif isinstance(action, Signal):
                process = self.children[action.name].process
                if process is not None and process.poll() is None:
                    process.send_signal(action.signal)
            elif isinstance(action, Exited):
                self._report(action)

    def _restart(self, name: str) -> None:
        try:
            self.start(name)
        except OSError as exc:  # cannot even start it: count it as a crash, back off
            self.console.print(f"[red]{name}: cannot start: {exc}[/]")
            self.execute(self.supervisor.exited(name, 127, time.monotonic()))
            return
        if name in self.servers:
            task = asyncio.create_task(self._bus_ready(name, self.servers[name]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _bus_ready(self, name: str, server: EmbeddedNatsServer) -> None:
        deadline = time.monotonic() + 15
        with contextlib.suppress(Exception):
            while time.monotonic() < deadline and not server.ready():
                await asyncio.sleep(0.05)
            if server.ready():
                self.console.print(f"{name} ready again at {server.url} (same store {server.store_dir})")

    def _report(self, exited: Exited) -> None:
        """One line each (not wrapped: the log path is to be copied)."""
        child = self.children[exited.name]
        if exited.expected:
            self.console.print(f"{exited.name} stopped ({exited.how})", soft_wrap=True)
        elif exited.restart_in is not None:
            self.console.print(
                f"[yellow]{exited.name} died ({exited.how}) after {exited.ran_for:.1f}s; restart {exited.restarts} "
                f"in {exited.restart_in:g}s; log: {child.log}[/]",
                soft_wrap=True,
            )
        else:
            owner = "; the recovery service restarts it" if exited.name.startswith("demo-") else ""
            self.console.print(f"{exited.name} exited ({exited.how}){owner}; log: {child.log}", soft_wrap=True)

    async def run(self) -> None:
        """Until every child is stopped (after ``stop``)."""
        while not self.supervisor.done:
            due = self.supervisor.next_due()
            timeout = None if due is None else max(0.0, due - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            self.execute(self.supervisor.tick(time.monotonic()))

    def stop(self) -> None:
        self.execute(self.supervisor.stop(time.monotonic()))
        self._wake.set()


def _stop_registered(directory: Path) -> None:
    """Demo targets the recovery service restarted are not our children: stop them too
    (one SIGTERM, SIGKILL after the grace), and forget their records."""
    clean_up({}, directory, GRACE_SECONDS)


def _service_env(env: dict[str, str], index: int) -> dict[str, str]:
    """One port cannot serve every service: each takes its own default, or, when
    ``AUTOSERVE_METRICS_PORT`` is given to ``up``, that port plus its place in the start
    order (0 turns every endpoint off)."""
    base = env.get(PORT_ENV)
    service_env = {k: v for k, v in env.items() if k != PORT_ENV}
    if base is not None and base.strip():
        try:
            port = int(base)
        except ValueError:
            raise SystemExit(
                f"autoserve up: {PORT_ENV}: expected a port number (0 turns it off), got {base!r}"
            ) from None
        if not 0 <= port <= 65535 - len(SERVICES):
            raise SystemExit(f"autoserve up: {PORT_ENV}: must be between 0 and {65535 - len(SERVICES)}, got {port}")
        service_env[PORT_ENV] = str(port + index if port else 0)
    return service_env


def _member_env(env: dict[str, str], service: str) -> dict[str, str]:
    """A service ``up`` restarts comes back as the same member (``up-<service>`` on this host,
    unless AUTOSERVE_MEMBER is given): it renews its own keys and leases at once instead of
    waiting out the dead process's TTL."""
    if env.get("AUTOSERVE_MEMBER"):
        return {}
    return {"AUTOSERVE_MEMBER": member_name(f"{socket.gethostname()}-up-{service}")}


def _endpoints(envs: dict[str, dict[str, str]]) -> str:
    """Where each service serves /healthz, /readyz and /metrics."""
    shown = []
    for name in SERVICES:
        endpoint = endpoint_for(name, envs[name])
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


async def _start_bus(args: argparse.Namespace, data_dir: Path, runner: Runner, stop: asyncio.Event) -> str:
    """The embedded bus, supervised: one nats-server, or ``--cluster N`` nodes on their own
    free ports, routed into one JetStream cluster. Returns its URL (the seed list) once it
    serves; a node that dies is started again on its ports and store like any child."""
    logs = data_dir / "logs"
    if args.cluster:
        cluster = EmbeddedNatsCluster(data_dir / "nats-cluster", args.cluster, name=CLUSTER)
        for name, node in zip(cluster.node_names, cluster.nodes, strict=True):
            node.log_file = logs / f"{name}.log"  # beside the services' logs
        servers = dict(zip(cluster.node_names, cluster.nodes, strict=True))
        url, store, what, timeout = cluster.url, cluster.store_dir, f"{args.cluster}-node NATS cluster", 30.0

        def ready() -> bool:  # every node serving, with a JetStream meta leader
            return all(cluster.healthy(index) for index in range(len(cluster.nodes)))
    else:
        port = args.nats_port if _port_free(args.nats_port) else free_port()
        server = EmbeddedNatsServer(data_dir / "nats", port=port, log_file=logs / "nats-server.log")
        servers, url, store, what, timeout = {BUS: server}, server.url, server.store_dir, BUS, 15.0
        ready = server.ready
    for name, server in servers.items():
        runner.children[name] = Child(name, server.log_file, server.launch)
        runner.supervisor.add(name, Policy(Restart.ALWAYS, BUS_GROUP, grace=GRACE_SECONDS))
        runner.servers[name] = server
        runner.start(name)
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(ready):  # raises if one exited
        if time.monotonic() > deadline or stop.is_set():
            raise SystemExit(f"{what} did not become ready within {timeout:g}s; see the logs in {logs}")
        await asyncio.sleep(0.05)
    runner.console.print(f"embedded {what} at [bold]{url}[/] (JetStream data in {store})", soft_wrap=True)
    return url


def _replicas(args: argparse.Namespace) -> int:
    """The replicas of every stream and bucket: ``AUTOSERVE_STREAM_REPLICAS`` when set, else
    the cluster's size (1 on the single embedded nats-server). Raises ``ReplicasError``."""
    given = os.environ.get("AUTOSERVE_STREAM_REPLICAS", "").strip()
    replicas = stream_replicas() if given else args.cluster or 1
    if args.nats_url is None and replicas > (args.cluster or 1):
        nodes = f"the {args.cluster} nodes of --cluster {args.cluster}" if args.cluster else "one embedded nats-server"
        raise ReplicasError(f"AUTOSERVE_STREAM_REPLICAS={replicas} is more replicas than {nodes} can hold"
                            + ("" if args.cluster else f": add --cluster {replicas}"))  # fmt: skip
    return replicas


async def _prepare(nats_url: str, config: Config | None, replicas: int) -> str:
    nc = await connect(nats_url, "autoserve-up", timeout=10)
    try:
        js = nc.jetstream()
        # Before anything publishes. A cluster restarted on its stores answers /healthz before
        # each stream has a leader again: provision waits for them (60 s at most).
        await provision(js, durables=True, replicas=replicas)
        return str(await store_config(js, config)) if config else "no config given; using what is in KV"
    finally:
        await nc.close()


async def _status(nats_url: str, show: bool, stop: asyncio.Event) -> None:
    """The live table until ``stop``; its connection rides out a bus restart."""
    if not show:
        return
    nc = await connect(nats_url, "autoserve-up-status", timeout=10)
    try:
        view = await following(nc.jetstream())
        await live_status(view, ClusterWatch(nc, nats_url), "AutoServe Health — Ctrl-C to stop", stop)
    finally:
        await nc.close()


async def _main(
    config: Config | None, args: argparse.Namespace, data_dir: Path, console: Console, replicas: int
) -> int:
    logs = data_dir / "logs"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watchdog = Watchdog(data_dir, logs / "up-watchdog.log")  # first: everything after is covered
    supervisor = Supervisor()
    children: dict[str, Child] = {}
    runner = Runner(children, supervisor, watchdog, console)
    supervising = asyncio.create_task(runner.run())
    status: asyncio.Task[None] | None = None
    try:
        nats_url = args.nats_url
        if nats_url is None:
            nats_url = await _start_bus(args, data_dir, runner, stop)
        console.print(f"config: {await _prepare(nats_url, config, replicas)}")
        env = {**os.environ, "AUTOSERVE_NATS_URL": nats_url, "AUTOSERVE_DATA_DIR": str(data_dir),
               "AUTOSERVE_STREAM_REPLICAS": str(replicas)}  # fmt: skip
        if args.demo:  # one process per target, so the recovery service can restart each
            from .demo import TARGETS

            await asyncio.to_thread(_stop_registered, data_dir / "processes")  # what an earlier run left
            for target in TARGETS:
                name = f"demo-{target}"
                launch = _python_child(["-m", "autoserve_cli.demo", "--target", target], logs / f"{name}.log", env)
                children[name] = Child(name, logs / f"{name}.log", launch)
                supervisor.add(name, Policy(Restart.NO, TARGETS_GROUP, grace=GRACE_SECONDS))
        envs = {name: _service_env(env, index) | _member_env(env, name) for index, name in enumerate(SERVICES)}
        for name in SERVICES:
            command = ["-m", "autoserve_cli.main", "run", name]
            if name == "prober":
                command += ["--workers", str(args.prober_workers)]
            children[name] = Child(name, logs / f"{name}.log", _python_child(command, logs / f"{name}.log", envs[name]))
            supervisor.add(name, Policy(Restart.ON_FAILURE, SERVICES_GROUP, grace=GRACE_SECONDS))
        for name in children:
            if name not in runner.servers:
                runner.start(name)
        console.print(f"started: {', '.join(n for n in children if n not in runner.servers)} (logs in {logs})")
        console.print(f"health and metrics: {_endpoints(envs)}")
        console.print("supervised: a child that dies is restarted with backoff; Ctrl-C stops everything")
        status = asyncio.create_task(_status(nats_url, not args.no_status, stop))
        await stop.wait()
        return 0
    finally:
        console.print("stopping…")
        if status is not None:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(status, 5)
        runner.stop()
        await supervising
        await asyncio.to_thread(_stop_registered, data_dir / "processes")
        watchdog.bye()
        console.print("stopped")


def up(config: Config | None, args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if args.cluster and args.nats_url:
        console.print(f"autoserve up: --cluster {args.cluster} starts its own NATS cluster: it cannot be used with "
                      f"--nats-url (or AUTOSERVE_NATS_URL) {redact_url(args.nats_url)}", soft_wrap=True, markup=False)  # fmt: skip
        return EXIT_USAGE
    try:
        replicas = _replicas(args)
    except ReplicasError as exc:
        console.print(f"autoserve up: {exc}", soft_wrap=True, markup=False)
        return EXIT_USAGE
    data_dir: Path = args.data_dir.resolve()
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(_main(config, args, data_dir, console, replicas))
    except KeyboardInterrupt:  # before the signal handlers were in place
        return 0
