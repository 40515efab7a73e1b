"""The two feeds every replica reads from AUTOSERVE_EVENTS.

- **state**: an ordered push consumer over every event (the fold takes health, failure and
  recovery events), from ``history_seconds`` ago: every replica folds everything, so
  budgets and backoff are the same on each and survive restarts (replay is the fold
  again). ``StateFold`` is its consumer; the other parts wait on it.
- **work**: one durable pull consumer shared by all replicas (``autoserve-recovery``):
  JetStream hands each ``FailureDetected`` and ``HealthChanged`` to one replica; one that
  is not acknowledged within ``ack_wait`` (the replica crashed) goes to another. Its
  consumer is ``work.WorkFeed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from autoserve_events import EVENTS_STREAM, HealthChanged, MalformedEvent, decode
from autoserve_events.durables import RECOVERY_WORK
from autoserve_runtime import Feed
from autoserve_runtime.consumer import create_durable

from .core import RecoveryState

WORK_DURABLE = RECOVERY_WORK.name


def state_feed(js: JetStreamContext, on_message: Callable[[Msg], Awaitable[None]]) -> Feed:
    return Feed(js, "recovery-state", EVENTS_STREAM, ["autoserve.event.>"], on_message)


async def work_subscription(js: JetStreamContext, ack_wait: float) -> JetStreamContext.PullSubscription:
    await create_durable(js, RECOVERY_WORK, pull_ack_wait=ack_wait)
    return await js.pull_subscribe_bind(WORK_DURABLE, stream=EVENTS_STREAM)


class StateFold:
    """The state feed's consumer: each event folded into ``state`` in stream order. The
    work feed waits here until the fold has reached an input (it is decided on what came
    before it), a replacement until its copy is healthy. ``on_health`` sees each health
    change once ``live`` (the replayed ones were answered the first time)."""

    def __init__(self, state: RecoveryState, on_health: Callable[[HealthChanged], None] | None = None) -> None:
        self.state = state
        self.seq = 0  # the highest stream sequence folded
        self.live = False
        self.on_health = on_health
        self._advanced = asyncio.Event()
        self._healthy: dict[tuple[str, str], list[asyncio.Future[None]]] = defaultdict(list)

    async def on_message(self, msg: Msg) -> None:
        self.fold(msg.metadata.sequence.stream, msg.data)

    def fold(self, seq: int, data: bytes) -> None:
        try:
            event = decode(data)
        except MalformedEvent:
            event = None  # the work feed dead-letters it
        if event is not None:
            self.state.apply(event)
            if isinstance(event, HealthChanged):
                self._health_changed(event)
        self.seq = max(self.seq, seq)
        self._advanced.set()
        self._advanced = asyncio.Event()

    def _health_changed(self, event: HealthChanged) -> None:
        if event.healthy:
            for future in self._healthy.pop((event.app_name, event.instance_id), []):
                if not future.done():
                    future.set_result(None)
        if self.live and self.on_health is not None:
            self.on_health(event)

    async def caught_up(self, seq: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.seq < seq:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._advanced.wait(), left)
        return True

    async def await_healthy(self, app_name: str, instance_id: str, timeout: float) -> bool:
        if self.state.health.get(app_name, {}).get(instance_id):
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._healthy[(app_name, instance_id)].append(future)
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            return False
