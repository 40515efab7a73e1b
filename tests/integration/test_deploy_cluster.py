"""deploy/nats/nats-cluster.conf on three real nats-server processes on 127.0.0.1, with the
credentials deploy/make-secrets.sh generates: the routes authenticate as ``route`` and the
cluster forms (every stream and bucket created with 3 replicas has two current followers),
the users of the generated nats-server.conf keep their permissions on every node, and a
server with the wrong route password is kept out. The compose file and the Helm values run
this same config (test_deploy_files.py checks them statically)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from nats.errors import Error as NatsError
from nats.js.api import StreamInfo

from autoserve_events import (
    EVENTS_STREAM,
    PROBES_STREAM,
    HealthChanged,
    ProbeCompleted,
    encode,
    subject_for,
)
from autoserve_runtime import ReplicasError, free_port, provision
from autoserve_runtime.bus import connect

from ..support.secure_nats import SecureNats, refused, secure_cluster, session
from ..support.waiting import wait_for
from .conftest import LOCALHOST

pytestmark = pytest.mark.cluster  # runs in its own lane beside the others (Makefile)

T = 1_700_000_000.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[SecureNats]]:
    nodes = secure_cluster(tmp_path / "cluster")
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def replicated(info: StreamInfo) -> bool:
    """Three replicas, and both followers caught up with the leader."""
    peers = (info.cluster.replicas or []) if info.cluster else []
    return info.config.num_replicas == 3 and len(peers) == 2 and all(p.current for p in peers)


async def test_the_deploy_config_forms_a_cluster_and_replicates_every_stream(cluster: list[SecureNats]) -> None:
    seeds = ",".join(node.url for node in cluster)
    admin = await connect(seeds, "test-admin", timeout=10, auth=cluster[0].auth("admin"))
    try:
        js = admin.jetstream()
        # Until the routes are up and JetStream has elected its meta leader: R3 needs 3 peers.
        await wait_for(lambda: provisioned(js), timeout=30, what="provisioning with 3 replicas")
        names = [PROBES_STREAM, EVENTS_STREAM] + [s async for s in stream_names(js) if s.startswith("KV_")]
        assert len(names) >= 5  # two streams and the KV buckets

        async def all_replicated() -> bool:
            return all([replicated(await js.stream_info(name)) for name in names])

        await wait_for(all_replicated, timeout=30, what=f"3 current replicas of {names}")
        leaders = {(await js.stream_info(name)).cluster.leader for name in names}  # type: ignore[union-attr]
        assert leaders <= {"node-1", "node-2", "node-3"}
    finally:
        await admin.close()


async def provisioned(js) -> bool:  # type: ignore[no-untyped-def]
    try:
        await provision(js, replicas=3)
    except (NatsError, ReplicasError, TimeoutError):  # no meta leader yet, or too few peers: again
        return False
    return True


async def stream_names(js):  # type: ignore[no-untyped-def]
    for info in await js.streams_info():
        yield info.config.name


async def test_a_service_user_keeps_its_permissions_on_every_node(cluster: list[SecureNats]) -> None:
    admin = await connect(cluster[0].url, "test-admin", timeout=10, auth=cluster[0].auth("admin"))
    try:
        await wait_for(lambda: provisioned(admin.jetstream()), timeout=30, what="provisioning with 3 replicas")
    finally:
        await admin.close()
    probe = ProbeCompleted(instance_id="w-1", app_name="web", check_type="http", is_healthy=True,
                           response_time_ms=1.0, timestamp=T)  # fmt: skip
    health = HealthChanged(instance_id="w-1", app_name="web", healthy=False, previous=True, consecutive=3,
                           reason="test", timestamp=T)  # fmt: skip
    for node in cluster:  # wherever the prober connects, the stream leader may be elsewhere
        me = await session(node, "prober")
        try:
            ack = await me.nc.jetstream().publish(subject_for(probe), encode(probe), timeout=10)
            assert ack.stream == PROBES_STREAM
            denied = await me.refusals(partial(me.nc.publish, subject_for(health), encode(health)))
            assert denied == [refused("publish", subject_for(health))], node.url
        finally:
            await me.nc.close()
    assert all(node.violations() for node in cluster)  # each node logged the refusal it made


async def test_a_server_without_the_route_credential_is_kept_out(cluster: list[SecureNats], tmp_path: Path) -> None:
    member = cluster[0]
    intruder = SecureNats(tmp_path / "intruder", member.conf, passwords=member.passwords, server_vars={
        **member.server_vars, "AUTOSERVE_NATS_SERVER_NAME": "intruder",
        "AUTOSERVE_NATS_CLUSTER_LISTEN": f"{LOCALHOST}:{free_port()}",
        "AUTOSERVE_ROUTE_PASSWORD": "not-the-route-password",
        "AUTOSERVE_NATS_ROUTES": member.server_vars["AUTOSERVE_NATS_ROUTES"].replace(
            member.server_vars["AUTOSERVE_ROUTE_PASSWORD"], "not-the-route-password"),
    }).start()  # fmt: skip
    try:
        await wait_for(lambda: "Authorization Violation" in intruder.log_file.read_text(errors="replace"),
                       what="the intruder's routes to be refused")  # fmt: skip
        assert "authentication error" in member.log_file.read_text(errors="replace")
    finally:
        intruder.stop()
