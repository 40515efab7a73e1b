"""The detector's fold, split among its members by partition (``core/partitions.py`` decides).

Every member's durable delivers every input; the fold skips those of partitions another
member owns, folds its own (publishing or not by the floor rule), and holds the inputs of
a partition it is rebuilding: it returns a future for each, which the consumer waits on
before acknowledging (so acks stay in order). A rebuild replays the window from
AUTOSERVE_PROBES, then folds what was held.

A fenced member (its lease may have lapsed: paused, cut off) folds and publishes nothing
and writes no floors: its inputs wait, unacknowledged, until it is a member again; then
the partitions it owns are rebuilt, as a takeover. A member that leaves (SIGTERM)
acknowledges what waits without folding it and writes final floors below it, so
whoever folds those inputs next publishes their outputs, once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from autoserve_events import AnyEvent, Event, MalformedEvent, decode
from autoserve_runtime import ConsumerSpec, EventConsumer
from autoserve_runtime.admission import Admit
from autoserve_runtime.consumer import Output, ensure_durable
from autoserve_runtime.feed import read_window
from autoserve_runtime.membership import Membership
from autoserve_runtime.observability.metrics import EVENTS_OUT
from autoserve_runtime.publisher import EventPublisher

from ..core.detector import Detector
from ..core.partitions import PARTITIONS, PartitionTable, Rebuild, Route, partition_key, partition_of
from .progress import Floors
from .slot import DurableSlot

log = structlog.get_logger("autoserve.detector")

FLOOR_SECONDS = 1.0  # a partition's floor is written at most this often
RETRY_SECONDS = 1.0
PARTITION_CACHE = 200_000  # instances whose partition is remembered

Waiting = tuple[AnyEvent, "asyncio.Future[bool]"]


def _resolve(done: asyncio.Future[bool]) -> None:
    if not done.done():
        done.set_result(True)


@dataclass
class Wiring:
    """What the partitioned fold talks to; all exist once the host has provisioned."""

    js: JetStreamContext
    publisher: EventPublisher
    membership: Membership
    slot: DurableSlot  # the durable's lease: this member folds nothing without it
    spec: ConsumerSpec
    consumer: Callable[[], EventConsumer | None]  # created by the host after ``start``
    stopping: asyncio.Event  # set on SIGTERM, before the member leaves


class PartitionedDetector:
    def __init__(self, detector: Detector, admit: Admit) -> None:
        self.detector = detector
        self.table: PartitionTable[Waiting] = PartitionTable()
        self._admit = admit
        self._partitions: dict[tuple[str, str], int] = {}
        self._outs = EVENTS_OUT.child("detector")  # the live fold's outputs are counted by the consumer
        self._wake = asyncio.Event()
        self._first_pass = asyncio.Event()
        self._w: Wiring | None = None
        self._floors: Floors | None = None
        self._start_position = 0  # the durable's position when this process started
        self._default_floor = 0  # for a partition no owner ever wrote a floor for
        self.replayed_at_start = 0
        self.skipped = 0  # inputs of partitions other members own
        self.takeovers = 0  # rebuilds after the first one

    # -- wiring ---------------------------------------------------------------------------

    async def start(self, wiring: Wiring) -> None:
        """Before the consumer goes live: where its durable stands, what this member owns."""
        self._w, self._floors = wiring, Floors(wiring.js)
        created, info = await ensure_durable(wiring.js, wiring.spec.stream, wiring.spec.config())
        acked = info.ack_floor.stream_seq if info.ack_floor else 0
        delivered = info.delivered.stream_seq if info.delivered else 0
        # The consumer resumes after its ack floor when inputs were left unacknowledged,
        # else where it delivered last (a durable created now: the stream's end).
        self._start_position = acked if info.num_ack_pending else max(acked, delivered)
        # A partition nobody wrote a floor for: one detector upgraded from before floors
        # starts where its durable's acks say, as it did then. A durable created now says
        # nothing (its ack floor is just where it starts): publish the window's outputs.
        self._default_floor = 0 if created else acked
        wiring.membership.on_change.append(self.on_change)
        self.on_change()
        if not self.table.rebuilding:
            self._first_pass.set()

    async def rebuilt_at_start(self) -> int:
        """Wait for the first rebuild (what a restarted detector replays); how many inputs it folded."""
        await self._first_pass.wait()
        return self.replayed_at_start

    def describe(self) -> str:
        return f"{len(self.table.owned)} partitions, {len(self.detector.instances)} instances"

    @property
    def fenced(self) -> bool:
        """This member's lease, or its durable's, may have lapsed: it may not act as an owner."""
        assert self._w is not None
        return self._w.membership.fenced or not self._w.slot.held

    def _position(self) -> int:
        consumer = self._w.consumer() if self._w else None
        return max(self._start_position, consumer.highest_seq if consumer else 0)

    def _partition(self, app: str, instance: str) -> int:
        key = (app, instance)
        found = self._partitions.get(key)
        if found is None:
            if len(self._partitions) >= PARTITION_CACHE:  # discovered containers come and go
                self._partitions.clear()
            found = self._partitions[key] = partition_of(app, instance)
        return found

    # -- ownership ------------------------------------------------------------------------

    def on_change(self) -> None:
        """Members or fencing changed (``membership.on_change``): recompute what is owned."""
        if self._w is None:
            return  # not started: ``start`` computes it
        membership = self._w.membership
        fenced = self.fenced
        owned = [] if fenced else [p for p in range(PARTITIONS) if membership.owns(partition_key(p))]
        update = self.table.update(owned, fenced, self._position())
        if fenced and self._w.stopping.is_set():
            update.released += self.table.release_fenced()
        self._drop({*update.lost, *update.gained})
        for _, done in update.released:
            _resolve(done)
        if update.gained:
            self._wake.set()
        if update.lost or update.gained:
            log.info("partitions changed", gained=len(update.gained), lost=len(update.lost), fenced=fenced,
                     owned=len(self.table.owned), members=sorted(membership.members))  # fmt: skip

    def _drop(self, partitions: set[int]) -> None:
        if not partitions:
            return
        instances = self.detector.instances
        for key in [k for k in instances if self._partition(*k) in partitions]:
            del instances[key]

    # -- live inputs ----------------------------------------------------------------------

    def fold(self, event: AnyEvent) -> list[Output]:
        """The consumer's fold. The input's stream sequence is the consumer's ``highest_seq``:
        it is set to each input's sequence just before the fold sees it."""
        instance = getattr(event, "instance_id", None)
        if instance is None:
            return []
        assert self._w is not None
        partition = self._partition(event.app_name, instance)
        consumer = self._w.consumer()
        seq = consumer.highest_seq if consumer else 0
        if self.fenced and not self.table.fenced:
            self.on_change()  # resumed after a pause: fenced before its first input, not after
        route = self.table.route(partition, seq)
        if route is Route.SKIP:
            self.skipped += 1
            return []
        if route is Route.HOLD:
            if self.table.fenced and self._w.stopping.is_set():
                return []  # leaving: the final floors stay below it
            done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self.table.hold(partition, seq, (event, done))
            return [done]
        outputs: list[Output] = list(self.detector.apply(event))
        return outputs if route is Route.PUBLISH else []

    def _fold_waiting(self, event: AnyEvent, route: Route, done: asyncio.Future[bool]) -> None:
        """An input that waited for its partition's rebuild, folded in its order."""
        try:
            outputs = self.detector.apply(event)
        except Exception:  # as the consumer would: one bad input must not stall the partition
            log.exception("fold failed for a held input; skipped", event_id=event.event_id)
            outputs = []
        if route is not Route.PUBLISH or not outputs:
            _resolve(done)
            return
        self._count(outputs)
        stored = self._submit(outputs)
        asyncio.gather(*stored).add_done_callback(lambda _: _resolve(done))

    def _count(self, outputs: list[Event]) -> None:
        for output in outputs:
            kind = output.__class__
            self._outs[kind] = self._outs.get(kind, 0) + 1

    def _submit(self, outputs: list[Event]) -> list[asyncio.Future[bool]]:
        assert self._w is not None
        return [f for o in outputs if (f := self._w.publisher.submit(o, track=True)) is not None]

    # -- rebuilds -------------------------------------------------------------------------

    async def run_rebuilds(self) -> None:
        """One replay at a time, for every partition gained since the last."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch = self.table.start_rebuilds()
            if not batch:
                if not self.table.rebuilding:  # what the start gained was lost meanwhile: ready anyway
                    self._first_pass.set()
                continue
            try:
                await self._rebuild(batch)
            except Exception as exc:  # NATS away or electing: the next pass tries again
                log.warning("partition rebuild failed; trying again", error=repr(exc), partitions=len(batch))
                self.table.retry(batch)
                await asyncio.sleep(RETRY_SECONDS)
                self._wake.set()

    async def _rebuild(self, batch: dict[int, Rebuild[Waiting]]) -> None:
        assert self._w is not None and self._floors is not None
        started, first = time.monotonic(), not self._first_pass.is_set()
        self._drop(set(batch))  # from scratch: a pass that failed may have folded part of the window
        found = await self._floors.read(batch)
        for partition, rebuild in batch.items():
            self.table.floor_read(partition, rebuild, found.get(partition, self._default_floor))
        # Outputs are counted (autoserve_events_out_total) once per process, as if folded live:
        # those of inputs this process took while fenced, not those it or another published.
        counted_above = {p: self.table.live_at_fence.get(p) for p in batch}
        stored: list[asyncio.Future[bool]] = []
        seen: set[str] = set()
        folded = published = 0

        def on_message(seq: int, msg: Msg) -> bool:
            nonlocal folded, published
            if self.fenced:
                return False  # paused past the lease mid-replay: rebuilt again once unfenced
            try:
                event = decode(msg.data)
            except MalformedEvent:
                return True  # dead-lettered when it was live
            instance = getattr(event, "instance_id", None)
            if instance is None:
                return True
            partition = self._partition(event.app_name, instance)
            route = self.table.replay_route(partition, seq, batch)
            if route is Route.SKIP or event.event_id in seen or self._admit(event):
                return True
            seen.add(event.event_id)
            try:
                outputs = self.detector.apply(event)
            except Exception:  # as live, where it was dead-lettered: skip it, keep rebuilding
                log.exception("fold failed during replay; input skipped", seq=seq)
                return True
            folded += 1
            if route is Route.PUBLISH and outputs:
                published += len(outputs)
                stored.extend(self._submit(outputs))
                if (above := counted_above[partition]) is not None and seq > above:
                    self._count(outputs)
            return True

        up_to = max(r.up_to for r in batch.values())
        since = time.time() - self.detector.window_seconds
        spec = self._w.spec
        complete = await read_window(self._w.js, spec.stream, spec.filter_subject, since, up_to, on_message)
        await asyncio.gather(*stored)
        if not complete:
            # Fenced mid-replay (the table may not know yet), or JetStream went quiet: the
            # state is partial, so nothing goes live; rebuilt again while still ours.
            self.on_change()
            raise RuntimeError(f"replay stopped before stream sequence {up_to}" + (" (fenced)" if self.fenced else ""))
        unfinished = {p for p, rebuild in batch.items() if not self._finish(p, rebuild)}
        self._drop(unfinished)  # lost, fenced or gained again meanwhile: what was folded is partial
        finished = len(batch) - len(unfinished)
        done = {"replayed": folded, "up_to_seq": up_to, "published": published,
                "seconds": round(time.monotonic() - started, 3)}  # fmt: skip
        if first:
            self.replayed_at_start = folded
            self._first_pass.set()
            log.info("state rebuilt", durable=self._w.spec.durable, partitions=finished, **done)
        elif finished:
            self.takeovers += 1
            log.info("partitions taken over", partitions=finished, **done)
        if unfinished:  # rebuilt by a later pass if still ours
            log.info("partition rebuilds abandoned", partitions=len(unfinished))

    def _finish(self, partition: int, rebuild: Rebuild[Waiting]) -> bool:
        waiting = self.table.rebuilt(partition, rebuild)
        if waiting is None:
            return False  # lost or fenced meanwhile: what waited was released or waits on
        for route, (event, done) in waiting:
            if route is Route.SKIP:
                _resolve(done)  # the replay folded it; its outputs are stored
            else:
                self._fold_waiting(event, route, done)
        return True

    # -- floors ---------------------------------------------------------------------------

    async def write_floors(self) -> None:
        """Every ``FLOOR_SECONDS``: the floors of the live partitions, when they moved."""
        assert self._w is not None and self._floors is not None
        while True:
            await asyncio.sleep(FLOOR_SECONDS)
            if self.table.fenced != self.fenced:
                self.on_change()  # a change we were not told of: never act on a stale view
            consumer = self._w.consumer()
            if consumer is None or self.fenced:
                continue
            due = self.table.floors_due(consumer.stats.acked_seq)
            if not due:
                continue
            try:
                await self._floors.write(due)
            except Exception as exc:
                log.warning("floors not written; next time", error=repr(exc))
                continue
            self.table.floors_written(due)

    async def write_final_floors(self) -> None:
        """At a graceful stop, once the consumer has acknowledged what it finished."""
        if self._w is None or self._floors is None or not self._w.stopping.is_set():
            return
        consumer = self._w.consumer()
        due = self.table.final_floors(consumer.stats.acked_seq if consumer else 0)
        if due:
            await self._floors.write(due)
            self.table.floors_written(due)
