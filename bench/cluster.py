"""Cluster: what a 3-node NATS JetStream cluster with replicated streams costs, and how long
the probe pipeline stalls when a stream leader dies.

- Publish: our pipelined ``EventPublisher`` (the services' settings) into AUTOSERVE_PROBES
  with 1 replica and with 3, on the same 3-node cluster and the same stream config, the
  same events; beside them the same stream on one standalone nats-server (today's setup).
  Throughput and p99 submit-to-stored latency, the median of ``REPEATS`` runs each.
- Failover (bench/failover.py): the prober → NATS → reporter → chDB pipeline while the
  node leading AUTOSERVE_PROBES is SIGKILLed, beside a bare nats-py publish loop.

Everything on 127.0.0.1, scratch files under bench/.work/cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from autoserve_events import PROBES_STREAM, ProbeCompleted
from autoserve_runtime import EventPublisher, connect, provision
from autoserve_runtime.nats_cluster import EmbeddedNatsCluster
from bench.common import LOG_DIR, WORK_DIR, CpuWindow, Table, fmt, machine, nats_server, until, wait_quiet
from bench.failover import current_leader, failover_table
from bench.faults import _p
from bench.reporter import probe

REPEATS = 3
EVENTS = 20_000  # per publish run


# ---------------------------------------------------------------------------- publish


@dataclass
class PublishRun:
    rate: float  # events stored per second
    p99_ms: float  # submit → stored


async def publish_run(js: JetStreamContext, events: Sequence[ProbeCompleted], window: int = 512) -> PublishRun:
    """Submit ``events`` keeping ``window`` (the publisher's default ``max_in_flight``)
    unacknowledged, so submit → stored is the ack latency rather than time in a queue."""
    publisher = EventPublisher(js).start()
    latencies: list[float] = []
    failed = 0
    room = asyncio.Event()

    def stored(started: float, future: asyncio.Future[bool]) -> None:
        nonlocal failed
        latencies.append(time.perf_counter() - started)
        failed += not future.result()
        room.set()

    try:
        began = time.perf_counter()
        for n, event in enumerate(events):
            while n - len(latencies) >= window:
                room.clear()
                await room.wait()
            future = publisher.submit(event, track=True)
            assert future is not None
            future.add_done_callback(functools.partial(stored, time.perf_counter()))
        await until(lambda: len(latencies) == len(events), 120, f"{len(events)} events stored")
        seconds = time.perf_counter() - began
    finally:
        await publisher.close()
    if failed:
        raise RuntimeError(f"{failed} of {len(events)} events were not stored")
    return PublishRun(len(events) / seconds, _p(latencies, 0.99) * 1000)


async def _fresh_stream(js: JetStreamContext, config: StreamConfig) -> None:
    with contextlib.suppress(Exception):
        await js.delete_stream(config.name)
    await js.add_stream(config)

    await current_leader(js, config.name, 30)


async def _median_run(js: JetStreamContext, config: StreamConfig, events: list[ProbeCompleted]) -> list[PublishRun]:
    runs = []
    for _ in range(REPEATS):
        await _fresh_stream(js, config)
        runs.append(await publish_run(js, events))
    return runs


def _median(runs: list[PublishRun]) -> PublishRun:
    return PublishRun(statistics.median(r.rate for r in runs), statistics.median(r.p99_ms for r in runs))


async def publish_table(cluster: EmbeddedNatsCluster) -> Table:
    now = time.time()
    events = [probe(n, now) for n in range(EVENTS)]
    nc = await connect(cluster.url, "bench-cluster-publish", timeout=10)
    try:
        js = nc.jetstream()
        config = (await js.stream_info(PROBES_STREAM)).config  # as provision() made it
        r1, r3 = [], []
        groups = {"nats-server": [node.process.pid for node in cluster.nodes if node.process is not None]}
        await wait_quiet(groups)
        window = CpuWindow(groups)
        for _ in range(REPEATS):  # interleaved, so a busy moment of the machine hits both
            await _fresh_stream(js, replace(config, num_replicas=1))
            r1.append(await publish_run(js, events))
            await _fresh_stream(js, replace(config, num_replicas=3))
            r3.append(await publish_run(js, events))
        used = window.stop()
    finally:
        await nc.close()
    alone = await _standalone_runs(config, events)
    one, three, single = _median(r1), _median(r3), _median(alone)
    table = Table(
        f"Cluster: publish throughput, our EventPublisher, R1 and R3 (median of {REPEATS} runs of "
        f"{EVENTS:,} events each)",
        ["stream", "events/s", "p99 ack ms", "vs R1 on the cluster", "vs standalone"],
    )
    for name, run in (
        ("AUTOSERVE_PROBES, 1 replica, 3-node cluster", one),
        ("AUTOSERVE_PROBES, 3 replicas, 3-node cluster", three),
        ("AUTOSERVE_PROBES, one standalone nats-server (today's setup)", single),
    ):
        table.add(
            name, fmt(run.rate), fmt(run.p99_ms, 1), f"{run.rate / one.rate:.2f}", f"{run.rate / single.rate:.2f}"
        )
    ratio = three.rate / one.rate
    table.notes += [
        f"Goal R3 ≥ 50 % of R1's throughput: {'met' if ratio >= 0.5 else 'NOT met'} (R3/R1 = {ratio:.2f}; "
        f"R3 / standalone = {three.rate / single.rate:.2f}).",
        "Each run publishes the same ProbeCompleted events into a freshly created stream (the production config "
        "of AUTOSERVE_PROBES, replicas changed), led and current before the first publish. The runs of R1 and "
        "R3 alternate. The publisher has the services' settings; at most 512 events are unacknowledged, so the "
        "latency (submit → the stored ack, nearest-rank p99) is the ack's, not a queue's.",
        "One publishing client, connected to the cluster through the seed list; a replicated publish is acked "
        "by the leader once a majority of the replicas stored it.",
        "Runs, events/s: R1 "
        + ", ".join(fmt(r.rate) for r in r1)
        + "; R3 "
        + ", ".join(fmt(r.rate) for r in r3)
        + "; standalone "
        + ", ".join(fmt(r.rate) for r in alone)
        + ". Other load on the machine (not the "
        f"benchmark's) during the cluster runs: {used['other'] / used['wall']:.2f} of {machine()[0]} cores.",
    ]
    return table


async def _standalone_runs(config: StreamConfig, events: list[ProbeCompleted]) -> list[PublishRun]:
    server = nats_server("nats-cluster-standalone").start()
    try:
        nc = await connect(server.url, "bench-cluster-standalone", timeout=10)
        try:
            return await _median_run(nc.jetstream(), replace(config, num_replicas=1), events)
        finally:
            await nc.close()
    finally:
        server.stop()


# ---------------------------------------------------------------------------- section


async def cluster_tables(nginx_port: int) -> list[Table]:
    store = WORK_DIR / "cluster"
    shutil.rmtree(store, ignore_errors=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    cluster = EmbeddedNatsCluster(store, size=3, name="bench")
    try:
        await asyncio.to_thread(cluster.start, 60)
        nc = await connect(cluster.url, "bench-cluster-provision", timeout=10)
        try:
            await provision(nc.jetstream(), replicas=3)
        finally:
            await nc.close()
        tables = [await publish_table(cluster)]
        nc = await connect(cluster.url, "bench-cluster-provision", timeout=10)
        try:  # back to the production stream, R3, for the services
            await nc.jetstream().delete_stream(PROBES_STREAM)
            await provision(nc.jetstream(), replicas=3)
        finally:
            await nc.close()
        tables.append(await failover_table(cluster, nginx_port))
        return tables
    finally:
        cluster.stop()
