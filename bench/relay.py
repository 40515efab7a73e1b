"""The detector's bare peer for detection latency: a nats-py relay with no fold and no
bookkeeping. It reads AUTOSERVE_PROBES from a push consumer and, for each failing probe,
publishes a failure and a health output with the ids the detector derives (the detector
publishes the health one only on a transition, so the relay does at least its I/O) as
JetStream publishes, acknowledging its input every 200 messages. What is left of the
detector's latency beside it is the price of its logic and its guarantees.

``python -m bench.relay <nats url>``; prints "relay started" once consuming.
"""

from __future__ import annotations

import asyncio
import sys

import nats
import uvloop
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from autoserve_events import PROBES_STREAM, decode, derived_event_id
from autoserve_events.subjects import PROBES_WILDCARD

OUTPUTS = (("failure/health_check_failed/", "autoserve.event.failure"), ("health", "autoserve.event.health"))


async def relay(url: str) -> None:
    nc = await nats.connect(url, name="bench-relay")
    acks = nc.new_inbox()
    sent = 0

    async def ignore(_: Msg) -> None:
        return None

    async def on_probe(msg: Msg) -> None:
        nonlocal sent
        probe = decode(msg.data)
        if not probe.is_healthy:
            for kind, stem in OUTPUTS:
                sent += 1
                subject = f"{stem}.{probe.app_name}.{probe.instance_id}"
                msg_id = derived_event_id(probe.event_id, kind)
                await nc.publish(subject, b"{}", reply=f"{acks}.{sent}", headers={"Nats-Msg-Id": msg_id})
        if msg.metadata.sequence.consumer % 200 == 0:
            await msg.ack()  # AckPolicy.ALL: covers every earlier one

    await nc.subscribe(f"{acks}.*", cb=ignore)
    config = ConsumerConfig(ack_policy=AckPolicy.ALL, deliver_policy=DeliverPolicy.NEW, max_ack_pending=20_000)
    await nc.jetstream().subscribe(
        PROBES_WILDCARD, stream=PROBES_STREAM, cb=on_probe, manual_ack=True, config=config, pending_msgs_limit=-1
    )
    print("relay started", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(relay(sys.argv[1]))
