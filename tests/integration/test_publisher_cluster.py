"""The publisher on a real 3-node JetStream cluster (R3 streams) while stream leaders are
SIGKILLed, and with NATS unreachable: every event submitted is stored exactly once, none
is dropped, and input waits for room instead.

Each test prints what it measured (``pytest -s``): how long acks stopped per kill, and how
many publishes were sent again."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from autoserve_events import PROBES_STREAM, ProbeCompleted, stream_specs
from autoserve_runtime import EmbeddedNatsServer, EventPublisher, connect, observability
from autoserve_runtime.host import watch_room
from autoserve_runtime.nats_cluster import EmbeddedNatsCluster

from ..support.waiting import wait_for

KILLS = 2
EVENTS = 3000


def probes_config(replicas: int) -> StreamConfig:
    """AUTOSERVE_PROBES as the events library specifies it, with ``replicas``."""
    (spec,) = [s for s in stream_specs() if s.name == PROBES_STREAM]
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        max_age=spec.max_age_seconds,
        duplicate_window=spec.duplicate_window_seconds,
        num_replicas=replicas,
    )


def probe(n: int) -> ProbeCompleted:
    return ProbeCompleted(app_name="app", instance_id=f"i{n % 10}", check_type="http", is_healthy=True,
                          response_time_ms=1.0, timestamp=time.time())  # fmt: skip


async def stored_ids(js: JetStreamContext, stream: str = PROBES_STREAM) -> Counter[str]:
    """Every ``Nats-Msg-Id`` in ``stream``, read back from the first message, with its count."""
    total = (await js.stream_info(stream)).state.messages
    ids: Counter[str] = Counter()

    async def count(msg: Msg) -> None:
        ids[(msg.headers or {}).get("Nats-Msg-Id", "")] += 1

    sub = await js.subscribe("autoserve.>", stream=stream, cb=count, ordered_consumer=True)
    try:
        await wait_for(lambda: ids.total() >= total, timeout=30, what=f"{total} stored messages read back")
    finally:
        await sub.unsubscribe()
    return ids


async def leader_of(js: JetStreamContext, stream: str = PROBES_STREAM) -> str | None:
    """The stream's leader once it has one and every replica is current; None meanwhile."""
    try:
        cluster = (await js.stream_info(stream)).cluster
    except Exception:  # no leader to answer, or this client is reconnecting
        return None
    if cluster is None or not cluster.leader or not all(r.current for r in cluster.replicas or []):
        return None
    return cluster.leader


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[EmbeddedNatsCluster]:
    nodes = EmbeddedNatsCluster(tmp_path / "cluster", 3)
    try:
        await asyncio.to_thread(nodes.start)
        yield nodes
    finally:
        await asyncio.to_thread(nodes.stop)


class Feeder:
    """Submits probe results steadily, waiting for room as the prober does, and records when
    each was acked."""

    def __init__(self, publisher: EventPublisher) -> None:
        self.publisher = publisher
        self.submitted: list[str] = []
        self.stored: list[asyncio.Future[bool]] = []
        self.acked_at: list[float] = []
        self.enough = asyncio.Event()

    async def run(self, at_least: int, per_tick: int = 10, tick: float = 0.02) -> None:
        for n in itertools.count():
            if n >= at_least and self.enough.is_set():
                return
            await self.publisher.room()
            event = probe(n)
            future = self.publisher.submit(event, track=True)
            assert future is not None
            future.add_done_callback(lambda _: self.acked_at.append(time.monotonic()))
            self.submitted.append(event.event_id)
            self.stored.append(future)
            if n % per_tick == per_tick - 1:
                await asyncio.sleep(tick)  # a steady rate, about 500 events/s

    def stall_after(self, moment: float) -> float:
        """The longest time without an ack across ``moment``."""
        times = sorted(self.acked_at)
        return max((b - a for a, b in itertools.pairwise(times) if b > moment and a < moment + 30), default=0.0)


async def test_publishes_in_flight_during_leader_elections_are_stored_once_none_dropped(
    cluster: EmbeddedNatsCluster,
) -> None:
    nc = await connect(cluster.url, "test-publisher", timeout=10)
    js = nc.jetstream()
    await js.add_stream(probes_config(3))
    publisher = EventPublisher(js).start()
    feeder = Feeder(publisher)
    feeding = asyncio.create_task(feeder.run(EVENTS))
    stalls = []
    try:
        for kill in range(KILLS):
            leader = None

            async def elected() -> bool:
                nonlocal leader
                leader = await leader_of(js)
                return leader is not None

            await wait_for(elected, timeout=60, what="a stream leader with every replica current")
            await wait_for(
                lambda k=kill: len(feeder.acked_at) >= 500 * (k + 1), timeout=30, what="acks before the kill"
            )
            assert leader is not None
            node = cluster.node(leader)
            retried, killed_at = publisher.stats.retried, time.monotonic()
            node.kill()
            await wait_for(lambda t=killed_at: feeder.acked_at[-1] > t + 0.5, timeout=60, what="acks after the kill")
            await wait_for(lambda: publisher.pending < 1000, timeout=60, what="the backlog of the election stored")
            stalls.append((leader, feeder.stall_after(killed_at), publisher.stats.retried - retried))
            node.launch()
            await asyncio.to_thread(cluster.wait_healthy, 60)
        feeder.enough.set()
        await asyncio.wait_for(feeding, 60)
        await asyncio.wait_for(publisher.drained(), 60)
        assert [f.result() for f in feeder.stored] == [True] * len(feeder.submitted)  # every one acked as stored
        ids = await stored_ids(js)
        assert ids == Counter(feeder.submitted)  # each Nats-Msg-Id exactly once, nothing else
        assert publisher.stats.dropped == 0 and publisher.stats.rejected == 0
        for leader, stall, retried in stalls:
            print(f"killed leader {leader}: no ack for {stall:.2f} s, {retried} publishes sent again")
        print(f"{len(feeder.submitted)} events, {publisher.stats.retried} sent again in all")
    finally:
        feeding.cancel()
        await publisher.close(timeout=1)
        await nc.close()


async def test_with_nats_unreachable_input_waits_for_room_and_nothing_is_dropped(tmp_path: Path) -> None:
    server = EmbeddedNatsServer(tmp_path / "nats").start()
    nc = await connect(server.url, "test-publisher", timeout=10)
    try:
        js = nc.jetstream()
        await js.add_stream(probes_config(1))
        publisher = EventPublisher(js, max_buffered=200).start()
        check = watch_room("test", publisher)
        feeder = Feeder(publisher)
        feeder.enough.set()
        server.kill()
        await wait_for(lambda: not nc.is_connected, what="the client to notice")
        feeding = asyncio.create_task(feeder.run(600))
        await wait_for(lambda: publisher.full, what="the publisher to fill")
        # Input stops at the limit: room() does not return while NATS is away.
        done, _ = await asyncio.wait({feeding}, timeout=2.0)
        assert not done
        assert len(feeder.submitted) == 200 and publisher.pending == 200
        assert observability.readiness()[check] is False
        assert "not yet stored" in observability.reasons(observability.readiness())[check]
        assert publisher.stats.dropped == 0 and publisher.stats.stalls == 1

        server.start()
        await asyncio.wait_for(feeding, 60)
        await asyncio.wait_for(publisher.drained(), 60)
        assert [f.result() for f in feeder.stored] == [True] * 600
        assert await stored_ids(js) == Counter(feeder.submitted)
        assert observability.readiness()[check] is True
        assert publisher.stats.dropped == 0 and publisher.stats.stalled_seconds >= 2.0
        print(f"input paused {publisher.stats.stalled_seconds:.2f} s, {publisher.stats.retried} publishes sent again")
        await publisher.close()
    finally:
        observability.remove_check("publisher test has room")
        await nc.close()
        server.stop()
