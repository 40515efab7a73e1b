"""The publisher on a real 3-node JetStream cluster (R3 streams) while stream leaders are
SIGKILLed, and with NATS unreachable: every event submitted is stored exactly once, none
is dropped, and input waits for room instead.

Each test prints what it measured (``pytest -s``): how long acks stopped per kill, and how
many publishes were sent again."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from autoserve_config.model import HealthCheckConfig
from autoserve_events import (
    EVENTS_STREAM,
    PROBES_STREAM,
    AnyEvent,
    HealthChanged,
    ProbeCompleted,
    derived_event_id,
    encode,
    headers_for,
    stream_specs,
    subject_for,
)
from autoserve_prober.workers import ProbeWorkers
from autoserve_probes import Target
from autoserve_runtime import ConsumerSpec, EmbeddedNatsServer, EventConsumer, EventPublisher, connect, observability
from autoserve_runtime.host import watch_room
from autoserve_runtime.nats_cluster import EmbeddedNatsCluster

from ..support.waiting import wait_for

pytestmark = pytest.mark.cluster  # runs in its own lane beside the others (Makefile)

KILLS = 2
EVENTS = 3000


def probes_config(replicas: int, name: str = PROBES_STREAM) -> StreamConfig:
    """A stream as the events library specifies it (AUTOSERVE_PROBES), with ``replicas``."""
    (spec,) = [s for s in stream_specs() if s.name == name]
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        max_age=spec.max_age_seconds,
        duplicate_window=spec.duplicate_window_seconds,
        num_replicas=replicas,
    )


def probe(n: int, **fields: object) -> ProbeCompleted:
    return ProbeCompleted(app_name="app", instance_id=f"i{n % 10}", check_type="http", is_healthy=True,
                          response_time_ms=1.0, timestamp=time.time(), **fields)  # fmt: skip


async def not_within(event: asyncio.Event, seconds: float) -> bool:
    """True if ``event`` stays unset for ``seconds``: the deadline of a 'never happens'."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return True
    return False


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedNatsServer]:
    nats = EmbeddedNatsServer(tmp_path / "nats")
    try:
        yield await asyncio.to_thread(nats.start)
    finally:
        nats.stop()


async def stored_ids(js: JetStreamContext, stream: str = PROBES_STREAM) -> Counter[str]:
    """Every ``Nats-Msg-Id`` in ``stream``, read back from the first message, with its count."""
    total = (await js.stream_info(stream)).state.messages
    ids: Counter[str] = Counter()

    async def count(msg: Msg) -> None:
        ids[(msg.headers or {}).get("Nats-Msg-Id", "")] += 1  # the floor's bare publishes: ""

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


@contextlib.asynccontextmanager
async def publishing(
    url: str, stream: StreamConfig, **tuning: Any
) -> AsyncIterator[tuple[Client, JetStreamContext, EventPublisher]]:
    """A client of its own, ``stream`` created, and an ``EventPublisher``; closed after."""
    nc = await connect(url, "test-publisher", timeout=10)
    try:
        js = nc.jetstream()
        await js.add_stream(stream)
        publisher = EventPublisher(js, **tuning).start()
        try:
            yield nc, js, publisher
        finally:
            await publisher.close(timeout=1)
    finally:
        await nc.close()


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


class Floor:
    """Beside the publisher, for comparison: a bare nats-py ``js.publish`` every 10 ms (0.5 s
    timeout, no Nats-Msg-Id), and when each succeeded."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.succeeded_at: list[float] = []

    async def run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.js.publish("autoserve.probe.floor.f", b"{}", timeout=0.5)
                self.succeeded_at.append(time.monotonic())
            await asyncio.sleep(0.01)

    def back_after(self, moment: float) -> float:
        return min((t for t in self.succeeded_at if t > moment + 0.05), default=float("nan")) - moment


async def test_publishes_in_flight_during_leader_elections_are_stored_once_none_dropped(
    cluster: EmbeddedNatsCluster,
) -> None:
    async with publishing(cluster.url, probes_config(3)) as (_, js, publisher):
        feeder = Feeder(publisher)
        feeding = asyncio.create_task(feeder.run(EVENTS))
        floor = Floor(js)
        flooring = asyncio.create_task(floor.run())
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
                await wait_for(
                    lambda t=killed_at: feeder.acked_at[-1] > t + 0.5, timeout=60, what="acks after the kill"
                )
                await wait_for(lambda: publisher.pending < 1000, timeout=60, what="the backlog of the election stored")
                await wait_for(lambda t=killed_at: floor.succeeded_at[-1] > t + 0.5, timeout=60, what="the floor back")
                measured = feeder.stall_after(killed_at), floor.back_after(killed_at), publisher.stats.retried - retried
                stalls.append((leader, *measured))
                node.launch()
                await asyncio.to_thread(cluster.wait_healthy, 60)
            feeder.enough.set()
            await asyncio.wait_for(feeding, 60)
            await asyncio.wait_for(publisher.drained(), 60)
            assert [f.result() for f in feeder.stored] == [True] * len(feeder.submitted)  # every one acked as stored
            flooring.cancel()
            ids = await stored_ids(js)
            assert ids.pop("") >= len(floor.succeeded_at)  # the floor's own: a timed-out one may be stored too
            assert ids == Counter(feeder.submitted)  # each Nats-Msg-Id exactly once, nothing else
            assert publisher.stats.rejected == 0 and publisher.stats.acked == publisher.stats.submitted
            for leader, stall, bare, retried in stalls:
                print(f"killed leader {leader}: no ack for {stall:.2f} s (a bare js.publish back after {bare:.2f} s), "
                      f"{retried} publishes sent again")  # fmt: skip
            print(f"{len(feeder.submitted)} events, {publisher.stats.retried} sent again in all")
        finally:
            feeding.cancel()
            flooring.cancel()


async def test_with_nats_unreachable_input_waits_for_room_and_nothing_is_dropped(server: EmbeddedNatsServer) -> None:
    async with publishing(server.url, probes_config(1), max_buffered=200) as (nc, js, publisher):
        check = watch_room("test", publisher)
        feeder = Feeder(publisher)
        feeder.enough.set()
        feeding = asyncio.create_task(feeder.run(600))
        try:
            server.kill()
            await wait_for(lambda: not nc.is_connected, what="the client to notice")
            await wait_for(lambda: publisher.full, what="the publisher to fill")
            # Input stops at the limit: room() does not return while NATS is away.
            done, _ = await asyncio.wait({feeding}, timeout=2.0)
            assert not done
            assert publisher.pending == 200 and len(feeder.submitted) == 200 + publisher.stats.acked
            assert observability.readiness()[check] is False
            assert "not yet stored" in observability.reasons(observability.readiness())[check]
            assert publisher.stats.stalls == 1

            await asyncio.to_thread(server.start)
            await asyncio.wait_for(feeding, 60)
            await asyncio.wait_for(publisher.drained(), 60)
            assert [f.result() for f in feeder.stored] == [True] * 600
            assert await stored_ids(js) == Counter(feeder.submitted)
            assert observability.readiness()[check] is True
            assert publisher.stats.acked == publisher.stats.submitted and publisher.stats.stalled_seconds >= 2.0
            print(
                f"input paused {publisher.stats.stalled_seconds:.2f} s, {publisher.stats.retried} publishes sent again"
            )
        finally:
            feeding.cancel()
            observability.remove_check(check)


async def test_an_event_no_server_would_take_is_refused_and_the_publishing_goes_on(server: EmbeddedNatsServer) -> None:
    async with publishing(server.url, probes_config(1)) as (nc, _js, publisher):
        too_big = b"x" * (nc.max_payload + 1)  # nats-py refuses it before sending
        refused = publisher.submit_raw("autoserve.probe.app.i1", too_big, {"Nats-Msg-Id": "too-big"}, track=True)
        after = publisher.submit(probe(1), track=True)
        assert await asyncio.wait_for(refused, 10) is False  # type: ignore[arg-type]
        assert await asyncio.wait_for(after, 10) is True  # type: ignore[arg-type]
        assert publisher.stats.rejected == 1 and publisher.pending == 0


async def test_a_publisher_whose_task_ends_holds_input_and_says_why(server: EmbeddedNatsServer) -> None:
    nc = await connect(server.url, "test-broken", timeout=10)
    await nc.close()  # its pump cannot even subscribe for acks
    publisher = EventPublisher(nc.jetstream()).start()
    try:
        await wait_for(lambda: publisher.full, what="the publisher to hold input")
        assert "publisher task EventPublisher._pump ended: ConnectionClosedError" in (publisher.why_full() or "")
        waiting = asyncio.ensure_future(publisher.room())
        done, _ = await asyncio.wait({waiting}, timeout=0.5)
        waiting.cancel()
        assert not done  # input waits: nothing is taken that could not be stored
    finally:
        await publisher.close(timeout=0.1)


async def test_the_probe_loop_waits_for_room_while_nats_is_away_and_skips_nothing_silently(
    server: EmbeddedNatsServer,
) -> None:
    async with publishing(server.url, probes_config(1), max_buffered=50) as (nc, js, publisher):
        submitted: list[str] = []
        probed_while_full = asyncio.Event()

        async def probe_fn(target: Target, scheduled_at: float | None) -> ProbeCompleted:
            if publisher.full:
                probed_while_full.set()
            return probe(len(submitted), scheduled_at=scheduled_at)

        def publish(event: ProbeCompleted) -> None:
            submitted.append(event.event_id)
            publisher.submit(event)

        workers = ProbeWorkers(probe_fn, publish, room=publisher)
        check = HealthCheckConfig(initial_delay_seconds=0, period_seconds=0.1)
        try:
            server.kill()
            await wait_for(lambda: not nc.is_connected, what="the client to notice")
            workers.apply({("app", f"i{n}"): Target("app", f"i{n}", "127.0.0.1", 1, check) for n in range(10)})
            await wait_for(lambda: publisher.full, what="the publisher to fill")
            probes_when_full = workers.stats.probes
            assert await not_within(probed_while_full, 1.5)  # no probe round starts while full
            assert workers.stats.probes == probes_when_full == len(submitted)

            await asyncio.to_thread(server.start)
            await wait_for(lambda: workers.stats.room_waits >= 10, timeout=30, what="every worker to go on")
            await wait_for(lambda: len(submitted) >= probes_when_full + 50, timeout=30, what="probing again")
            await workers.stop_all()
            await asyncio.wait_for(publisher.drained(), 30)
            assert workers.stats.room_wait_seconds >= 1.5 * 10  # each worker waited the whole stall
            assert workers.stats.missed_slots > 0  # the slots that passed meanwhile: counted, not fired
            assert await stored_ids(js) == Counter(submitted)
            assert publisher.stats.acked == publisher.stats.submitted
        finally:
            await workers.stop_all()


async def test_a_consumer_takes_no_input_while_its_outputs_cannot_be_stored(server: EmbeddedNatsServer) -> None:
    """The outputs' stream is missing (JetStream answers 503, as during an election): the
    consumer stops at the publisher's limit, its input stays unacked in JetStream, and once
    the stream exists every input is folded once and every output stored once."""
    async with publishing(server.url, probes_config(1, EVENTS_STREAM), max_buffered=20) as (_, js, publisher):
        inputs = [HealthChanged(instance_id=f"i{n}", app_name="app", healthy=True, previous=False, consecutive=n,
                                reason="test", timestamp=time.time()) for n in range(200)]  # fmt: skip
        for event in inputs:
            await js.publish(subject_for(event), encode(event), headers=headers_for(event))
        folded: list[str] = []
        past_the_limit = asyncio.Event()

        def fold(event: AnyEvent) -> list[ProbeCompleted]:
            folded.append(event.event_id)
            if publisher.full:
                past_the_limit.set()
            return [probe(len(folded), event_id=derived_event_id("out", event.event_id))]

        spec = ConsumerSpec(EVENTS_STREAM, "test-backpressure", "autoserve.event.>")
        consumer = EventConsumer(js, publisher, spec, "test", fold)
        try:
            await consumer.start()
            await wait_for(lambda: publisher.full, what="the publisher to fill")
            assert await not_within(past_the_limit, 1.5)
            assert len(folded) == 20  # the limit, then nothing more
            info = await js.consumer_info(EVENTS_STREAM, spec.durable)
            assert (info.ack_floor.stream_seq if info.ack_floor else 0) == 0  # no input acked: all still in JetStream

            await js.add_stream(probes_config(1))
            await wait_for(lambda: len(folded) == 200, timeout=30, what="every input folded")
            await asyncio.wait_for(publisher.drained(), 30)
            await wait_for(lambda: consumer.stats.acked_seq == 200, timeout=10, what="every input acked")
            assert sorted(folded) == sorted(event.event_id for event in inputs)  # each once
            assert await stored_ids(js) == Counter(derived_event_id("out", e.event_id) for e in inputs)
            assert publisher.stats.acked == publisher.stats.submitted and publisher.stats.stalls >= 1
        finally:
            await consumer.stop(timeout=1)
