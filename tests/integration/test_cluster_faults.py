"""Real nats-server nodes of a 3-node JetStream cluster killed under the running services.

One system for the module: the cluster (R3 streams and buckets, from ``autoserve apply``),
nginx as the target, and the prober, the detector and the reporter as ``autoserve run``
processes on the seed list. Each test turns a steady load on (2,000 instances probed every
second), does its faults, turns the load off, and counts everything stored so far
(``cluster_counts.check_counts``): every probe the prober had acknowledged is in the stream
once and in ClickHouse once, and the detector's outputs and counters are a replay's.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from autoserve_config import AppSpec, load_config_text
from autoserve_events import PROBES_STREAM
from autoserve_runtime.nats_cluster import EmbeddedNatsCluster

from ..support.cluster import (
    UNAVAILABLE,
    Services,
    apply,
    client,
    load_config,
    nginx,
    running_cluster,
    sample,
    stream_leader,
    wait_node_back,
)
from ..support.cluster_counts import DETECTOR_DURABLE, REPORTER_DURABLE, check_counts
from ..support.waiting import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

STEADY, FAILING = 1_900, 100  # instances, each probed every second: 2,000 probes/s
KILLS = 5


@dataclass
class System:
    cluster: EmbeddedNatsCluster
    services: Services
    load_on: Path
    load_off: Path
    apps: dict[str, AppSpec]


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    work = tmp_path_factory.mktemp("cluster-faults")
    with running_cluster(work / "nats") as cluster, nginx(work / "nginx") as port:
        load_on, load_off = work / "load-on.yaml", work / "load-off.yaml"
        load_on.write_text(load_config(port, STEADY, FAILING))
        load_off.write_text(load_config(port, STEADY, FAILING, enabled=False))
        asyncio.run(apply(load_off, cluster.url, replicas=3))
        services = Services(cluster.url, work / "logs", work / "data")
        try:
            for name in ("prober", "detector", "reporter"):
                services.start(name)
            asyncio.run(services.all_ready(timeout=120))
            yield System(cluster, services, load_on, load_off, load_config_text(load_on.read_text()).apps)
        finally:
            services.stop()


@pytest.fixture
async def nc(system: System) -> AsyncIterator[Client]:
    connection = await client(system.cluster.url)
    yield connection
    await connection.close()


# -- the load --------------------------------------------------------------------------------------


@dataclass
class Load:
    started: float
    first_seq: int
    steady: float = 0.0  # probes/s stored before any fault, the ramp-up included

    async def rate(self, js: JetStreamContext) -> float:
        """Probes stored per second since the load was on (faults included)."""
        last = (await js.stream_info(PROBES_STREAM)).state.last_seq
        return (last - self.first_seq) / (time.monotonic() - self.started)


async def last_seq(js: JetStreamContext) -> int | None:
    try:
        return (await js.stream_info(PROBES_STREAM)).state.last_seq
    except UNAVAILABLE:
        return None


async def acked_past(js: JetStreamContext, seq: int) -> bool:
    """The detector and the reporter (which acks only once ClickHouse stored the rows) have
    both acknowledged the probes up to ``seq``."""
    for durable in (DETECTOR_DURABLE, REPORTER_DURABLE):
        try:
            info = await js.consumer_info(PROBES_STREAM, durable)
        except UNAVAILABLE:
            return False
        if info.ack_floor is None or (info.ack_floor.stream_seq or 0) < seq:
            return False
    return True


async def moves_past(js: JetStreamContext, seq: int, what: str, probes: int = 2_000, timeout: float = 60) -> None:
    """The pipeline moves: ``probes`` more probes stored past ``seq``, and handled by the
    detector and stored in ClickHouse."""
    await wait_for(lambda: acked_past(js, seq + probes), timeout, f"the pipeline to move again ({what})", every=0.2)


async def load_on(system: System, js: JetStreamContext) -> Load:
    await apply(system.load_on, system.cluster.url, replicas=3)
    targets = STEADY + FAILING
    await wait_for(
        lambda: sample(system.services.metrics("prober"), "autoserve_probe_targets") == targets,
        30, f"the prober probing {targets} targets", every=0.2,
    )  # fmt: skip
    seq = await last_seq(js)
    assert seq is not None
    load = Load(time.monotonic(), seq)
    await moves_past(js, seq, "load on")
    load.steady = await load.rate(js)
    return load


async def load_off(system: System, nc: Client, load: Load, what: str) -> None:
    rate = await load.rate(nc.jetstream())
    elapsed = time.monotonic() - load.started
    await apply(system.load_off, system.cluster.url, replicas=3)
    started = time.monotonic()
    counts = await check_counts(nc, system.services, system.apps)
    missed = sample(system.services.metrics("prober"), "autoserve_probe_missed_slots_total")
    print(
        f"\n{what}: {rate:,.0f} probes/s stored over {elapsed:.0f} s of load (faults included; the first "
        f"2,000 at {load.steady:,.0f}/s, ramp-up included), {missed:g} probe slots missed in all; {counts} (counted in "
        f"{time.monotonic() - started:.0f} s)"
    )


# -- faults --------------------------------------------------------------------------------------


async def leader_of_probes(js: JetStreamContext) -> str:
    found: list[str] = []

    async def elected() -> bool:
        leader = await stream_leader(js, PROBES_STREAM)
        found[:] = [leader] if leader else []
        return bool(found)

    await wait_for(elected, 60, f"{PROBES_STREAM} to have a leader", every=0.2)
    return found[0]


async def new_leader(js: JetStreamContext, old: str, timeout: float = 60) -> None:
    async def elected() -> bool:
        return (await stream_leader(js, PROBES_STREAM)) not in (None, old)

    await wait_for(elected, timeout, f"a new {PROBES_STREAM} leader in place of {old}", every=0.2)


async def test_the_leader_of_the_probes_stream_sigkilled_five_times_loses_and_doubles_nothing(
    system: System, nc: Client
) -> None:
    js = nc.jetstream()
    cluster = system.cluster
    load = await load_on(system, js)
    killed: list[str] = []
    for round_ in range(KILLS):
        leader = await leader_of_probes(js)
        index = cluster.node_names.index(leader)
        seq = await last_seq(js)
        assert seq is not None
        started = time.monotonic()
        cluster.nodes[index].kill()
        killed.append(leader)
        await new_leader(js, leader)
        elected = time.monotonic() - started
        await moves_past(js, seq, f"kill {round_ + 1} of {leader}")
        moved = time.monotonic() - started
        cluster.nodes[index].launch()
        await wait_node_back(cluster, index, js)
        print(f"\nkill {round_ + 1}: {leader}; a new leader in {elected:.1f} s, the pipeline moving in {moved:.1f} s, "
              f"the node back and current in {time.monotonic() - started - moved:.1f} s")  # fmt: skip
    assert len(set(killed)) > 1, f"every kill hit {killed[0]}: the same node again and again"
    await system.services.all_ready(timeout=60)
    await load_off(system, nc, load, f"{KILLS} kills of {killed}")


async def test_the_leader_sigstopped_past_an_election_then_resumed_blocks_nothing_and_loses_nothing(
    system: System, nc: Client
) -> None:
    cluster = system.cluster
    load = await load_on(system, nc.jetstream())
    leader = await leader_of_probes(nc.jetstream())
    index = cluster.node_names.index(leader)
    # Watched from a node that keeps running: a connection to the stopped one hangs.
    other = cluster.nodes[(index + 1) % len(cluster.nodes)]
    watcher = await client(other.url, "cluster-test-watcher")
    try:
        js = watcher.jetstream()
        seq = await last_seq(js)
        assert seq is not None
        process = cluster.nodes[index].process
        assert process is not None
        started = time.monotonic()
        process.send_signal(signal.SIGSTOP)
        try:
            await new_leader(js, leader)  # the followers' election timeout passed
            elected = time.monotonic() - started
        finally:
            process.send_signal(signal.SIGCONT)
        stopped = time.monotonic() - started
        await wait_node_back(cluster, index, js)
        await system.services.all_ready(timeout=60)
        await moves_past(js, seq, f"{leader} resumed")
        print(
            f"\nSIGSTOP of {leader}: a new leader in {elected:.1f} s, stopped {stopped:.1f} s, "
            f"every service ready and the pipeline moving {time.monotonic() - started:.1f} s after the stop"
        )
    finally:
        await watcher.close()
    await load_off(system, nc, load, f"SIGSTOP of {leader}")


async def test_the_whole_cluster_sigkilled_at_once_comes_back_and_the_services_go_on_by_themselves(
    system: System, nc: Client
) -> None:
    cluster = system.cluster
    js = nc.jetstream()
    load = await load_on(system, js)
    seq = await last_seq(js)
    assert seq is not None
    started = time.monotonic()
    cluster.kill()
    for node in cluster.nodes:
        node.launch()
    for index in range(len(cluster.nodes)):
        await wait_node_back(cluster, index, js, timeout=90)
    await system.services.all_ready(timeout=90)
    await moves_past(js, seq, "the whole cluster restarted", timeout=90)
    print(f"\nthe whole cluster SIGKILLed: the pipeline moved again {time.monotonic() - started:.1f} s later")
    await load_off(system, nc, load, "the whole cluster restarted")
