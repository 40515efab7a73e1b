"""The service host: what every service does around its core, written once.

A service declares a ``Plan``: the configuration keys it follows, the durable consumers
that feed its fold (and how much history each replays first), the RPC subjects it answers,
and how its publisher is sized. The host does the rest, in this order::

    connect ─ provision ─ join the members ─ publisher ─ open() ─ plan() ─ follow config
        ─ prepare() ─ replay + live + catch-up (each Consume) ─ RPCs ─ started() ─ ready
        ... SIGTERM ...
    leave the members (the others take over now) ─ drain: everything above is closed in
    reverse order of opening

Anything a service opens in its hooks it registers with ``host.closing(...)`` or starts
with ``host.spawn(...)``, so the one teardown closes it at the right moment: a consumer
stops before the writer it feeds, the writer before the publisher, the publisher before
the NATS connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from .admission import Admit
from .bus import connect
from .consumer import ConsumerSpec, EventConsumer, ProcessFn
from .lifecycle import close_nats
from .membership import Membership
from .observability import add_check, remove_check, watch_publisher
from .provisioning import provision
from .publisher import EventPublisher
from .tasks import cancel_all

log = structlog.get_logger("autoserve.host")

CLOSE_SECONDS = 10.0

Follower = Callable[[KeyValue, Callable[..., None]], Awaitable[None]]


@dataclass(frozen=True)
class Watch:
    """Follow a configuration key: ``follow(kv, on_change)`` runs for the service's life.
    With ``required``, start-up waits (up to the plan's ``config_wait``) for its first value."""

    bucket: str
    follow: Follower
    on_change: Callable[..., None]
    required: bool = True


@dataclass(frozen=True)
class Consume:
    """A durable consumer feeding ``fold``. ``replay_seconds`` (read once the configuration
    is in) folds that much history, up to the durable's ack floor, before going live;
    ``catch_up`` holds readiness until what was stored before the start is folded."""

    spec: ConsumerSpec
    fold: ProcessFn
    replay_seconds: Callable[[], float] | None = None
    admit: Admit | None = None
    catch_up: bool = False
    stop_timeout: float = 5.0


@dataclass(frozen=True)
class Rpc:
    subject: str
    handler: Callable[[Msg], Awaitable[None]]
    queue: str = ""  # replicas sharing a queue group answer each request once
    unbounded: bool = False  # a report stream must never be dropped by the client's buffer


@dataclass(frozen=True)
class Plan:
    watches: Sequence[Watch] = ()
    consumes: Sequence[Consume] = ()
    rpcs: Sequence[Rpc] = ()
    config_wait: float | None = 10.0  # None: wait for the required configuration for ever


class HostedService:
    """A service's composition root: its name, its plan and, where it needs them, hooks.
    ``run(stop)`` and ``ready`` are what ``lifecycle.serve`` and the tests drive."""

    name: str = "service"
    publisher_buffer: int | None = None  # events the publisher holds while NATS is away; None: its default
    member: str | None = None  # this process's member name; None: AUTOSERVE_MEMBER, else host-pid
    member_slots: int = 0  # members that need a durable of their own take one of this many slots

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.ready = asyncio.Event()
        self.publisher: EventPublisher | None = None
        self.consumers: list[EventConsumer] = []
        self.replayed: dict[str, int] = {}  # what start-up folded, by durable (logs, tests)
        self.membership: Membership | None = None

    @property
    def consumer(self) -> EventConsumer | None:
        """The first consumer (most services have one)."""
        return self.consumers[0] if self.consumers else None

    @property
    def client_name(self) -> str:
        return f"autoserve-{self.name}"

    def owns_what(self) -> str:
        """What this member owns, in words, for ``autoserve status`` ("112 targets")."""
        return ""

    def plan(self) -> Plan:
        """Read once, after ``open``: what it names may be built there."""
        return Plan()

    async def open(self, host: Host) -> None:
        """Before the configuration is followed: build what its callbacks use."""

    async def prepare(self, host: Host) -> None:
        """Once the configuration is in, before the consumers replay."""

    async def started(self, host: Host) -> None:
        """Consuming live and answering RPCs; ``ready`` is set right after."""

    def stopped(self) -> dict[str, Any]:
        """What the last log line says about the service's work."""
        return {}

    async def run(self, stop: asyncio.Event) -> None:
        await Host(self).run(stop)


class Host:
    def __init__(self, service: HostedService) -> None:
        self.service = service
        self.nc: Client | None = None
        self.stopping = asyncio.Event()  # set on SIGTERM, before anything is closed
        self._closers = contextlib.AsyncExitStack()
        self._stop = asyncio.Event()  # run's: set to stop the service

    @property
    def js(self) -> JetStreamContext:
        assert self.nc is not None
        return self.nc.jetstream()

    @property
    def publisher(self) -> EventPublisher:
        assert self.service.publisher is not None
        return self.service.publisher

    def closing(self, close: Callable[[], Awaitable[object]], timeout: float = CLOSE_SECONDS) -> None:
        """Run ``close`` at teardown, before anything opened earlier is closed. Each step is
        bounded: NATS may be going away at the same moment (``up`` stops everything at once),
        and a close against a dead server would wait for its own timeout."""
        self._closers.push_async_callback(_quietly, close, timeout)

    def spawn(self, work: Coroutine[Any, Any, object], name: str) -> asyncio.Task[object]:
        """A task that lives until teardown."""
        task = asyncio.create_task(work, name=name)
        self.closing(lambda: cancel_all([task]))
        return task

    async def run(self, stop: asyncio.Event) -> None:
        service, name = self.service, self.service.name
        self._stop = stop
        async with self._closers:
            try:
                if await self._started_before(stop):
                    log.info(f"{name} started", nats=service.nats_url, replayed=service.replayed)
                    await stop.wait()
                self.stopping.set()
                if service.membership is not None:
                    await service.membership.leave()
            finally:
                log.info(f"{name} stopping")
        log.info(f"{name} stopped", **service.stopped())

    async def _started_before(self, stop: asyncio.Event) -> bool:
        """Start, unless asked to stop first: a SIGTERM while NATS is unreachable or the
        configuration unread stops at once (nothing was taken that a drain would finish);
        what was opened so far is closed as usual."""
        starting = asyncio.ensure_future(self._start())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        await cancel_all([stopping])
        if starting.done():
            starting.result()  # a start that failed fails the service
            return True
        log.info("stopped while starting", service=self.service.name)
        await cancel_all([starting])
        return False

    async def _start(self) -> None:
        service = self.service
        self.nc = nc = await connect(service.nats_url, service.client_name)
        self.closing(lambda: _close_nats(nc))
        await provision(self.js, patience=None)  # a service waits out elections as long as they last
        service.membership = membership = Membership(
            self.js, service.name, service.member, describe=service.owns_what, slots=service.member_slots
        )
        membership.on_change.append(self._stop_if_slot_lost)
        await membership.start()
        self.closing(membership.stop)
        check = watch_membership(membership)
        self.closing(lambda: _unwatched(check))
        buffer = {} if service.publisher_buffer is None else {"max_buffered": service.publisher_buffer}
        service.publisher = EventPublisher(self.js, **buffer).start()
        check = watch_room(service.name, service.publisher)
        self.closing(lambda: _unwatched(check))
        self.closing(service.publisher.close)
        await service.open(self)
        plan = service.plan()
        await self._follow(plan)
        await service.prepare(self)
        for consume in plan.consumes:
            await self._consume(consume)
        for rpc in plan.rpcs:
            limit = {"pending_msgs_limit": -1} if rpc.unbounded else {}
            sub = await nc.subscribe(rpc.subject, queue=rpc.queue, cb=rpc.handler, **limit)
            self.closing(sub.unsubscribe)
        await nc.flush()
        await service.started(self)
        service.ready.set()

    def _stop_if_slot_lost(self) -> None:
        """A member whose slot (and durable) another member took while it was paused can
        do nothing useful: it stops, and its supervisor starts it again on a free slot."""
        membership = self.service.membership
        if membership is not None and membership.slot_lost and not self._stop.is_set():
            log.error("member slot lost: stopping so that it starts again on a free one", service=self.service.name)
            self._stop.set()

    async def _follow(self, plan: Plan) -> None:
        first_values = []
        for watch in plan.watches:
            loaded = asyncio.Event()
            if watch.required:
                first_values.append(loaded.wait())
            kv = await self.js.key_value(watch.bucket)
            self.spawn(watch.follow(kv, _and_set(watch.on_change, loaded)), f"follow-{watch.bucket}")
        if not first_values:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*first_values), plan.config_wait)
        except TimeoutError:
            log.warning("configuration not read in time; starting with what is known", seconds=plan.config_wait)

    async def _consume(self, consume: Consume) -> None:
        service = self.service
        assert service.publisher is not None
        spec = consume.spec
        consumer = EventConsumer(self.js, service.publisher, spec, service.name, consume.fold, admit=consume.admit)
        service.consumers.append(consumer)
        if consume.replay_seconds is not None:
            started, floor = time.monotonic(), await consumer.ack_floor()
            since = time.time() - consume.replay_seconds()
            replayed = service.replayed[spec.durable] = await consumer.replay(since, floor, spec.filter_subject)
            log.info("state rebuilt", durable=spec.durable, replayed=replayed, up_to_seq=floor,
                     seconds=round(time.monotonic() - started, 3))  # fmt: skip
        await consumer.start()
        self.closing(lambda: consumer.stop(timeout=consume.stop_timeout), consume.stop_timeout + CLOSE_SECONDS)
        if consume.catch_up and not await consumer.caught_up():
            log.warning("backlog not folded in time; continuing", durable=spec.durable)


def watch_room(service: str, publisher: EventPublisher) -> str:
    """Export ``publisher``'s counts, and make ``/readyz`` false, with the reason, while it is
    full (its input waits for room); the check's name."""
    watch_publisher(service, publisher)
    name = f"publisher {service} has room"
    add_check(name, lambda: not publisher.full, publisher.why_full)
    return name


def watch_membership(membership: Membership) -> str:
    """``/readyz`` is false, with the reason, while this member's lease may have lapsed
    (it owns nothing then: paused, or cut off from NATS)."""
    name = f"{membership.service} member {membership.member} holds its lease"

    add_check(name, lambda: not membership.fenced, membership.why_fenced)
    return name


async def _unwatched(check: str) -> None:
    remove_check(check)


def _and_set(on_change: Callable[..., None], loaded: asyncio.Event) -> Callable[..., None]:
    def on_change_and_set(*args: Any) -> None:
        on_change(*args)
        loaded.set()

    return on_change_and_set


async def _close_nats(nc: Client, timeout: float = 5.0) -> None:
    """Drain what is pending; a server that is gone gets a plain close instead."""
    try:
        await asyncio.wait_for(close_nats(nc), timeout)
    except TimeoutError:
        await nc.close()


async def _quietly(close: Callable[[], Awaitable[object]], timeout: float) -> None:
    """One resource failing to close, or taking too long, must not keep the others open."""
    try:
        await asyncio.wait_for(close(), timeout)
    except TimeoutError:
        log.warning("closing timed out; closing the rest", what=getattr(close, "__qualname__", repr(close)))
    except Exception:
        log.exception("closing failed; closing the rest")
