"""Publishing events to JetStream without waiting on one round trip at a time.

``submit`` is cheap and synchronous: events go to a queue (``publish_queue``: its rules are
pure), a pump sends them as JetStream publishes (up to ``max_in_flight`` unacknowledged),
and acks come back on one wildcard inbox. An event is resolved as stored only when its ack
is a PubAck; one whose ack fails with a transient error (a stream electing its leader
answers 503 "no responders"), or does not come within ``ack_timeout``, or was in flight
when the connection broke, is sent again with the same ``Nats-Msg-Id``, so JetStream
stores it once (its duplicate window, ``autoserve_events.streams``, is 120 s). After a
failure the pump sends one publish at a time with a bounded backoff until one is stored.

Nothing is ever dropped. While JetStream does not acknowledge, the queue grows; past
``max_buffered`` events the publisher is *full*: ``submit`` still takes what it is given,
but whatever takes input (the event consumers, the prober's probe loop) awaits ``room()``
before taking more, so the input waits where it is (a durable consumer's unacknowledged
messages stay in JetStream). ``/readyz`` says so while it lasts (``host``), and one log
line marks each stall and one its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import structlog
from nats.aio.msg import Msg
from nats.errors import BadSubjectError, MaxPayloadError
from nats.js import JetStreamContext

from autoserve_events import Event, encode, headers_for, subject_for

from .publish_queue import Answer, PublisherStats, PublishQueue, classify
from .tasks import cancel_all

__all__ = ["EventPublisher", "PublisherStats"]

log = structlog.get_logger("autoserve.publisher")

EXPIRE_EVERY = 0.25  # how often unanswered publishes and reconnects are looked for
STALL_LOG_SECONDS = 10.0  # a steady overload fills and drains often: one warning per this


@dataclass(slots=True)
class _Pending:
    subject: str
    payload: bytes
    headers: dict[str, str]
    # Resolved True once stored, False if rejected; None when nobody waits.
    done: asyncio.Future[bool] | None = None

    def resolve(self, stored: bool) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(stored)


class EventPublisher:
    def __init__(
        self,
        js: JetStreamContext,
        *,
        max_in_flight: int = 512,
        max_buffered: int = 50_000,
        ack_timeout: float = 5.0,
    ) -> None:
        self._js = js
        self._ack_timeout = ack_timeout
        self._queue: PublishQueue[_Pending] = PublishQueue(limit=max_buffered, window=max_in_flight)
        self._reply_prefix_len = 0
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._room = asyncio.Event()
        self._room.set()
        self._stall_logged_at: float | None = None
        self._stall_logged = False  # this stall's start was logged: log its end too
        self._tasks: list[asyncio.Task[None]] = []
        self._broken: str | None = None  # a task of ours ended with an error
        self.stats = self._queue.stats

    def start(self) -> EventPublisher:
        self._tasks = [asyncio.create_task(self._pump()), asyncio.create_task(self._expire())]
        for task in self._tasks:
            task.add_done_callback(self._ended)
        return self

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A task that ends before ``close`` stops publishing for good: say so, and hold
        input (``full``) so that nothing is taken that cannot be stored; /readyz turns false."""
        if task.cancelled() or (error := task.exception()) is None:
            return
        self._broken = f"publisher task {task.get_coro().__qualname__} ended: {type(error).__name__}: {error}"
        self._room.clear()
        log.error("publisher stopped; input held", error=self._broken)

    async def close(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` for everything submitted to be acked, then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drained(), timeout)
        await cancel_all(self._tasks)

    async def drained(self) -> None:
        await self._idle.wait()

    @property
    def pending(self) -> int:
        return self._queue.pending

    @property
    def full(self) -> bool:
        """More than ``max_buffered`` events wait to be stored (or publishing broke): take no
        more input."""
        return self._queue.full or self._broken is not None

    async def room(self) -> None:
        """Return once the publisher takes more input: at once unless it is full."""
        while self.full:
            await self._room.wait()

    def why_full(self) -> str | None:
        """What ``/readyz`` says while input waits for room."""
        queue = self._queue
        if self._broken is not None:
            return self._broken
        if not queue.full:
            return None
        return (
            f"{queue.pending} events not yet stored by JetStream (limit {queue.limit}): input paused "
            f"for {queue.stalled_for(time.monotonic()):.1f} s, until they are down to {queue.resume_at}"
        )

    def submit(self, event: Event, *, track: bool = False) -> asyncio.Future[bool] | None:
        """Queue ``event``; with ``track``, a future that resolves once JetStream stored it."""
        return self.submit_raw(subject_for(event), encode(event), headers_for(event), track=track)

    def submit_raw(
        self, subject: str, payload: bytes, headers: dict[str, str], *, track: bool = False
    ) -> asyncio.Future[bool] | None:
        done = asyncio.get_running_loop().create_future() if track else None
        if self._queue.add(_Pending(subject, payload, headers, done), time.monotonic()):
            self._stalled()
        self._idle.clear()
        self._wakeup.set()
        return done

    def _stalled(self) -> None:
        self._room.clear()
        now = time.monotonic()
        if self._stall_logged_at is None or now - self._stall_logged_at >= STALL_LOG_SECONDS:
            self._stall_logged_at, self._stall_logged = now, True
            log.warning("publisher full: input paused until JetStream stores what waits",
                        pending=self._queue.pending, limit=self._queue.limit, stalls=self.stats.stalls)  # fmt: skip

    def _settled(self, now: float) -> None:
        queue = self._queue
        if queue.full and (waited := queue.reopen(now)) is not None and self._broken is None:
            self._room.set()
            if self._stall_logged:
                self._stall_logged = False
                log.info("publisher has room: input resumes", paused_seconds=round(waited, 3), stalls=self.stats.stalls)
        if not queue.pending:
            self._idle.set()
        self._wakeup.set()

    async def _pump(self) -> None:
        nc = self._js._nc
        # Acks come back on one wildcard subscription, matched by a counter token: cheaper
        # than js.publish_async (a future, two callbacks, json.loads and a PubAck each).
        prefix = nc.new_inbox() + "."
        self._reply_prefix_len = len(prefix)
        await nc.subscribe(prefix + "*", cb=self._on_ack)
        queue = self._queue
        while True:
            wait = queue.ready(time.monotonic())
            if wait is None:
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            key, item = queue.take(time.monotonic())
            try:
                await nc.publish(item.subject, item.payload, reply=f"{prefix}{key:x}", headers=item.headers)
            except (MaxPayloadError, BadSubjectError) as exc:  # no server will ever take it
                if queue.rejected(key) is not None:
                    item.resolve(False)
                log.error("event rejected by the client", subject=item.subject, error=type(exc).__name__)
                self._settled(time.monotonic())
            except Exception as exc:  # disconnected, draining, buffer full: the pump must live on
                queue.failed(key, time.monotonic())
                log.debug("publish deferred", error=type(exc).__name__)

    async def _on_ack(self, msg: Msg) -> None:
        try:
            key = int(msg.subject[self._reply_prefix_len :], 16)
        except ValueError:
            return
        answer, why = classify(msg.data, msg.headers.get("Status") if msg.headers else None)
        now = time.monotonic()
        if answer is Answer.STORED:
            if (item := self._queue.stored(key)) is not None:
                item.resolve(True)
        elif answer is Answer.RETRY:
            if self._queue.failed(key, now):
                log.debug("publish to be sent again", why=why)
        elif (item := self._queue.rejected(key)) is not None:
            item.resolve(False)
            log.error("event rejected by JetStream", subject=item.subject, error=why)
        self._settled(now)

    async def _expire(self) -> None:
        """Acks that never came (lost with a node, or in a disconnect) are sent again, with
        the same Nats-Msg-Id: after ``ack_timeout``, or at once after a reconnect (a
        publish in flight then may have gone down with the node)."""
        nc = self._js._nc
        reconnects = nc.stats.get("reconnects", 0)
        while True:
            await asyncio.sleep(EXPIRE_EVERY)
            now = time.monotonic()
            if (seen := nc.stats.get("reconnects", 0)) != reconnects:
                reconnects = seen
                if again := self._queue.expire(now, now, failure=False):
                    log.info("reconnected: sending again what was in flight", count=again)
            else:
                again = self._queue.expire(now, now - self._ack_timeout)
            if again:
                self._wakeup.set()
