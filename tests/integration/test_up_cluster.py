"""``autoserve up --cluster 3``: a local 3-node JetStream cluster from the shipped
nats-server, every stream and bucket at 3 replicas, the services on the seed list,
``autoserve status`` showing the nodes and each stream's leader, and a SIGKILLed node
started again by ``up`` on its ports and store until it is current again."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest

from autoserve_cli.cluster_status import cluster_streams
from autoserve_runtime import free_port, stop_child
from autoserve_runtime.nats_server import free_ports

from ..support.processes import LOCALHOST
from ..support.waiting import wait_for
from .test_cli import AUTOSERVE
from .test_status_events_cli import autoserve

SERVICES = ("prober", "detector", "breaker", "recovery", "reporter", "alerter")  # up's start order
NODES = ("nats-1", "nats-2", "nats-3")
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]


def _children(parent: int) -> dict[str, int]:
    """``up``'s live children by name: the services and each node (``--name nats-N``)."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = [p.decode() for p in (entry / "cmdline").read_bytes().split(b"\0")[:-1]]
        except (OSError, NotADirectoryError):
            continue
        if stat[0] == "Z" or int(stat[1]) != parent:
            continue
        if argv and argv[0].endswith("nats-server"):
            found[argv[argv.index("--name") + 1]] = int(entry.name)
        elif "run" in argv and "autoserve_cli.main" in argv:
            found[argv[argv.index("run") + 1]] = int(entry.name)
    return found


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode().split("=", 1) for p in pairs if b"=" in p)


@dataclass
class ClusterUp:
    process: subprocess.Popen[bytes]
    output: Path
    metrics_base: int

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    @property
    def seeds(self) -> str:
        found = re.search(r"embedded 3-node NATS cluster at (\S+)", self.text())
        assert found, self.text()[-3000:]
        return found.group(1)

    def children(self) -> dict[str, int]:
        return _children(self.process.pid)

    def ready(self, service: str) -> bool:
        url = f"http://{LOCALHOST}:{self.metrics_base + SERVICES.index(service)}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def unready(self) -> list[str]:
        assert self.process.poll() is None, self.text()[-3000:]
        return [service for service in SERVICES if not self.ready(service)]

    async def wait_ready(self, timeout: float) -> None:
        try:
            await wait_for(lambda: not self.unready(), timeout, "every service to answer /readyz with 200", every=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; not ready: {self.unready()}; up said:\n{self.text()[-3000:]}") from None


@pytest.fixture
def start_up(tmp_path: Path) -> Iterator[Callable[[], ClusterUp]]:
    """``up --cluster 3`` on free ports; each start on the same data dir (the nodes' stores)."""
    started: list[ClusterUp] = []

    def start() -> ClusterUp:
        base = free_ports(len(SERVICES))
        env = {**os.environ, "AUTOSERVE_METRICS_PORT": str(base),
               "AUTOSERVE_REPORTER_LISTEN": f"{LOCALHOST}:{free_port()}"}  # fmt: skip
        env.pop("AUTOSERVE_NATS_URL", None)
        env.pop("AUTOSERVE_STREAM_REPLICAS", None)
        output = tmp_path / f"up-{len(started) + 1}.out"
        with output.open("wb") as out:
            process = subprocess.Popen(
                [AUTOSERVE, "up", "--cluster", "3", "--data-dir", str(tmp_path / "data"), "--no-status"],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        started.append(ClusterUp(process, output, base))
        return started[-1]

    yield start
    for up in started:
        stop_child(up.process, 60)


def _status_rows(text: str) -> dict[str, dict[str, str]]:
    """``autoserve status --once`` table rows by their first cell, each cell by its column
    (rich's box lines: ``┃`` heads a table, ``│`` is a row)."""
    rows: dict[str, dict[str, str]] = {}
    columns: list[str] = []
    for line in text.splitlines():
        if line.startswith(("┃", "│")):
            cells = [cell.strip() for cell in line.strip("┃│ ").split("┃" if line[0] == "┃" else "│")]
            if line[0] == "┃":
                columns = cells
            else:
                rows[cells[0].removesuffix(" (this connection)")] = dict(zip(columns, cells, strict=True))
    return rows


async def _status(seeds: str) -> dict[str, dict[str, str]]:
    result = await autoserve("status", "--once", "--nats-url", seeds, timeout=30)
    assert result.returncode == 0, result.stderr
    return _status_rows(result.stdout)


async def _replicated(seeds: str) -> dict[str, int]:
    """Each stream's and bucket's last sequence, once each has a leader and 3 replicas."""
    nc = await nats.connect(servers=seeds.split(","))
    try:
        last = {}
        for name in cluster_streams():  # the streams and the KV buckets' streams
            info = await nc.jetstream().stream_info(name)
            assert info.config.num_replicas == 3, name
            assert info.cluster is not None and info.cluster.leader in NODES, name
            assert sorted(p.name for p in info.cluster.replicas or []) == sorted(set(NODES) - {info.cluster.leader})
            last[name] = info.state.last_seq
        return last
    finally:
        await nc.close()


async def _stop(up: ClusterUp) -> None:
    up.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(up.process.wait, 60) == 0, up.text()[-3000:]
    for node in NODES:
        assert f"{node} stopped (exit code 0)" in up.text()


async def test_up_runs_on_a_3_node_cluster_and_restarts_a_killed_node(start_up: Callable[[], ClusterUp]) -> None:
    up = start_up()
    await up.wait_ready(90)
    seeds = up.seeds
    assert len(seeds.split(",")) == 3
    for service in SERVICES:  # every service on the seed list, with the replicas
        env = _environ(up.children()[service])
        assert (env["AUTOSERVE_NATS_URL"], env["AUTOSERVE_STREAM_REPLICAS"]) == (seeds, "3"), service

    await _replicated(seeds)
    nc = await nats.connect(servers=seeds.split(","))
    try:
        js = nc.jetstream()
        rows = await _status(seeds)
        assert all(rows[node]["reachable"] == "yes" for node in NODES), rows
        for name in cluster_streams():
            assert rows[name]["leader"] in NODES, (name, rows[name])

        victim = (await js.stream_info("AUTOSERVE_PROBES")).cluster.leader  # type: ignore[union-attr]
        old = up.children()[victim]
        old_argv = _cmdline(old)
        os.kill(old, signal.SIGKILL)
        await wait_for(lambda: up.children().get(victim) not in (None, old), 30, f"up to start {victim} again")
        assert _cmdline(up.children()[victim]) == old_argv  # same ports and store

        async def current_again() -> bool:
            rows = await _status(seeds)
            return rows.get(victim, {}).get("reachable") == "yes" and all(
                rows[name].get(victim, "").startswith(("current", "leader")) for name in cluster_streams()
            )

        await wait_for(current_again, 45, f"status to show {victim} current in every stream again", every=1)
        await up.wait_ready(60)  # the services rode out the election
    finally:
        await nc.close()
    text = up.text()
    assert f"{victim} died (signal SIGKILL)" in text and f"{victim} ready again" in text, text[-3000:]

    stored = await _replicated(seeds)
    await _stop(up)

    # Again on the same stores, on new ports: the cluster forms, every stream elects its
    # leader again (up waits for that before provisioning), and nothing stored is gone.
    again = start_up()
    await wait_for(lambda: "config:" in again.text() or again.process.poll() is not None, 60, "up to provision")
    assert again.process.poll() is None, again.text()[-3000:]
    assert again.seeds != seeds
    after = await _replicated(again.seeds)
    assert all(after[name] >= stored[name] for name in stored), (stored, after)
    await _stop(again)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--cluster", "4"], "argument --cluster: a local cluster has 3 or 5 nodes, got '4'"),
        (["--cluster", "3", "--nats-url", "nats://127.0.0.1:1"], "--cluster 3 starts its own NATS cluster"),
    ],
)
async def test_a_cluster_of_another_size_or_beside_an_external_nats_is_refused(args: list[str], said: str) -> None:
    result = await autoserve("up", *args, "--no-status", timeout=30)
    assert result.returncode == 2 and said in result.stderr, result.stderr
