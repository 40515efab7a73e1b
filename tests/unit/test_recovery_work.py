"""The work feed and the state fold it waits on, with in-memory fakes of the pull
subscription, the messages, the dead-letter publisher and the handler (the decide step).
In the manner of kubelet's worker_test.go: a sequence of inputs, and for each what the
feed did with it (acknowledged, given back with a delay, dead-lettered)."""

from __future__ import annotations

import asyncio

import pytest

from autoserve_events import Event, HealthChanged
from autoserve_recovery.core import RecoveryState
from autoserve_recovery.feeds import StateFold
from autoserve_recovery.ports import ClaimHeld, KeepAlive
from autoserve_recovery.work import WorkFeed
from autoserve_runtime import EVENTS_IN

from ..support.waiting import wait_for
from .recovery_fakes import FakeCounts, FakeDeadLetters, FakeFold, FakeMsg, FakeSource, failure, health

ACK = ("ack", None)


class Handler:
    """The decide step, scripted: per event id, a delay to give the input back with, an
    exception to raise, or seconds to take; else done at once."""

    def __init__(self, script: dict[str, object] | None = None) -> None:
        self.script = script or {}
        self.seen: list[str] = []
        self.running = 0
        self.most_at_once = 0
        self.finished: list[str] = []

    async def __call__(self, event: Event, keep_alive: KeepAlive) -> float | None:
        self.seen.append(event.event_id)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            step = self.script.get(event.event_id)
            if isinstance(step, BaseException):
                raise step
            if isinstance(step, tuple):  # ("takes", seconds)
                await keep_alive()
                await asyncio.sleep(step[1])
                return None
            return step  # type: ignore[return-value]
        finally:
            self.running -= 1
            self.finished.append(event.event_id)


class Feed:
    """A work feed over fakes, fetching until stopped."""

    def __init__(self, handler: Handler, fold: FakeFold | StateFold | None = None, **options: float) -> None:
        self.source = FakeSource()
        self.counts = FakeCounts()
        self.letters = FakeDeadLetters()
        self.handler = handler
        self.stop = asyncio.Event()
        settings = {"concurrency": 64, "drain_seconds": 1.0, "retry_seconds": 15.0} | options
        self.feed = WorkFeed("recovery", handler, fold or FakeFold(), self.counts, self.letters,
                             concurrency=int(settings["concurrency"]), drain_seconds=settings["drain_seconds"],
                             retry_seconds=settings["retry_seconds"])  # fmt: skip

    async def run(self, *msgs: FakeMsg) -> list[list[tuple[str, float | None]]]:
        """Hand ``msgs`` over one fetch each, wait until each was answered: the replies."""
        self.feed.start(self.source, self.stop)
        for msg in msgs:
            self.source.put(msg)
        await wait_for(lambda: all(m.replies and m.replies[-1][0] in ("ack", "nak") for m in msgs))
        return [m.replies for m in msgs]

    async def drain(self) -> None:
        self.stop.set()
        await self.feed.drain()


async def test_each_input_is_acknowledged_or_given_back_as_the_handler_says() -> None:
    """A sequence: done, deferred by backoff (nak with that delay), done."""
    first, deferred, third = failure(), failure(), health("web-1", True)
    feed = Feed(Handler({deferred.event_id: 12.5}))
    replies = await feed.run(FakeMsg.of(first, 1), FakeMsg.of(deferred, 2), FakeMsg.of(third, 3))
    await feed.drain()
    assert replies == [[ACK], [("nak", 12.5)], [ACK]]
    assert feed.handler.seen == [first.event_id, deferred.event_id, third.event_id]
    assert (feed.counts.stats.received, feed.counts.stats.acked_seq) == (3, 3)


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"not json", "not an event"), (b'{"type": "Nope", "schema_version": 1}', "unknown event type 'Nope'")],
)
async def test_a_malformed_input_is_dead_lettered_through_the_runtime_and_acknowledged(
    data: bytes, reason: str
) -> None:
    feed = Feed(Handler())
    (replies,) = await feed.run(FakeMsg.of(data, 7))
    await feed.drain()
    assert replies == [ACK]
    assert feed.handler.seen == []
    ((subject, payload, headers),) = feed.letters.letters
    assert (subject, payload) == ("autoserve.deadletter.recovery", data)
    # The runtime's dead_letter_headers: the id names the service, the reason is kept.
    assert headers["Nats-Msg-Id"] == "dl-recovery-AUTOSERVE_EVENTS-7"
    assert reason in headers["Autoserve-Reason"]
    assert (headers["Autoserve-Stream-Seq"], feed.counts.stats.dead_lettered, feed.counts.stats.acked_seq) == (
        "7", 1, 7)  # fmt: skip


async def test_an_input_the_fold_has_not_reached_is_given_back_undecided() -> None:
    fold = FakeFold()
    fold.folded_up_to = 4
    feed = Feed(Handler(), fold)
    early, later = failure(), failure()
    replies = await feed.run(FakeMsg.of(early, 4), FakeMsg.of(later, 5))
    await feed.drain()
    assert replies == [[ACK], [("nak", 1.0)]]
    assert feed.handler.seen == [early.event_id]


async def test_handler_errors_give_the_input_back_and_the_feed_goes_on() -> None:
    """A claim another replica still holds: back when it runs out. A bug or an outage: back
    after the lease. Neither stops the feed: the next input is handled."""
    held, broken, fine = failure(), failure(), failure()
    claim = ClaimHeld("f.x.restart_container", "r2", asyncio.get_running_loop().time() + 1e9)
    feed = Feed(Handler({held.event_id: claim, broken.event_id: RuntimeError("bug")}), retry_seconds=15.0)
    replies = await feed.run(FakeMsg.of(held, 1), FakeMsg.of(broken, 2), FakeMsg.of(fine, 3))
    await feed.drain()
    assert replies[0] == [("nak", claim.retry_in)] and replies[1:] == [[("nak", 15.0)], [ACK]]


async def test_inputs_are_counted_by_type_on_their_first_delivery_only() -> None:
    counted = EVENTS_IN.child("recovery")
    before = counted.get(HealthChanged, 0)
    change = health("web-1", False)
    feed = Feed(Handler())
    await feed.run(FakeMsg.of(change, 1), FakeMsg.of(change, 1, delivered=2))  # deferred, back again
    await feed.drain()
    assert counted.get(HealthChanged, 0) == before + 1
    assert feed.counts.stats.received == 2


async def test_at_most_concurrency_inputs_are_handled_at_once() -> None:
    events = [failure() for _ in range(6)]
    handler = Handler({e.event_id: ("takes", 0.05) for e in events})
    feed = Feed(handler, concurrency=2)
    replies = await feed.run(*(FakeMsg.of(e, n) for n, e in enumerate(events, 1)))
    await feed.drain()
    assert handler.most_at_once == 2
    assert all(r == [("in_progress", None), ACK] for r in replies)


async def test_drain_lets_actions_finish_in_time_and_gives_back_the_rest() -> None:
    """SIGTERM: a short action finishes and is acknowledged; one that outlasts the drain is
    cut off (its own cleanup runs) and its input given back at once (a nak, no delay)."""
    short, long = failure(), failure()
    handler = Handler({short.event_id: ("takes", 0.05), long.event_id: ("takes", 30)})
    feed = Feed(handler, drain_seconds=0.3)
    feed.feed.start(feed.source, feed.stop)
    short_msg, long_msg = FakeMsg.of(short, 1), FakeMsg.of(long, 2)
    feed.source.put(short_msg, long_msg)
    await wait_for(lambda: feed.feed.in_flight == 2)
    await feed.drain()
    assert short_msg.replies == [("in_progress", None), ACK]
    assert long_msg.replies == [("in_progress", None), ("nak", None)]
    assert set(handler.finished) == {short.event_id, long.event_id}  # the cut-off one's finally ran
    assert feed.feed.in_flight == 0


async def test_an_input_fetched_as_the_drain_begins_is_given_back_unhandled() -> None:
    feed = Feed(Handler())
    msg = FakeMsg.of(failure(), 1)
    feed.feed.start(StopDuringFetch(msg, feed.stop), feed.stop)
    await feed.feed.drain()
    assert msg.replies == [("nak", None)] and feed.handler.seen == []


class StopDuringFetch:
    """A source whose one fetch returns as the stop comes."""

    def __init__(self, msg: FakeMsg, stop: asyncio.Event) -> None:
        self.msg, self.stop = msg, stop

    async def fetch(self, batch: int = 1, timeout: float | None = 5) -> list[FakeMsg]:
        self.stop.set()
        return [self.msg]


# -- the state fold the feed waits on ------------------------------------------------------


async def test_the_fold_wakes_who_waits_for_a_sequence_or_a_healthy_instance() -> None:
    fold = StateFold(RecoveryState())
    reached = asyncio.create_task(fold.caught_up(3, timeout=5))
    healthy = asyncio.create_task(fold.await_healthy("web", "web-1", timeout=5))
    fold.fold(1, b"garbage")  # a malformed event still moves the fold on
    fold.fold(2, FakeMsg.of(health("web-1", False), 2).data)
    await asyncio.sleep(0.01)
    assert not reached.done() and not healthy.done()
    fold.fold(3, FakeMsg.of(health("web-1", True), 3).data)
    assert await reached and await healthy
    assert fold.seq == 3 and fold.state.health["web"]["web-1"] is True
    assert not await fold.caught_up(4, timeout=0.01)


async def test_the_fold_tells_of_health_changes_only_once_live() -> None:
    told: list[bool] = []
    fold = StateFold(RecoveryState(), on_health=lambda change: told.append(change.healthy))
    fold.fold(1, FakeMsg.of(health("web-1", False), 1).data)  # replayed: answered the first time
    fold.live = True
    fold.fold(2, FakeMsg.of(health("web-1", True), 2).data)
    assert told == [True]


async def test_the_feed_waits_for_the_real_fold_then_decides() -> None:
    """The work feed and the state fold together: an input is decided once the fold has it."""
    fold = StateFold(RecoveryState())
    feed = Feed(Handler(), fold)
    msg = FakeMsg.of(failure(), 2)
    feed.feed.start(feed.source, feed.stop)
    feed.source.put(msg)
    await asyncio.sleep(0.05)
    assert msg.replies == [] and feed.handler.seen == []  # waiting for the fold
    fold.fold(2, msg.data)
    await wait_for(lambda: msg.replies == [ACK])
    await feed.drain()
