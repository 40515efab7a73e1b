"""The work feed: ``FailureDetected`` and ``HealthChanged`` from the durable every replica
pulls from, each handed to the decide step once the state fold has reached it.

Per input: decode (a malformed one is dead-lettered and acknowledged), wait until the fold
has reached its stream sequence (else look again in 1 s), hand it to the handler, then
acknowledge it, or negatively acknowledge it with the delay the handler asked for (a
deferred remediation: JetStream keeps the incident, not memory). Inputs are handled
concurrently, up to ``concurrency`` at once; each handling is timed.

SIGTERM (``drain``): no more fetches, the inputs in flight get ``drain_seconds`` to finish,
and those still running then are cut off and given back (a negative acknowledgement:
redelivered at once, to another replica or to this one restarted).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import KW_ONLY, dataclass, field

import nats.errors
import structlog

from autoserve_events import MalformedEvent, decode
from autoserve_runtime import EVENTS_IN, HANDLER_SECONDS, cancel_all
from autoserve_runtime.consumer import publish_dead_letter

from .ports import ClaimHeld, Fold, Handler, RawPublisher, WorkCounts, WorkMessage, WorkSource

log = structlog.get_logger("autoserve.recovery.work")

FETCH_SECONDS = 1.0  # one long poll; a stop waits for it rather than abandon it
NOT_FOLDED_SECONDS = 10.0  # how long an input waits for the fold to reach it
FETCH_ERROR_PAUSE = 0.5  # disconnected: nats-py reconnects by itself


@dataclass(eq=False)
class WorkFeed:
    service: str
    handler: Handler
    fold: Fold
    counts: WorkCounts
    dead_letters: RawPublisher
    _: KW_ONLY
    concurrency: int
    drain_seconds: float
    retry_seconds: float  # after a handler error: the lease, so a takeover can happen
    # In flight, with the input each handles.
    _handlers: dict[asyncio.Task[None], WorkMessage] = field(init=False, default_factory=dict)
    _worker: asyncio.Task[None] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.concurrency)
        self._events_in = EVENTS_IN.child(self.service)
        self._observe = HANDLER_SECONDS.labels(self.service).observe

    @property
    def in_flight(self) -> int:
        return len(self._handlers)

    def start(self, source: WorkSource, stop: asyncio.Event) -> None:
        self._worker = asyncio.create_task(self._fetch(source, stop), name="recovery-work")

    async def _fetch(self, source: WorkSource, stop: asyncio.Event) -> None:
        """Fetch until ``stop``. A fetch is not cut off by the stop: it ends within its 1 s
        long poll (a message the server hands to an abandoned fetch would wait out its
        ``ack_wait`` before anyone saw it)."""
        while not stop.is_set():
            await self.dead_letters.room()  # the publisher is full: leave the input in JetStream
            try:
                # One at a time: nats-py's fetch of a batch, once its long poll has one
                # message, waits for the rest of the batch until the timeout, so the first
                # failure of a quiet period sat up to 1 s in the client (the hang bench's
                # decision p95 was 1.0 s). Inputs are few; a round trip each is cheap.
                msgs = await source.fetch(batch=1, timeout=FETCH_SECONDS)
            except (nats.errors.TimeoutError, TimeoutError):
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise asyncio.CancelledError from None  # nats-py turns a cancelled fetch into a timeout
                continue
            except nats.errors.Error as exc:
                log.warning("work fetch failed", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(FETCH_ERROR_PAUSE)
                continue
            for msg in msgs:
                self.counts.stats.received += 1
                if stop.is_set():  # fetched as the drain began: another replica takes it now
                    await give_back([msg])
                    continue
                try:
                    await self._slots.acquire()
                except asyncio.CancelledError:
                    await give_back([msg])
                    raise
                task = asyncio.create_task(self._timed(msg))
                self._handlers[task] = msg
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._handlers.pop(task, None)
        self._slots.release()

    async def drain(self) -> None:
        """SIGTERM: fetch no more, let the inputs in flight finish within
        ``drain_seconds``, then cut off what still runs and give its inputs back. At most
        once still holds for a cut-off action: its claim ``f.<failure>.<action>`` stays
        held, not done, so whoever gets the input again waits for the claim's lease and
        asks the runtime whether the action happened before doing it (the path of a
        crashed replica); a finished one is recorded and its claim done, so its
        redelivery does nothing."""
        deadline = time.monotonic() + self.drain_seconds
        if self._worker is not None:
            await asyncio.wait([self._worker], timeout=FETCH_SECONDS + 1)  # its last long poll ends by itself
            await cancel_all([self._worker])  # unless NATS is away and it is retrying
        if self._handlers:
            log.info("draining: waiting for the actions in flight", count=len(self._handlers),
                     seconds=self.drain_seconds)  # fmt: skip
            await asyncio.wait(list(self._handlers), timeout=max(0.0, deadline - time.monotonic()))
        left = dict(self._handlers)
        if not left:
            return
        log.warning("drain time ran out: actions cut off, their inputs given back", count=len(left),
                    seconds=self.drain_seconds)  # fmt: skip
        for task in left:
            task.cancel()
        await asyncio.wait(list(left), timeout=2.0)  # their ``finally`` blocks release the instance leases
        await give_back(list(left.values()))

    async def _timed(self, msg: WorkMessage) -> None:
        """Every input's handling is timed (inputs are few, and their actions take seconds)."""
        started = time.perf_counter()
        await self._handle(msg)
        self._observe(time.perf_counter() - started)

    async def _handle(self, msg: WorkMessage) -> None:
        try:
            event = decode(msg.data)
        except MalformedEvent as exc:
            await self._dead_letter(msg, str(exc))
            return
        if msg.metadata.num_delivered == 1:  # each input once; a deferred one comes back
            kind = type(event)
            self._events_in[kind] = self._events_in.get(kind, 0) + 1
        try:
            if not await self.fold.caught_up(msg.metadata.sequence.stream, NOT_FOLDED_SECONDS):
                await msg.nak(delay=1.0)
                return
            delay = await self.handler(event, msg.in_progress)
            await (msg.nak(delay=delay) if delay is not None else self._ack(msg))
        except ClaimHeld as held:
            log.info("action claimed by a replica that stopped renewing; retrying when it runs out", reason=str(held))
            with contextlib.suppress(Exception):
                await msg.nak(delay=held.retry_in)
        except Exception as exc:  # a bug or an outage must not kill the worker: try later
            log.exception("recovery handler failed; will retry", error=str(exc))
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.retry_seconds)

    async def _ack(self, msg: WorkMessage) -> None:
        await msg.ack()
        self.counts.acked(msg.metadata.sequence.stream)

    async def _dead_letter(self, msg: WorkMessage, reason: str) -> None:
        """Parked on ``autoserve.deadletter.<service>`` as every consumer parks one (the
        runtime's headers, id and metrics), then acknowledged: never retried for ever."""
        self.counts.stats.dead_lettered += 1
        stored = publish_dead_letter(self.dead_letters, self.service, msg, reason)  # type: ignore[arg-type]
        if stored is not None:
            with contextlib.suppress(Exception):
                await stored
        await self._ack(msg)


async def give_back(msgs: list[WorkMessage]) -> None:
    """Negatively acknowledged: JetStream redelivers at once (bounded: NATS may be away)."""
    for msg in msgs:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(msg.nak(), 1.0)
