"""Cluster: what a 3-node NATS JetStream cluster with replicated streams costs, and how long
the probe pipeline stalls when a stream leader dies.

- Publish: our pipelined ``EventPublisher`` (the services' settings) into AUTOSERVE_PROBES
  with 1 replica and with 3, on the same 3-node cluster and the same stream config, the
  same events; beside them the same stream on one standalone nats-server (today's setup).
  Throughput and p99 submit-to-stored latency, the median of ``REPEATS`` runs each.
- Failover: ``autoserve run prober`` (probing nginx) → NATS (every stream and bucket R3) →
  ``autoserve run reporter`` → chDB, while the node that leads AUTOSERVE_PROBES is
  SIGKILLed ``KILLS`` times (relaunched, and the cluster current again, between kills).
  The stall is read back from ClickHouse afterwards: each probe row has its ``timestamp``
  (made) and ``inserted_at`` (stored). Beside it, in the same run, the floor: a bare
  nats-py ``js.publish`` loop into the same stream, and how long after each kill it first
  succeeds again.

Everything on 127.0.0.1, scratch files under bench/.work/cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import nats
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from autoserve_events import PROBES_STREAM, ProbeCompleted, encode, headers_for, subject_for
from autoserve_reporter.adapters.clickhouse import Store
from autoserve_reporter.core.rows import METRICS_TABLE
from autoserve_runtime import EventPublisher, connect, provision
from autoserve_runtime.nats_cluster import EmbeddedNatsCluster
from bench.common import (
    LOG_DIR,
    WORK_DIR,
    ProberProcess,
    Table,
    apply_config,
    fmt,
    nats_server,
    until,
    write_config,
)
from bench.faults import _p, _row
from bench.reporter import ReporterProcess, probe

REPEATS = 3
EVENTS = 20_000  # per publish run
KILLS = 5
TARGETS = 500  # probes/s of the steady load: 5 apps x 100 instances, period 1 s
FLOOR_TIMEOUT_S = 0.5  # the bare loop's js.publish timeout
FLOOR_PACE_S = 0.01  # and its pace: about 100 publishes/s, so the reporter is not flooded
FLOWING_S = 3.0  # after the floor is back, this many seconds of probes stored: flowing again


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


async def _leader(js: JetStreamContext, stream: str) -> str | None:
    """The stream's leader once it has one and every replica is current; else None."""
    try:
        info = await js.stream_info(stream)
    except Exception:  # no leader yet, or our node is the one restarting: ask again
        return None
    cluster = info.cluster
    if cluster is None:  # a standalone server
        return "standalone"
    if cluster.leader is None or any(not r.current or r.offline for r in cluster.replicas or []):
        return None
    return cluster.leader


async def _fresh_stream(js: JetStreamContext, config: StreamConfig) -> None:
    with contextlib.suppress(Exception):
        await js.delete_stream(config.name)
    await js.add_stream(config)

    async def ready() -> bool:
        return await _leader(js, config.name) is not None

    await until(ready, 30, f"{config.name} with {config.num_replicas} replicas led and current")


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
        for _ in range(REPEATS):  # interleaved, so a busy moment of the machine hits both
            await _fresh_stream(js, replace(config, num_replicas=1))
            r1.append(await publish_run(js, events))
            await _fresh_stream(js, replace(config, num_replicas=3))
            r3.append(await publish_run(js, events))
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


# ---------------------------------------------------------------------------- failover


@dataclass
class FloorLoop:
    """A bare nats-py ``js.publish`` loop: each success as (started, finished), wall time."""

    js: JetStreamContext
    successes: list[tuple[float, float]] = field(default_factory=list)

    async def run(self) -> None:
        n = 0
        while True:
            event = probe(n, time.time())
            n += 1
            started = time.time()
            try:
                await self.js.publish(subject_for(event), encode(event), timeout=FLOOR_TIMEOUT_S,
                                      headers=headers_for(event))  # fmt: skip
                self.successes.append((started, time.time()))
            except Exception:  # no leader, no responders, a timeout, reconnecting: try again
                pass
            await asyncio.sleep(FLOOR_PACE_S)  # a pace, not a wait for a condition

    def back_after(self, killed: float) -> float | None:
        """Seconds from ``killed`` until a publish started after it first succeeded."""
        return floor_after(self.successes, killed)


def floor_after(successes: Sequence[tuple[float, float]], killed: float) -> float | None:
    done = [finished for started, finished in successes if started >= killed]
    return min(done) - killed if done else None


def stalls(
    probes: Sequence[tuple[float, float]], kills: Sequence[float], end: float, steady: float
) -> list[tuple[float, float]]:
    """Per kill: the worst made → stored latency of a probe made from 2 s before it until
    2 s before the next (or ``end``), and that minus ``steady`` (the worst latency before
    the first kill: the batching every probe waits anyway)."""
    worst = []
    for i, killed in enumerate(kills):
        until_ = kills[i + 1] - 2 if i + 1 < len(kills) else end
        lags = [stored - made for made, stored in probes if killed - 2 <= made < until_]
        if not lags:
            raise RuntimeError(f"no probe stored for the kill at {killed:.1f}")
        worst.append((max(lags), max(lags) - steady))
    return worst


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """``autoserve apply`` reads AUTOSERVE_STREAM_REPLICAS: only apply may change replicas."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Pipeline:
    """prober → the cluster → reporter → chDB, and the bench's own view of the cluster."""

    def __init__(self, cluster: EmbeddedNatsCluster, nginx_port: int) -> None:
        self.cluster = cluster
        self.nginx_port = nginx_port
        self.data = WORK_DIR / "cluster-chdb"
        shutil.rmtree(self.data, ignore_errors=True)
        self.prober: ProberProcess | None = None
        self.reporter: ReporterProcess | None = None

    async def start(self) -> None:
        apps = {f"cluster{i}": TARGETS // 5 for i in range(5)}
        with _environ(AUTOSERVE_STREAM_REPLICAS="3"):
            await asyncio.to_thread(apply_config, write_config("cluster", apps, self.nginx_port), self.cluster.url)
        self.reporter = ReporterProcess(self.cluster.url, self.data, "cluster-reporter")
        await self.reporter.ready()
        self.prober = ProberProcess(self.cluster.url, label="cluster-prober").start()

    async def rows_stored(self) -> int:
        assert self.reporter is not None
        health = await self.reporter.health()  # None while not ready (a feed broken)
        return health["writers"][METRICS_TABLE]["rows_stored"] if health else -1

    async def wait_rows(self, rows: int, timeout: float, what: str) -> None:
        async def enough() -> bool:
            return await self.rows_stored() >= rows

        await until(enough, timeout, what)

    async def stop_services(self) -> None:
        if self.prober is not None:
            self.prober.stop()
            self.prober = None
        if self.reporter is not None:
            await self.reporter.stop()
            self.reporter = None

    async def probe_latencies(self) -> list[tuple[float, float]]:
        """(made, first stored) of every probe, read from ClickHouse once the reporter is gone."""
        store = Store(f"chdb://{self.data}")
        try:
            rows = await store.query(
                f"SELECT toFloat64(timestamp), toFloat64(min(inserted_at)) FROM {METRICS_TABLE} "
                "WHERE metric_type = 'health_check_status' AND startsWith(app_name, 'cluster') "
                "GROUP BY event_id, timestamp ORDER BY 1"
            )
        finally:
            await store.close()
        return [(float(made), float(stored)) for made, stored in rows]


async def _quiet(*_: object) -> None:
    """The bare client's callbacks: its errors are the kills themselves (nats-py's default
    prints a traceback for each)."""


async def failover_table(cluster: EmbeddedNatsCluster, nginx_port: int) -> Table:
    pipeline = Pipeline(cluster, nginx_port)
    nc = await connect(cluster.url, "bench-cluster-watch", timeout=10)
    bare = await nats.connect(servers=cluster.urls, name="bench-cluster-floor", max_reconnect_attempts=-1,
                              reconnect_time_wait=0.5, error_cb=_quiet, disconnected_cb=_quiet)  # fmt: skip
    floor = FloorLoop(bare.jetstream())
    floor_task: asyncio.Task[None] | None = None
    kills: list[float] = []
    floors: list[float] = []
    try:
        js = nc.jetstream()
        await pipeline.start()
        per_second = 2 * TARGETS  # rows: a healthy probe is 2
        await pipeline.wait_rows(10 * per_second, 90, "10 s of probes stored before the first kill")
        floor_task = asyncio.create_task(floor.run())
        for _ in range(KILLS):

            async def led() -> str | None:
                return await _leader(js, PROBES_STREAM)

            await until(led, 60, "AUTOSERVE_PROBES led and current")
            leader = await led()
            assert leader is not None
            node = cluster.node(leader)
            killed = time.time()
            node.kill()
            kills.append(killed)
            await until(lambda k=killed: floor.back_after(k) is not None, 60, "the bare publish loop succeeding")
            floors.append(floor.back_after(killed) or 0.0)
            flowing = max(0, await pipeline.rows_stored())
            await pipeline.wait_rows(flowing + int(FLOWING_S * per_second), 90, "probes stored again")
            node.launch()
            await asyncio.to_thread(cluster.wait_healthy, 60)
            await until(led, 60, "AUTOSERVE_PROBES led and current, the killed node back")
        ended = time.time()
        await pipeline.wait_rows(0, 60, "the reporter ready")
    finally:
        if floor_task is not None:
            floor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await floor_task
        await pipeline.stop_services()
        await bare.close()
        await nc.close()
    probes = await pipeline.probe_latencies()
    before = [stored - made for made, stored in probes if kills[0] - 8 <= made < kills[0] - 2]
    steady = max(before)
    worst = stalls(probes, kills, ended, steady)
    table = Table(
        f"Cluster: failover, the node leading AUTOSERVE_PROBES SIGKILLed {KILLS} times under "
        f"{TARGETS} probes/s (3 nodes, every stream and bucket R3): seconds",
        ["what", "kills", "floor p50", "floor p95", "stall p50", "stall p95", "vs floor"],
    )
    stall = [s for _, s in worst]
    _row(table, "probe → stored in ClickHouse (prober → NATS → reporter → chDB): stall", floors, stall)
    _row(table, "the same, worst probe → stored latency (steady state not taken off)", floors, [w for w, _ in worst])
    met = _p(stall, 0.95) <= _p(floors, 0.95) + 1.0
    table.notes += [
        f"Goal: stall p95 within 1 s of the floor's p95: {'met' if met else 'NOT met'} "
        f"({_p(stall, 0.95):.2f} s against {_p(floors, 0.95):.2f} s). Per kill, floor / stall: "
        + ", ".join(f"{f:.2f} / {s:.2f}" for f, s in zip(floors, stall, strict=True))
        + ".",
        "floor = from the SIGKILL until a bare nats-py js.publish (started after the kill, timeout "
        f"{FLOOR_TIMEOUT_S:g} s, reconnect_time_wait 0.5 s like our services, one every {FLOOR_PACE_S * 1000:g} ms) "
        "into the same stream succeeds: the leader election plus the client's reconnect when its node was the one.",
        "stall = the worst made → stored latency of a probe made from 2 s before a kill until 2 s before the next "
        "(ProbeCompleted.timestamp against the row's inserted_at, read from ClickHouse afterwards), minus the "
        f"worst latency in the 6 s before the first kill ({steady:.2f} s: the reporter's 1 s batches).",
        "Between kills: the floor succeeds, 3 s of probes are stored, the killed node is relaunched on its store, "
        "every node answers /healthz and the stream's replicas are current. p95 of 5 is nearest rank (the max).",
    ]
    return table


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
