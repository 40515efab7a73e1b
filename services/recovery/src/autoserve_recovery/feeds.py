"""The two feeds every replica reads from AUTOSERVE_EVENTS.

- **state**: an ordered push consumer over every event (the fold takes health, failure and
  recovery events), from
  ``history_seconds`` ago: every replica folds everything, so budgets and backoff are the
  same on each and survive restarts (replay is the fold again).
- **work**: one durable pull consumer shared by all replicas (``autoserve-recovery``):
  JetStream hands each ``FailureDetected`` and ``HealthChanged`` to one replica; one that
  is not acknowledged within ``ack_wait`` (the replica crashed) goes to another.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from autoserve_events import EVENTS_STREAM
from autoserve_events.durables import RECOVERY_WORK
from autoserve_runtime import Feed
from autoserve_runtime.consumer import create_durable

WORK_DURABLE = RECOVERY_WORK.name


def state_feed(js: JetStreamContext, on_message: Callable[[Msg], Awaitable[None]]) -> Feed:
    return Feed(js, "recovery-state", EVENTS_STREAM, ["autoserve.event.>"], on_message)


async def work_subscription(js: JetStreamContext, ack_wait: float) -> JetStreamContext.PullSubscription:
    await create_durable(js, RECOVERY_WORK, pull_ack_wait=ack_wait)
    return await js.pull_subscribe_bind(WORK_DURABLE, stream=EVENTS_STREAM)
