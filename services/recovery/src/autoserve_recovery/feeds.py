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
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from autoserve_events import EVENTS_STREAM, FailureDetected, HealthChanged, wildcard
from autoserve_runtime import Feed

WORK_DURABLE = "autoserve-recovery"
WORK_SUBJECTS = (wildcard(FailureDetected), wildcard(HealthChanged))


def state_feed(js: JetStreamContext, on_message: Callable[[Msg], Awaitable[None]]) -> Feed:
    return Feed(js, "recovery-state", EVENTS_STREAM, ["autoserve.event.>"], on_message)


async def work_subscription(js: JetStreamContext, ack_wait: float) -> JetStreamContext.PullSubscription:
    config = ConsumerConfig(
        durable_name=WORK_DURABLE,
        deliver_policy=DeliverPolicy.NEW,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_ack_pending=10_000,
        filter_subjects=list(WORK_SUBJECTS),
    )
    try:
        await js.consumer_info(EVENTS_STREAM, WORK_DURABLE)
    except NotFoundError:
        await js.add_consumer(EVENTS_STREAM, config)
    return await js.pull_subscribe_bind(WORK_DURABLE, stream=EVENTS_STREAM)
