"""A durable JetStream consumer for an event-sourced service.

The service's core is a fold: ``process(event) -> output events``. This adapter feeds it:

- in order, from a durable push consumer (``AckPolicy.ALL``: one ack covers every earlier
  message, so acking costs one publish per batch, not one per event);
- an input is acknowledged only after every output it caused is stored in JetStream, so a
  crash can repeat work but never lose it; outputs carry deterministic ids, so repeated
  work is dropped by JetStream's duplicate window;
- a duplicate input (same ``event_id``) is folded once;
- a malformed or oversized message, or one that makes the core raise, is copied to
  ``autoserve.deadletter.<service>`` with the reason and acknowledged: it never stalls the
  consumer and is never retried forever.
- while the publisher is full (JetStream not storing outputs), no further input is
  handled: it stays in JetStream, unacknowledged, until there is room (backpressure).

``replay`` rebuilds state before consuming live: it folds, without publishing, everything
from a start time up to the durable consumer's ack floor, the last input whose outputs
were stored before the service stopped.

FastStream is not used here on purpose: its per-message handlers measured about 6,800
events/s on this machine, far below what the detector must sustain (DESIGN.md), and its
NATS default terminates a message whose handler raises instead of dead-lettering it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.errors import BadRequestError, NotFoundError

from autoserve_events import AnyEvent, Event, MalformedEvent, deadletter, decode
from autoserve_events.durables import DurableSpec

from . import observability
from .admission import Admit
from .feed import read_window, sequences
from .publisher import EventPublisher
from .tasks import cancel_all

log = structlog.get_logger("autoserve.consumer")

MAX_EVENT_BYTES = 64 * 1024
# An output is an event to publish, or a future that resolves once something the service
# stores elsewhere (a ClickHouse batch, say) is durable: the input is acked only after it.
Output = Event | asyncio.Future[bool]
ProcessFn = Callable[[AnyEvent], Sequence[Output]]


def start_point(seconds_ago: float | None) -> dict[str, Any]:
    """The deliver policy of a durable created now that starts ``seconds_ago`` back."""
    if seconds_ago is None:
        return {"deliver_policy": DeliverPolicy.ALL}
    if seconds_ago == 0:  # from its creation: the server's clock, and the same config from every creator
        return {"deliver_policy": DeliverPolicy.NEW}
    since = datetime.fromtimestamp(time.time() - seconds_ago, UTC).isoformat()
    return {"deliver_policy": DeliverPolicy.BY_START_TIME, "opt_start_time": since}


def pull_config(spec: DurableSpec, ack_wait: float, max_ack_pending: int = 10_000) -> ConsumerConfig:
    """A durable that several replicas pull work from: each message to one of them, and
    back to another one if not acknowledged within ``ack_wait``."""
    return ConsumerConfig(
        durable_name=spec.name,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_ack_pending=max_ack_pending,
        filter_subjects=list(spec.filter_subjects),
        **start_point(spec.start_seconds_ago),
    )


async def create_durable(js: JetStreamContext, spec: DurableSpec, pull_ack_wait: float = 30.0) -> bool:
    """Create ``spec``'s durable unless it exists; True if this call created it."""
    config = pull_config(spec, pull_ack_wait) if spec.pull else ConsumerSpec.of(spec).config()
    created, _ = await ensure_durable(js, spec.stream, config)
    return created


async def ensure_durable(js: JetStreamContext, stream: str, config: ConsumerConfig) -> tuple[bool, ConsumerInfo]:
    """The durable ``config`` names: created if missing (True), else the existing one with
    the service's own ``ack_wait`` and ``max_ack_pending`` (``apply`` created it with the
    defaults; its start point stays). Two creators at once: the loser reads the winner's."""
    name = config.durable_name
    try:
        info = await js.consumer_info(stream, name)
    except NotFoundError:
        try:
            return True, await js.add_consumer(stream, config)
        except BadRequestError:
            info = await js.consumer_info(stream, name)  # created meanwhile: not an error
    have = info.config
    if (have.ack_wait, have.max_ack_pending) != (config.ack_wait, config.max_ack_pending):
        # No ``name``: nats-py then asks DURABLE.CREATE, which a service's credential may use.
        updated = replace(have, name=None, ack_wait=config.ack_wait, max_ack_pending=config.max_ack_pending)
        info = await js.add_consumer(stream, updated)  # the same durable with new tunables: an update
        log.info("durable consumer updated", durable=name, ack_wait=config.ack_wait,
                 max_ack_pending=config.max_ack_pending)  # fmt: skip
    return False, info


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    # One subject, a wildcard: nats-server delivers a consumer with several filter subjects
    # about 15x slower (3,200 against 50,000 msgs/s measured; nats-io/nats-server#7014), so
    # a service takes one wildcard and its fold ignores the types it does not use.
    filter_subject: str
    max_ack_pending: int = 20_000
    ack_wait_seconds: float = 30.0
    # Where a newly created durable starts (autoserve_events.durables): seconds back from
    # now, or None for everything stored.
    start_seconds_ago: float | None = None

    @classmethod
    def of(cls, spec: DurableSpec, name: str | None = None, **tuning: Any) -> ConsumerSpec:
        """``spec``'s consumer, under another ``name`` where a deployment runs several."""
        (subject,) = spec.filter_subjects
        return cls(spec.stream, name or spec.name, subject, start_seconds_ago=spec.start_seconds_ago, **tuning)

    @property
    def deliver_subject(self) -> str:
        # Outside every stream's subjects, so deliveries are never stored again.
        return f"autoserve.deliver.{self.durable}"

    def config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.durable,
            deliver_subject=self.deliver_subject,
            **start_point(self.start_seconds_ago),
            ack_policy=AckPolicy.ALL,
            ack_wait=self.ack_wait_seconds,
            max_ack_pending=self.max_ack_pending,
            filter_subject=self.filter_subject,
            flow_control=True,
            idle_heartbeat=5.0,
        )


@dataclass
class ConsumerStats:
    received: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    replayed: int = 0
    outputs: int = 0
    acked_seq: int = 0
    last_seq: int = 0
    resumed: int = 0  # times deliveries were lost in transit and the durable delivered again
    started_at: float = field(default_factory=time.time)


def dead_letter_headers(service: str, msg: Msg, reason: str) -> dict[str, str]:
    """The headers of the copy parked on ``autoserve.deadletter.<service>``. The id names the
    service: two services dead-lettering the same message store two letters, and one
    service's repeated attempt is stored once."""
    meta = msg.metadata
    return {
        "Nats-Msg-Id": f"dl-{service}-{meta.stream}-{meta.sequence.stream}",
        "Autoserve-Reason": reason[:1000],
        "Autoserve-Subject": msg.subject,
        "Autoserve-Stream-Seq": str(meta.sequence.stream),
    }


def publish_dead_letter(publisher: EventPublisher, service: str, msg: Msg, reason: str) -> asyncio.Future[bool] | None:
    """Park ``msg`` on ``autoserve.deadletter.<service>`` with why, as every consumer parks
    one (headers, id, metrics); the future says when it is stored."""
    observability.dead_lettered(service, reason)
    log.warning("message dead-lettered", subject=msg.subject, seq=msg.metadata.sequence.stream, reason=reason[:200])
    headers = dead_letter_headers(service, msg, reason)
    return publisher.submit_raw(deadletter(service), msg.data[:MAX_EVENT_BYTES], headers, track=True)


class SeenIds:
    """The last ``capacity`` event ids, for idempotency; bounded, oldest forgotten first."""

    def __init__(self, capacity: int) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def add(self, event_id: str) -> bool:
        """Record ``event_id``; False if it was already seen."""
        if event_id in self._ids:
            return False
        self._ids[event_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
        return True


class EventConsumer:
    def __init__(
        self,
        js: JetStreamContext,
        publisher: EventPublisher,
        spec: ConsumerSpec,
        service: str,
        process: ProcessFn,
        *,
        seen_capacity: int = 500_000,
        admit: Admit | None = None,
    ) -> None:
        self._js = js
        self._service = service
        self._publisher = publisher
        self._spec = spec
        self._process = process
        self._admit = admit  # inputs for unconfigured apps or instances are dead-lettered
        self._seen = SeenIds(seen_capacity)
        self._awaiting: deque[tuple[Msg, int, list[asyncio.Future[bool]]]] = deque()
        self._ackable: tuple[Msg, int] | None = None  # the latest input ready to ack, and its stream seq
        self._ack_wakeup = asyncio.Event()
        self._acker: asyncio.Task[None] | None = None
        self._sub: JetStreamContext.PushSubscription | None = None
        self._highest_seq = 0  # highest stream sequence taken by this process
        self._last_delivery: int | None = None  # consumer sequence of the last delivery; None: unknown
        self._recreated_at = 0  # the stream sequence the durable was last recreated to start at
        self._resuming: asyncio.Task[None] | None = None  # after deliveries were lost in transit
        self._watched: asyncio.Future[bool] | None = None
        self.stats = ConsumerStats()
        observability.watch_consumer(service, self)  # /metrics from self.stats; /readyz until bound

    @property
    def highest_seq(self) -> int:
        """The highest stream sequence this process has taken (folded or dead-lettered)."""
        return self._highest_seq

    async def ack_floor(self) -> int:
        """The stream sequence of the last input acknowledged: its outputs are stored."""
        info = await self._ensure_consumer()
        return info.ack_floor.stream_seq if info.ack_floor else 0

    async def replay(self, since: float, until_seq: int, subject: str, idle_timeout: float = 5.0) -> int:
        """Fold inputs on ``subject`` from wall time ``since`` up to stream sequence
        ``until_seq`` without publishing anything; return how many were folded."""
        count = 0

        def fold(seq: int, msg: Msg) -> bool:
            nonlocal count
            try:
                event = decode(msg.data)
                if self._seen.add(event.event_id) and not (self._admit and self._admit(event)):
                    self._process(event)
                    count += 1
            except MalformedEvent:
                pass  # dead-lettered when it was live
            except Exception:  # as live, where it was dead-lettered: skip it, keep rebuilding
                log.exception("fold failed during replay; input skipped", subject=msg.subject, seq=seq)
            return True

        await read_window(self._js, self._spec.stream, subject, since, until_seq, fold, idle_timeout)
        self.stats.replayed = count
        return count

    async def start(self) -> None:
        await self._resume_at_ack_floor()
        # Live inputs only (replay used the bare fold): counted by type, 1 in 64 timed.
        self._process = observability.instrument(self._service, self._process)
        self._acker = asyncio.create_task(self._ack_loop(), name=f"acker:{self._spec.durable}")
        await self._subscribe()

    async def _subscribe(self) -> None:
        # A durable just recreated delivers from consumer sequence 1; an existing one from
        # where it is, which is not known here: its first delivery tells.
        self._last_delivery = 0 if self._recreated_at > self._highest_seq else None
        self._sub = await self._js.subscribe_bind(
            self._spec.stream,
            self._spec.config(),
            self._spec.durable,
            cb=self._on_message,
            manual_ack=True,
            pending_msgs_limit=self._spec.max_ack_pending * 2,
        )

    async def caught_up(self, timeout: float = 60.0) -> bool:
        """Wait until what was stored before ``start`` is folded (the backlog a service must
        know before it acts: the alerter's own notification log, say); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await self._js.consumer_info(self._spec.stream, self._spec.durable)
            delivered = info.delivered.stream_seq if info.delivered else 0
            if info.num_pending == 0 and (info.num_ack_pending == 0 or self._highest_seq >= delivered):
                return True
            await asyncio.sleep(0.02)
        return False

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop taking messages, wait for outputs to be stored, acknowledge what is done."""
        if self._resuming is not None:
            await cancel_all([self._resuming])
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        deadline = time.monotonic() + timeout
        while self._awaiting and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._acker is not None:
            await cancel_all([self._acker])
        await self._ack_now()

    async def _resume_at_ack_floor(self) -> None:
        """Messages a previous process took but never acknowledged would come back only
        after ``ack_wait``, behind newer ones, and a fold must see its inputs in order. So
        the durable consumer is recreated to deliver again from just after its ack floor."""
        info = await self._ensure_consumer()
        if not info.num_ack_pending:
            return
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        await self._redeliver_from(floor + 1)
        log.info(
            "resuming after the ack floor", durable=self._spec.durable, seq=floor + 1, unacked=info.num_ack_pending
        )

    async def _redeliver_from(self, seq: int) -> None:
        config = self._spec.config()
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = seq
        config.opt_start_time = None  # the server refuses a start sequence with a start time

        async def recreate() -> None:
            with contextlib.suppress(NotFoundError):  # deleted by an attempt that failed after
                await self._js.delete_consumer(self._spec.stream, self._spec.durable)
            await self._js.add_consumer(self._spec.stream, config)

        # Not cut in two by a stop: a deleted durable recreated from its start point would
        # skip inputs.
        await asyncio.shield(recreate())
        self._recreated_at = seq

    async def _resume_after_lost_deliveries(self, lost: int) -> None:
        """Deliveries were lost in transit (the NATS node between us and the consumer's
        leader went away with them in flight). Acknowledging a later one would cover them
        (AckPolicy.ALL) and they would never be folded, so: stop taking input, let what was
        taken be stored and acknowledged, and deliver again from just after it, in order."""
        resume_at = max(self._highest_seq + 1, self._recreated_at)
        log.warning("deliveries lost in transit; delivering again from the last input taken",
                    durable=self._spec.durable, lost=lost, seq=resume_at)  # fmt: skip
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        while self._awaiting:  # the publisher keeps trying: these outputs get stored
            await asyncio.sleep(0.02)
        await self._ack_now()
        while True:
            try:
                await self._redeliver_from(resume_at)
                await self._subscribe()
                break
            except Exception as exc:  # NATS is still electing or reconnecting: try again
                log.info("resume deferred", durable=self._spec.durable, error=str(exc) or type(exc).__name__)
                await asyncio.sleep(0.5)
        self.stats.resumed += 1
        self._resuming = None

    async def _ensure_consumer(self) -> ConsumerInfo:
        return (await ensure_durable(self._js, self._spec.stream, self._spec.config()))[1]

    async def _on_message(self, msg: Msg) -> None:
        if self._publisher.full:
            # Backpressure: handle nothing more until the outputs can be stored. The delivered
            # inputs wait here unacknowledged, flow control stops the server sending more,
            # and a redelivery of one of them after ack_wait is recognised below.
            await self._publisher.room()
        if self._resuming is not None:
            return  # the old subscription's last deliveries: delivered again after the resume
        seq, delivery = sequences(msg)
        if self._last_delivery is not None and delivery > self._last_delivery + 1:
            lost = delivery - self._last_delivery - 1
            self._resuming = asyncio.create_task(self._resume_after_lost_deliveries(lost), name="consumer-resume")
            return
        self._last_delivery = delivery
        self.stats.received += 1
        if seq <= self._highest_seq:
            # A redelivery (ack_wait passed while its outputs were still being stored, say):
            # this process already took it, and the ack of a later message covers it
            # (AckPolicy.ALL). Tracking it again would grow memory with every redelivery.
            self.stats.duplicates += 1
            if seq <= self.stats.acked_seq:  # our ack was lost: repeat it, it is safe
                with contextlib.suppress(Exception):
                    await msg.ack()
            return
        self._highest_seq = seq
        stored: list[asyncio.Future[bool] | None] = []
        if len(msg.data) > MAX_EVENT_BYTES:
            stored.append(self._dead_letter(msg, f"oversized: {len(msg.data)} bytes > {MAX_EVENT_BYTES}"))
        else:
            try:
                event = decode(msg.data)
            except MalformedEvent as exc:
                stored.append(self._dead_letter(msg, str(exc)))
            else:
                if not self._seen.add(event.event_id):
                    self.stats.duplicates += 1
                elif self._admit is not None and (refused := self._admit(event)):
                    stored.append(self._dead_letter(msg, refused))
                else:
                    try:
                        outputs = self._process(event)
                    except Exception as exc:  # a bug must not stall the stream: park the input
                        log.exception("handler failed; input dead-lettered", subject=msg.subject)
                        stored.append(self._dead_letter(msg, f"handler error: {type(exc).__name__}: {exc}"))
                    else:
                        self.stats.outputs += len(outputs)
                        stored.extend(
                            o if isinstance(o, asyncio.Future) else self._publisher.submit(o, track=True)
                            for o in outputs
                        )
        self._settle(msg, seq, [f for f in stored if f is not None])

    def _dead_letter(self, msg: Msg, reason: str) -> asyncio.Future[bool] | None:
        self.stats.dead_lettered += 1
        return publish_dead_letter(self._publisher, self._service, msg, reason)

    def _settle(self, msg: Msg, seq: int, futures: list[asyncio.Future[bool]]) -> None:
        """An input becomes ackable once its outputs are stored and every earlier input is."""
        if futures or self._awaiting:
            self._awaiting.append((msg, seq, futures))
            for future in futures:
                if future is not self._watched:  # a batch future shared by many inputs: one callback
                    future.add_done_callback(self._advance)
                    self._watched = future
            if len(self._awaiting) == 1:  # only a new head can be ready without a callback
                self._advance()
        else:
            self._ackable = (msg, seq)
            self._ack_soon()

    def _advance(self, _: object = None) -> None:
        awaiting = self._awaiting
        while awaiting:
            for future in awaiting[0][2]:
                if not future.done():
                    self._ack_soon()
                    return
            msg, seq, _futures = awaiting.popleft()
            self._ackable = (msg, seq)
        self._ack_soon()

    def _ack_soon(self) -> None:
        if self._ackable is not None:
            self.stats.last_seq = self._ackable[1]
        if self.stats.last_seq - self.stats.acked_seq >= 1000:
            self._ack_wakeup.set()

    async def _ack_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ack_wakeup.wait(), 0.05)
            self._ack_wakeup.clear()
            await self._ack_now()

    async def _ack_now(self) -> None:
        ackable, self._ackable = self._ackable, None
        if ackable is None:
            return
        try:
            await ackable[0].ack()  # AckPolicy.ALL: covers every earlier message too
            self.stats.acked_seq = ackable[1]
        except Exception as exc:  # disconnected: the next ack covers this one
            log.debug("ack deferred", error=type(exc).__name__)
            if self._ackable is None:
                self._ackable = ackable
