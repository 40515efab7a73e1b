"""Publishing events to JetStream without waiting on one round trip at a time.

``submit`` never blocks the caller: events go to a bounded buffer, a pump sends them as
JetStream publishes (up to ``max_in_flight`` unacknowledged), and an event whose ack fails
or does not come within ``ack_timeout`` goes back to the front of the buffer and is sent
again with the same ``Nats-Msg-Id``, so JetStream stores it once. While NATS is away the
buffer holds up to ``max_buffered`` events; past that the oldest are dropped and counted,
because a fresh probe result is worth more than a stale one, and a prober must keep
probing rather than stall.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import deque
from dataclasses import dataclass

import structlog
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, OutboundBufferLimitError
from nats.js import JetStreamContext

from autoserve_events import Event, encode, headers_for, subject_for

from .tasks import cancel_all

log = structlog.get_logger("autoserve.publisher")


@dataclass(slots=True)
class _Pending:
    subject: str
    payload: bytes
    headers: dict[str, str]
    # Resolved True once stored, False if rejected or dropped; None when nobody waits.
    done: asyncio.Future[bool] | None = None

    def resolve(self, stored: bool) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(stored)


@dataclass(slots=True)
class PublisherStats:
    submitted: int = 0
    acked: int = 0
    retried: int = 0
    dropped: int = 0
    rejected: int = 0


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
        self._max_in_flight = max_in_flight
        self._max_buffered = max_buffered
        self._ack_timeout = ack_timeout
        self._buffer: deque[_Pending] = deque()
        self._in_flight: dict[str, tuple[_Pending, float]] = {}  # reply token -> (event, sent at)
        self._reply_prefix_len = 0
        self._slots = asyncio.Semaphore(max_in_flight)
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._retry_at = 0.0
        self.stats = PublisherStats()

    def start(self) -> EventPublisher:
        self._tasks = [asyncio.create_task(self._pump()), asyncio.create_task(self._expire())]
        return self

    async def close(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` for everything submitted to be acked, then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drained(), timeout)
        await cancel_all(self._tasks)

    async def drained(self) -> None:
        await self._idle.wait()

    @property
    def pending(self) -> int:
        return len(self._buffer) + len(self._in_flight)

    def submit(self, event: Event, *, track: bool = False) -> asyncio.Future[bool] | None:
        """Queue ``event``; with ``track``, a future that resolves once JetStream stored it."""
        return self.submit_raw(subject_for(event), encode(event), headers_for(event), track=track)

    def submit_raw(
        self, subject: str, payload: bytes, headers: dict[str, str], *, track: bool = False
    ) -> asyncio.Future[bool] | None:
        done = asyncio.get_running_loop().create_future() if track else None
        self.stats.submitted += 1
        self._buffer.append(_Pending(subject, payload, headers, done))
        self._bound_and_wake()
        return done

    def _retry(self, item: _Pending) -> None:
        self.stats.retried += 1
        self._buffer.appendleft(item)
        self._bound_and_wake()

    def _bound_and_wake(self) -> None:
        if len(self._buffer) > self._max_buffered:
            self._buffer.popleft().resolve(False)
            self.stats.dropped += 1
            if self.stats.dropped % 1000 == 1:
                log.warning("publish buffer full, dropping oldest", dropped=self.stats.dropped)
        self._idle.clear()
        self._wakeup.set()

    async def _pump(self) -> None:
        nc = self._js._nc
        # Acks come back on one wildcard subscription, matched by a counter token: cheaper
        # than js.publish_async (a future, two callbacks, json.loads and a PubAck each).
        prefix = nc.new_inbox() + "."
        self._reply_prefix_len = len(prefix)
        await nc.subscribe(prefix + "*", cb=self._on_ack)
        tokens = itertools.count()
        backoff = 0.05
        while True:
            if not self._buffer:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if (pause := self._retry_at - time.monotonic()) > 0:
                await asyncio.sleep(pause)
            await self._slots.acquire()
            if not self._buffer:
                self._slots.release()
                continue
            item = self._buffer.popleft()
            token = f"{next(tokens):x}"
            self._in_flight[token] = (item, time.monotonic())
            try:
                await nc.publish(item.subject, item.payload, reply=prefix + token, headers=item.headers)
            except (ConnectionClosedError, OutboundBufferLimitError, OSError) as exc:
                del self._in_flight[token]
                self._slots.release()
                self._retry(item)
                log.debug("publish deferred", error=type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05

    async def _on_ack(self, msg: Msg) -> None:
        entry = self._in_flight.pop(msg.subject[self._reply_prefix_len :], None)
        if entry is None:  # expired already, and sent again
            return
        item = entry[0]
        self._slots.release()
        data = msg.data
        no_stream = not data and msg.headers is not None and msg.headers.get("Status") == "503"
        error = json.loads(data).get("error") or {} if b'"error"' in data else None
        if no_stream or (error is not None and (error.get("code") or 0) >= 500):
            # No stream yet, or the server is busy: try again shortly, not in a hot loop.
            self._retry_at = time.monotonic() + 0.5
            self._retry(item)
        elif error is not None:
            self.stats.rejected += 1
            item.resolve(False)
            log.error("event rejected by JetStream", subject=item.subject, error=error.get("description", str(error)))
        else:
            self.stats.acked += 1
            item.resolve(True)
        if not self._buffer and not self._in_flight:
            self._idle.set()

    async def _expire(self) -> None:
        """Acks that never came (lost in a disconnect) are sent again, same Nats-Msg-Id."""
        while True:
            await asyncio.sleep(min(1.0, self._ack_timeout / 2))
            cutoff = time.monotonic() - self._ack_timeout
            for token, (item, sent_at) in list(self._in_flight.items()):
                if sent_at < cutoff and self._in_flight.pop(token, None) is not None:
                    self._slots.release()
                    self._retry(item)
