"""Cluster failover (section ``cluster``, second table): how long the probe pipeline stalls
when the node leading AUTOSERVE_PROBES is SIGKILLed, beside a bare nats-py publish loop.

``autoserve run prober`` (probing nginx) → a 3-node cluster (every stream and bucket R3) →
``autoserve run reporter`` → chDB. The stall is read back from ClickHouse afterwards: each
probe row has its ``timestamp`` (made) and ``inserted_at`` (stored). The floor, in the
same run: a bare ``js.publish`` loop into the same stream, and how long after each kill a
publish started after it first succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import httpx
import nats
from nats.js import JetStreamContext

from autoserve_events import PROBES_STREAM, ProbeCompleted, decode, encode, headers_for, subject, subject_for
from autoserve_reporter.adapters.clickhouse import Store
from autoserve_reporter.core.rows import METRICS_TABLE
from autoserve_reporter.service import ReporterSettings, consumer_specs
from autoserve_runtime import connect, free_port
from autoserve_runtime.nats_cluster import EmbeddedNatsCluster
from bench.common import WORK_DIR, ProberProcess, Table, apply_config, until, write_config
from bench.faults import _p, _row
from bench.reporter import ReporterProcess, probe

KILLS = 5
TARGETS = 500  # probes/s of the steady load: 5 apps x 100 instances, period 1 s
ROWS_PER_S = 2 * TARGETS  # a healthy probe is 2 metric rows
FLOOR_TIMEOUT_S = 0.5  # the bare loop's js.publish timeout
FLOOR_PACE_S = 0.01  # and its pace: about 100 publishes/s, so the reporter is not flooded
FLOWING_S = 3.0  # this many seconds of probes stored after a kill: flowing again
RECOVER_S = 30.0  # a pipeline not flowing again this long after a kill is reported stuck


async def stream_leader(js: JetStreamContext, stream: str) -> str | None:
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


async def current_leader(js: JetStreamContext, stream: str = PROBES_STREAM, timeout: float = 60) -> str:
    leaders: list[str] = []

    async def led() -> bool:
        leader = await stream_leader(js, stream)
        leaders.extend([leader] if leader else [])
        return leader is not None

    await until(led, timeout, f"{stream} led and current")
    return leaders[-1]


# ---------------------------------------------------------------------------- pure parts


def floor_after(successes: Sequence[tuple[float, float]], killed: float) -> float | None:
    """Seconds from ``killed`` until a publish started after it first succeeded."""
    done = [finished for started, finished in successes if started >= killed]
    return min(done) - killed if done else None


def worst_lags(probes: Sequence[tuple[float, float]], kills: Sequence[float], end: float) -> list[float | None]:
    """Per kill: the worst made → stored latency of a probe made from 2 s before it until
    2 s before the next (or ``end``); None when none of them was stored."""
    worst: list[float | None] = []
    for i, killed in enumerate(kills):
        until_ = kills[i + 1] - 2 if i + 1 < len(kills) else end
        lags = [stored - made for made, stored in probes if killed - 2 <= made < until_]
        worst.append(max(lags) if lags else None)
    return worst


# ---------------------------------------------------------------------------- processes


@dataclass
class FloorLoop:
    """A bare nats-py ``js.publish`` loop: each success as (started, finished), wall time."""

    js: JetStreamContext
    successes: list[tuple[float, float]] = field(default_factory=list)
    running: bool = True
    task: asyncio.Task[None] | None = None

    def start(self) -> FloorLoop:
        self.task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        """Ends the loop by its flag, not by cancelling: nats-py's request can swallow a
        cancellation that lands as its reply does (wait_for before Python 3.12)."""
        self.running = False
        if self.task is not None:
            await asyncio.wait({self.task}, timeout=5 * FLOOR_TIMEOUT_S)
            self.task.cancel()

    async def _run(self) -> None:
        n = 0
        while self.running:
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
    """prober → the cluster → reporter → chDB."""

    def __init__(self, cluster: EmbeddedNatsCluster, nginx_port: int) -> None:
        self.cluster = cluster
        self.nginx_port = nginx_port
        self.data = WORK_DIR / "cluster-chdb"
        shutil.rmtree(self.data, ignore_errors=True)
        self.prober: ProberProcess | None = None
        self.reporter: ReporterProcess | None = None
        self.prober_metrics_port = free_port()  # its /metrics, read when the pipeline is stuck

    async def start(self) -> None:
        apps = {f"cluster{i}": TARGETS // 5 for i in range(5)}
        with _environ(AUTOSERVE_STREAM_REPLICAS="3"):
            await asyncio.to_thread(apply_config, write_config("cluster", apps, self.nginx_port), self.cluster.url)
        self.reporter = ReporterProcess(self.cluster.url, self.data, "cluster-reporter")
        await self.reporter.ready()
        with _environ(AUTOSERVE_METRICS_PORT=str(self.prober_metrics_port)):
            self.prober = ProberProcess(self.cluster.url, label="cluster-prober").start()

    async def rows_stored(self) -> int | None:
        """None while the reporter is not ready (a feed broken)."""
        assert self.reporter is not None
        health = await self.reporter.health()
        return health["writers"][METRICS_TABLE]["rows_stored"] if health else None

    async def flowing(self, rows: int, timeout: float) -> None:
        """Until ``rows`` more rows are stored than at the reporter's first ready answer."""
        base: list[int] = []

        async def grew() -> bool:
            stored = await self.rows_stored()
            if stored is None:
                return False
            base.extend([] if base else [stored])
            return stored >= base[0] + rows

        await until(grew, timeout, f"{rows} more rows stored")

    async def diagnose(self, js: JetStreamContext) -> str:
        """Where the probes stop: in the stream (the prober) or in the reporter's consumer."""
        parts = []
        try:
            info = await js.stream_info(PROBES_STREAM)
            parts.append(f"stream last_seq {info.state.last_seq}, leader {info.cluster and info.cluster.leader}")
            last = await js.get_last_msg(PROBES_STREAM, subject(ProbeCompleted, "cluster0", "cluster0-00000"))
            made = decode(last.data).timestamp  # type: ignore[attr-defined]
            parts.append(f"the prober's last probe in it made {time.time() - made:.1f} s ago")
            durable = consumer_specs(ReporterSettings(clickhouse_url="chdb:///unused"))[0].durable
            consumer = await js.consumer_info(PROBES_STREAM, durable)
            parts.append(f"the reporter's consumer delivered up to seq {consumer.delivered.stream_seq}, "
                         f"{consumer.num_pending} pending, {consumer.num_ack_pending} unacked, "
                         f"leader {consumer.cluster and consumer.cluster.leader}")  # fmt: skip
        except Exception as exc:
            parts.append(f"{type(exc).__name__}: {exc}")
        parts.append(f"the reporter {'ready' if await self.rows_stored() is not None else 'NOT ready'}")
        parts.append(f"the prober's {await self._prober_metrics()}")
        return "; ".join(parts)

    async def _prober_metrics(self) -> str:
        """Its readiness, NATS connection and publisher counters, from its /metrics."""
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                text = (await client.get(f"http://127.0.0.1:{self.prober_metrics_port}/metrics")).text
        except httpx.HTTPError as exc:
            return f"/metrics unreadable ({type(exc).__name__})"
        wanted = ("autoserve_ready", "autoserve_nats_connected", "autoserve_publish_")
        values = [line.removeprefix("autoserve_").split("{")[0].split(" ")[0] + " " + line.rsplit(" ", 1)[-1]
                  for line in text.splitlines() if line.startswith(wanted)]  # fmt: skip
        return ", ".join(values)

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


# ---------------------------------------------------------------------------- the rounds


@dataclass
class Rounds:
    kills: list[float] = field(default_factory=list)  # wall time of each SIGKILL
    floors: list[float] = field(default_factory=list)
    stuck: str = ""  # why the rounds ended early: the pipeline did not flow again (the last kill)
    ended: float = 0.0


async def _kill_rounds(cluster: EmbeddedNatsCluster, pipeline: Pipeline, js: JetStreamContext,
                       floor: FloorLoop) -> Rounds:  # fmt: skip
    rounds = Rounds()
    for i in range(KILLS):
        name = await current_leader(js)
        node = cluster.node(name)
        killed = time.time()
        node.kill()
        rounds.kills.append(killed)
        await until(lambda k=killed: floor_after(floor.successes, k) is not None, 60, "the bare loop publishing")
        rounds.floors.append(floor_after(floor.successes, killed) or 0.0)
        try:
            await pipeline.flowing(int(FLOWING_S * ROWS_PER_S), RECOVER_S)
        except TimeoutError:
            why = await pipeline.diagnose(js)
            rounds.stuck = f"kill {i + 1} ({name}): no {FLOWING_S:g} s of probes stored within {RECOVER_S:g} s ({why})"
        node.launch()
        await asyncio.to_thread(cluster.wait_healthy, 60)
        await current_leader(js)  # the killed node back and caught up
        if rounds.stuck:
            try:
                await pipeline.flowing(int(FLOWING_S * ROWS_PER_S), RECOVER_S)
                rounds.stuck += "; flowing again once the node was back"
            except TimeoutError:
                rounds.stuck += f"; still not flowing with the node back ({await pipeline.diagnose(js)})"
            break
    rounds.ended = time.time()
    return rounds


async def failover_table(cluster: EmbeddedNatsCluster, nginx_port: int) -> Table:
    pipeline = Pipeline(cluster, nginx_port)
    nc = await connect(cluster.url, "bench-cluster-watch", timeout=10)
    bare = await nats.connect(servers=cluster.urls, name="bench-cluster-floor", max_reconnect_attempts=-1,
                              reconnect_time_wait=0.5, error_cb=_quiet, disconnected_cb=_quiet)  # fmt: skip
    floor = FloorLoop(bare.jetstream())
    try:
        await pipeline.start()
        await pipeline.flowing(10 * ROWS_PER_S, 90)  # 10 s of probes before the first kill
        floor.start()
        rounds = await _kill_rounds(cluster, pipeline, nc.jetstream(), floor)
    finally:
        await floor.stop()
        await pipeline.stop_services()
        await bare.close()
        await nc.close()
    return _table(rounds, await pipeline.probe_latencies())


def _table(rounds: Rounds, probes: list[tuple[float, float]]) -> Table:
    first = rounds.kills[0]
    steady = max((stored - made for made, stored in probes if first - 8 <= made < first - 2), default=0.0)
    worst = worst_lags(probes, rounds.kills, rounds.ended)
    if rounds.stuck:  # what was stored after that kill is what came before it: no stall to read
        worst[-1] = None
    floors = rounds.floors
    # A kill with no probe to read has no stall: its floor leaves the comparison with it.
    seen = [(floor, lag) for floor, lag in zip(floors, worst, strict=True) if lag is not None]
    seen_floors, lags = [floor for floor, _ in seen], [lag for _, lag in seen]
    stall = [lag - steady for lag in lags]
    table = Table(
        f"Cluster: failover, the node leading AUTOSERVE_PROBES SIGKILLed {len(rounds.kills)} times under "
        f"{TARGETS} probes/s (3 nodes, every stream and bucket R3): seconds",
        ["what", "kills", "floor p50", "floor p95", "stall p50", "stall p95", "vs floor"],
    )
    what = "probe → stored in ClickHouse (prober → NATS → reporter → chDB): stall"
    if not stall:  # stuck at the first kill
        table.add(what, 0, "—", "—", "stuck", "stuck", "—")
        stall = [float("inf")]
    else:  # the kills the pipeline came back from
        _row(table, what, seen_floors, stall)
        _row(table, "the same, worst probe → stored latency (steady state not taken off)", seen_floors, lags)
    met = not rounds.stuck and _p(stall, 0.95) <= _p(floors, 0.95) + 1.0
    per_kill = ", ".join(
        f"{f:.2f} / {'stuck' if w is None else f'{w - steady:.2f}'}" for f, w in zip(floors, worst, strict=True)
    )
    table.notes += [
        f"Goal: stall p95 within 1 s of the floor's p95: {'met' if met else 'NOT met'} "
        f"({_p(stall, 0.95):.2f} s against {_p(floors, 0.95):.2f} s). Per kill, floor / stall: {per_kill}.",
        *([f"STUCK after {rounds.stuck}."] if rounds.stuck else []),
        "floor = from the SIGKILL until a bare nats-py js.publish (started after the kill, timeout "
        f"{FLOOR_TIMEOUT_S:g} s, reconnect_time_wait 0.5 s like our services, one every {FLOOR_PACE_S * 1000:g} ms) "
        "into the same stream succeeds: the leader election plus the client's reconnect when its node was the one.",
        "stall = the worst made → stored latency of a probe made from 2 s before a kill until 2 s before the next "
        "(ProbeCompleted.timestamp against the row's inserted_at, read from ClickHouse afterwards), minus the "
        f"worst latency in the 6 s before the first kill ({steady:.2f} s: the reporter's 1 s batches).",
        f"Between kills: the floor succeeds, {FLOWING_S:g} s of probes are stored, the killed node is relaunched on "
        "its store, every node answers /healthz and the stream's replicas are current. p95 of 5 is nearest rank "
        "(the max).",
    ]
    return table
