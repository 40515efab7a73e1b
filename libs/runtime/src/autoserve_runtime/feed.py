"""Reading a stream in order from a start time, through nats-server restarts.

nats-py's ordered consumer, once its ephemeral consumer is gone (a restarted server keeps
no memory-stored consumer), re-creates it ``BY_START_SEQUENCE`` but keeps the first
config's ``opt_start_time``, and the server refuses that pair (err 10094) for ever: a feed
started from a time stops after the first restart, silently. So the start time is turned
into a stream sequence first (``start_sequence``) and every ordered consumer here starts
from a sequence, which the client's own reset can repeat.

``Feed`` is that subscription for a service: it also delivers each stream sequence once
and in order across re-subscriptions, re-subscribes by itself when its consumer is gone,
and says so on ``/readyz`` and in ``/metrics`` while it cannot read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from . import observability
from .tasks import cancel_all

log = structlog.get_logger("autoserve.feed")

OnMessage = Callable[[Msg], Awaitable[None]]
_FEEDS: weakref.WeakSet[Feed] = weakref.WeakSet()
observability.add_counter(
    "feed_breaks", "Times a feed was found unable to read (its consumer lost, JetStream away)",
    lambda: {(feed.name,): feed.breaks for feed in list(_FEEDS)}, ("feed",),
)  # fmt: skip


async def start_sequence(js: JetStreamContext, stream: str, since: float) -> int:
    """The sequence of the first message in ``stream`` stored at or after wall time ``since``
    (the next one to be stored if none is). The server answers that for a consumer created
    ``BY_START_TIME``: its info says it has delivered up to the sequence before. The probe
    consumer takes no message and the server deletes it once idle, so no delete right is
    needed."""
    probe = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=datetime.fromtimestamp(max(since, 0.0), UTC).isoformat(),
        ack_policy=AckPolicy.NONE,
        inactive_threshold=2.0,
        mem_storage=True,
        num_replicas=1,
    )
    info = await js.add_consumer(stream, probe)
    return info.delivered.stream_seq + 1


def position(msg: Msg) -> tuple[int, int]:
    """A JetStream delivery's stream sequence and the messages still pending after it, read
    straight off its reply subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>``):
    nats-py's full ``Msg.metadata`` parse costs more than the rest of our bookkeeping."""
    tokens = msg.reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[8])
    meta = msg.metadata  # the longer form, with a domain and an account hash
    return meta.sequence.stream, meta.num_pending


def sequences(msg: Msg) -> tuple[int, int]:
    """A JetStream delivery's stream sequence and its consumer (delivery) sequence, which
    counts every delivery of the consumer, redeliveries included, with no gaps."""
    tokens = msg.reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[6])
    meta = msg.metadata
    return meta.sequence.stream, meta.sequence.consumer


async def subscribe_from(
    js: JetStreamContext,
    stream: str,
    subjects: list[str],
    cb: OnMessage,
    *,
    since: float | None = None,
    start_seq: int | None = None,
) -> JetStreamContext.PushSubscription:
    """An ordered push subscription to ``subjects`` from ``start_seq``, from wall time
    ``since``, or from the beginning."""
    if start_seq is None and since is not None:
        start_seq = await start_sequence(js, stream, since)
    config = ConsumerConfig(filter_subjects=subjects) if len(subjects) > 1 else ConsumerConfig()
    if start_seq is not None:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = max(start_seq, 1)
    return await js.subscribe(
        subjects[0], stream=stream, cb=cb, ordered_consumer=True, config=config, pending_msgs_limit=-1
    )


async def read_window(
    js: JetStreamContext,
    stream: str,
    subject: str,
    since: float,
    until_seq: int,
    on_message: Callable[[int, Msg], bool],
    idle_timeout: float = 5.0,
) -> bool:
    """Hand ``on_message(seq, msg)`` every message on ``subject`` from wall time ``since``
    up to stream sequence ``until_seq``, in order; it returns False to stop early. True if
    the read got there (or to the stream's end); False if it was stopped, or nothing came
    for ``idle_timeout`` (JetStream away). The replays of a start-up or a takeover: the
    caller folds in the delivery callback (a ``next_msg`` per message, a timer and a future
    each, measured at half the speed)."""
    if until_seq <= 0:
        return True
    done = asyncio.Event()
    last_delivery = time.monotonic()
    reached = False

    async def deliver(msg: Msg) -> None:
        nonlocal last_delivery, reached
        last_delivery = time.monotonic()
        if done.is_set():
            return
        seq, pending = position(msg)
        if seq > until_seq:
            reached = True
        elif not on_message(seq, msg):
            pass
        elif seq >= until_seq or pending == 0:
            reached = True
        else:
            return
        done.set()

    sub = await subscribe_from(js, stream, [subject], deliver, since=since)
    try:
        info = await sub.consumer_info()
        if info.num_pending == 0 and not info.delivered.consumer_seq:
            return True  # nothing stored in range: do not wait for a message that won't come
        while not done.is_set() and time.monotonic() - last_delivery < idle_timeout:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)
    finally:
        await sub.unsubscribe()
    return reached


class Feed:
    """An ordered read of ``subjects`` in ``stream`` that a service lives on: each stream
    sequence reaches ``on_message`` once and in order, the consumer is re-created from the
    last sequence taken when the server lost it, and ``/readyz`` is false (named
    ``feed <name>``, with the reason) while the feed cannot read."""

    def __init__(
        self,
        js: JetStreamContext,
        name: str,
        stream: str,
        subjects: list[str],
        on_message: OnMessage,
        *,
        check_seconds: float = 1.0,
    ) -> None:
        self.name = name
        self._js = js
        self._stream = stream
        self._subjects = subjects
        self._on_message = on_message
        self._check_seconds = check_seconds
        self._sub: JetStreamContext.PushSubscription | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._advanced = asyncio.Event()
        self._order = asyncio.Lock()
        self.last_seq = 0  # the last stream sequence handed to on_message
        self.problem: str | None = None
        self.breaks = 0  # times the feed was found broken
        self.resubscribed = 0
        me = weakref.ref(self)  # the check must not keep a stopped feed alive
        observability.add_check(
            f"feed {name}", lambda: (f := me()) is None or f.problem is None, reason=lambda: (f := me()) and f.problem
        )
        _FEEDS.add(self)

    async def start(self, *, since: float | None = None, start_seq: int | None = None) -> Feed:
        self._sub = await subscribe_from(
            self._js, self._stream, self._subjects, self._deliver, since=since, start_seq=start_seq
        )
        self._watcher = asyncio.create_task(self._watch(), name=f"feed:{self.name}")
        return self

    async def stop(self) -> None:
        observability.remove_check(f"feed {self.name}")
        if self._watcher is not None:
            await cancel_all([self._watcher])
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._sub.unsubscribe(), 2)

    async def caught_up(self, timeout: float) -> bool:
        """Wait until everything the feed's consumer had pending has reached ``on_message``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(NotFoundError, nats.errors.Error, TimeoutError):
                info = await self._sub.consumer_info()  # type: ignore[union-attr]
                # Nothing delivered yet: its delivered stream sequence is the one before its start.
                delivered = info.delivered.stream_seq if info.delivered.consumer_seq else 0
                if info.num_pending == 0 and self.last_seq >= delivered:
                    return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._advanced.wait(), max(min(0.2, deadline - time.monotonic()), 0.0))
        return False

    async def _deliver(self, msg: Msg) -> None:
        seq = position(msg)[0]
        async with self._order:  # while re-subscribing, two subscriptions may deliver
            if seq <= self.last_seq:
                return  # a re-subscription overlapped what was already taken
            try:
                await self._on_message(msg)
            except Exception:  # a bug in one input must not stop the feed (nats-py would only tell error_cb)
                log.exception("feed input failed; skipped", feed=self.name, seq=seq)
            self.last_seq = seq
        self._advanced.set()
        self._advanced = asyncio.Event()

    async def _watch(self) -> None:
        missing = 0
        while True:
            await asyncio.sleep(self._check_seconds)
            try:
                await asyncio.wait_for(self._sub.consumer_info(), 2.0)  # type: ignore[union-attr]
            except NotFoundError:
                # Gone: a restarted server, or the client's own re-creation was refused.
                # Twice in a row, so a re-creation under way is not raced.
                missing += 1
                if missing >= 2:
                    self._broken(f"consumer lost; re-subscribing from stream sequence {self.last_seq + 1}")
                    await self._resubscribe()
                continue
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                self._broken(f"cannot reach JetStream: {type(exc).__name__}: {exc}".rstrip(": "))
                continue
            missing = 0
            if self.problem is not None:
                log.info("feed reading again", feed=self.name, seq=self.last_seq)
                self.problem = None

    def _broken(self, problem: str) -> None:
        if self.problem is None:
            self.breaks += 1
            log.warning("feed broken", feed=self.name, problem=problem)
        self.problem = problem

    async def _resubscribe(self) -> None:
        old = self._sub
        try:
            self._sub = await subscribe_from(
                self._js, self._stream, self._subjects, self._deliver, start_seq=self.last_seq + 1
            )
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            self._broken(f"cannot re-subscribe: {type(exc).__name__}: {exc}")
            return
        self.resubscribed += 1
        if old is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.unsubscribe(), 2)
