"""Deliveries lost in transit: the NATS node between a service and its consumer's leader goes
away with deliveries in flight. The server counts them delivered; the service never saw them.
With AckPolicy.ALL the ack of any later input would cover them for good, so the consumer
notices the gap in the delivery sequence and has the durable deliver again from the last
input it took: every input is folded exactly once, in stream order.

The loss is made to order by a proxy that holds the server's bytes and then cuts the
connection (``tests/support/cut_proxy.py``); the cluster fault tests meet the same case when
they SIGKILL nodes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from autoserve_events import PROBES_STREAM, ProbeCompleted, encode, headers_for, subject_for
from autoserve_runtime import ConsumerSpec, EmbeddedNatsServer, EventConsumer, EventPublisher, connect, provision

from ..support.cut_proxy import CutProxy
from ..support.waiting import wait_for
from .test_publisher_cluster import probe


@pytest.fixture
async def proxy(nats_server: EmbeddedNatsServer) -> AsyncIterator[CutProxy]:
    proxy = await CutProxy(nats_server.port).start()
    yield proxy
    await proxy.close()


async def test_inputs_lost_in_transit_are_delivered_again_and_folded_once_in_order(
    nats_server: EmbeddedNatsServer, proxy: CutProxy, tmp_path: Path
) -> None:
    direct = await connect(nats_server.url, "test-direct", timeout=10)
    service = await connect(proxy.url, "test-service", timeout=10)
    js = direct.jetstream()
    await provision(js)
    publisher = EventPublisher(service.jetstream()).start()
    folded: list[str] = []

    def fold(event: object) -> list:
        assert isinstance(event, ProbeCompleted)
        folded.append(event.event_id)
        return []

    spec = ConsumerSpec(PROBES_STREAM, "test-lost-deliveries", "autoserve.probe.>")
    consumer = EventConsumer(service.jetstream(), publisher, spec, "test", fold)
    sent: list[str] = []

    async def send(n: int) -> None:
        for _ in range(n):
            event = probe(len(sent))
            await js.publish(subject_for(event), encode(event), headers=headers_for(event))
            sent.append(event.event_id)

    async def delivered_at_least(seq: int) -> bool:
        info = await js.consumer_info(PROBES_STREAM, spec.durable)
        return (info.delivered.stream_seq if info.delivered else 0) >= seq

    try:
        await consumer.start()
        await send(50)
        await wait_for(lambda: len(folded) == 50, timeout=30, what="the first 50 folded")

        proxy.hold()
        await send(50)  # delivered by the server into the proxy, which throws them away
        await wait_for(lambda: delivered_at_least(100), timeout=30, what="the server to deliver all 100")
        assert proxy.held_bytes > 0 and len(folded) == 50
        proxy.cut()  # the client reconnects through the proxy; the server goes on after 100

        await send(50)
        await wait_for(lambda: len(folded) >= 150, timeout=60, what="all 150 folded")
        await wait_for(lambda: consumer.stats.acked_seq == 150, timeout=30, what="all 150 acknowledged")
        assert folded == sent  # every input once, in stream order
        assert consumer.stats.resumed == 1
    finally:
        await consumer.stop(timeout=1)
        await publisher.close(timeout=1)
        await service.close()
        await direct.close()
