"""A 3-node NATS JetStream cluster on 127.0.0.1 (the ``cluster`` fixture): it forms,
``autoserve apply`` gives every stream and bucket 3 replicas and moves a single-replica
system to 3 with its events intact, and a service whose first seed is dead starts through
the next one."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from autoserve_events import (
    APPS_BUCKET,
    EVENTS_STREAM,
    PROBES_STREAM,
    HealthChanged,
    ProbeCompleted,
    encode,
    headers_for,
    subject_for,
)
from autoserve_events.subjects import EVENTS_WILDCARD, PROBES_WILDCARD
from autoserve_runtime import free_port, live_keys
from autoserve_runtime.nats_cluster import EmbeddedNatsCluster

from ..support.cluster import LOCALHOST, Services, all_current, apply, client, stream_leader
from ..support.cluster_counts import DETECTOR_DURABLE, read_stream
from ..support.waiting import wait_for
from .conftest import check, config_for

pytestmark = pytest.mark.cluster  # runs in its own lane beside the others (Makefile)


def jsz(cluster: EmbeddedNatsCluster, index: int) -> dict:
    with urllib.request.urlopen(f"http://{LOCALHOST}:{cluster.monitor_ports[index]}/jsz", timeout=5) as reply:
        return json.loads(reply.read())["meta_cluster"]


def one_app(tmp_path: Path, port: int | None = None) -> Path:
    config = tmp_path / "config.yaml"
    instances = [{"id": "web-1", "host": LOCALHOST, "port": port or free_port()}]
    config.write_text(config_for({"web": {"health_check": check(), "instances": instances}}))
    return config


async def replicas_of_everything(js: JetStreamContext) -> dict[str, int]:
    return {info.config.name: info.config.num_replicas for info in await js.streams_info()}


async def test_three_nodes_form_one_cluster_and_apply_gives_every_stream_and_bucket_three_replicas(
    cluster: EmbeddedNatsCluster, tmp_path: Path
) -> None:
    metas = [jsz(cluster, index) for index in range(3)]
    assert {meta["cluster_size"] for meta in metas} == {3}
    assert len({meta["leader"] for meta in metas}) == 1 and metas[0]["leader"] in cluster.node_names
    await apply(one_app(tmp_path), cluster.url, replicas=3)
    nc = await client(cluster.url)
    try:
        js = nc.jetstream()
        everything = await replicas_of_everything(js)
        assert {PROBES_STREAM, EVENTS_STREAM, f"KV_{APPS_BUCKET}"} <= set(everything)
        assert set(everything.values()) == {3}, everything
        await wait_for(lambda: all_current(js, 3), 30, "every replica of every stream current", every=0.2)
    finally:
        await nc.close()


async def stored(js: JetStreamContext) -> dict[str, tuple[int, int, list[str]]]:
    """Each stream's message count, last sequence and event ids, read back in full."""
    found = {}
    for stream, subject in ((PROBES_STREAM, PROBES_WILDCARD), (EVENTS_STREAM, EVENTS_WILDCARD)):
        ids: list[str] = []
        await read_stream(js, stream, subject, lambda msg, into=ids: into.append(msg.headers["Nats-Msg-Id"]))
        state = (await js.stream_info(stream)).state
        found[stream] = (state.messages, state.last_seq, ids)
    return found


async def test_apply_moves_a_single_replica_system_to_three_replicas_with_its_stored_events_intact(
    cluster: EmbeddedNatsCluster, tmp_path: Path
) -> None:
    config = one_app(tmp_path)
    await apply(config, cluster.url, replicas=1)
    nc = await client(cluster.url)
    try:
        js = nc.jetstream()
        assert set((await replicas_of_everything(js)).values()) == {1}
        now = time.time()
        for i in range(400):
            probe = ProbeCompleted(instance_id="web-1", app_name="web", check_type="http", is_healthy=i % 7 != 0,
                                   response_time_ms=1.0, timestamp=now + i / 1000)  # fmt: skip
            await js.publish(subject_for(probe), encode(probe), headers=headers_for(probe))
        for i in range(40):
            change = HealthChanged(instance_id="web-1", app_name="web", healthy=i % 2 == 0, previous=i % 2 == 1,
                                   consecutive=i, reason="test", timestamp=now + i / 100)  # fmt: skip
            await js.publish(subject_for(change), encode(change), headers=headers_for(change))
        before = await stored(js)
        apps_before = await live_keys(js, APPS_BUCKET)
        assert before[PROBES_STREAM][0] == 400 and before[EVENTS_STREAM][0] == 40

        await apply(config, cluster.url, replicas=3)
        assert set((await replicas_of_everything(js)).values()) == {3}
        await wait_for(lambda: all_current(js, 3), 60, "every new replica current", every=0.2)
        assert await stored(js) == before
        assert await live_keys(js, APPS_BUCKET) == apps_before

        # The copies are real: with the leader that held the only replica gone, another
        # node leads and serves the same events.
        leader = await stream_leader(js, PROBES_STREAM)
        assert leader is not None
        cluster.node(leader).kill()

        async def led_by_others() -> bool:
            """The streams, and the meta group (it places the consumer that reads them back)."""
            leaders = [await stream_leader(js, stream) for stream in (PROBES_STREAM, EVENTS_STREAM)]
            alive = [index for index, node in enumerate(cluster.nodes) if node.running]
            leaders += [jsz(cluster, index).get("leader") for index in alive]
            return None not in leaders and leader not in leaders

        await wait_for(led_by_others, 60, f"both streams and the meta group led by others than {leader}", every=0.2)
        assert await stored(js) == before
    finally:
        await nc.close()


async def test_a_service_whose_first_seed_is_dead_connects_through_the_second(
    cluster: EmbeddedNatsCluster, tmp_path: Path
) -> None:
    await apply(one_app(tmp_path), cluster.url, replicas=3)
    first = cluster.nodes[0]
    first.stop()
    assert cluster.url.split(",")[0] == first.url and not first.running
    services = Services(cluster.url, tmp_path / "logs", tmp_path / "data")
    try:
        for name in ("prober", "detector"):
            services.start(name)
        await services.all_ready(timeout=60)
        nc = await client(cluster.nodes[1].url)
        try:
            js = nc.jetstream()

            async def probes_folded() -> bool:
                info = await js.consumer_info(PROBES_STREAM, DETECTOR_DURABLE)
                return bool(info.ack_floor and info.ack_floor.stream_seq >= 3)

            await wait_for(probes_folded, 30, "probes stored and folded by the detector", every=0.2)
        finally:
            await nc.close()
    finally:
        services.stop()
