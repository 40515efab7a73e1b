"""Replicated storage on a real 3-node JetStream cluster: ``autoserve apply`` sets the
replicas of every stream and bucket from AUTOSERVE_STREAM_REPLICAS and moves them in place
with the stored events kept; a service never changes them; replicas the cluster cannot hold
are refused naming both numbers, with nothing changed."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from autoserve_cli.cluster_status import cluster_streams
from autoserve_events import PROBES_STREAM
from autoserve_runtime import EmbeddedNatsServer, connect, free_port, provision
from autoserve_runtime.nats_cluster import EmbeddedNatsCluster

from ..support.cluster import autoserve, clean_env
from ..support.waiting import wait_for
from .conftest import LOCALHOST, check, config_for

pytestmark = pytest.mark.cluster  # runs in its own lane beside the others (Makefile)

STREAMS = cluster_streams()


async def apply(config: Path, url: str, replicas: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(AUTOSERVE_STREAM_REPLICAS=replicas)
    return await autoserve("apply", "-c", str(config), "--nats-url", url, env=env)


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsCluster]:
    with EmbeddedNatsCluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "apps.yaml"
    path.write_text(config_for({"web": {"health_check": check(), "instances": [{"id": "w-1", "host": LOCALHOST}]}}))
    return path


@pytest.fixture
async def cluster_nc(nats_cluster: EmbeddedNatsCluster) -> AsyncIterator[Client]:
    nc = await connect(nats_cluster.url, "test-replicas", timeout=10)
    yield nc
    await nc.close()


async def replicas(nc: Client) -> dict[str, int]:
    js = nc.jetstream()
    return {name: (await js.stream_info(name)).config.num_replicas or 1 for name in STREAMS}


async def test_apply_moves_every_stream_and_bucket_to_r3_and_back_with_the_events_kept(
    nats_cluster: EmbeddedNatsCluster, cluster_nc: Client, config: Path
) -> None:
    url = nats_cluster.url
    result = await apply(config, url, "1")
    assert result.returncode == 0, result.stderr
    assert await replicas(cluster_nc) == dict.fromkeys(STREAMS, 1)
    js = cluster_nc.jetstream()
    for i in range(50):
        await js.publish("autoserve.probe.web.w-1", b"{}", headers={"Nats-Msg-Id": f"kept-{i}"})
    before = (await js.stream_info(PROBES_STREAM)).state

    result = await apply(config, url, "3")
    assert result.returncode == 0, result.stderr
    assert f"{PROBES_STREAM} 1 -> 3" in result.stdout
    assert await replicas(cluster_nc) == dict.fromkeys(STREAMS, 3)
    after = await js.stream_info(PROBES_STREAM)
    assert (after.state.messages, after.state.last_seq) == (before.messages, before.last_seq)
    assert len(after.cluster.replicas or []) == 2  # two followers beside the leader

    async def durables_follow() -> bool:  # a durable without its own replicas follows its stream's
        info = await js.consumer_info(PROBES_STREAM, "autoserve-detector")
        return info.cluster is not None and len(info.cluster.replicas or []) == 2

    await wait_for(durables_follow, timeout=30, what="the detector's durable at 3 replicas")

    # A service provisions with replicas=None: it uses the streams as they are.
    assert await provision(js) == {}
    assert await replicas(cluster_nc) == dict.fromkeys(STREAMS, 3)

    result = await apply(config, url, "1")
    assert result.returncode == 0, result.stderr
    assert await replicas(cluster_nc) == dict.fromkeys(STREAMS, 1)
    assert (await js.stream_info(PROBES_STREAM)).state.last_seq == before.last_seq


async def test_more_replicas_than_nodes_are_refused_naming_both_and_nothing_changes(
    nats_cluster: EmbeddedNatsCluster, cluster_nc: Client, config: Path
) -> None:
    assert (await apply(config, nats_cluster.url, "3")).returncode == 0
    result = await apply(config, nats_cluster.url, "5")
    assert result.returncode == 2
    assert "AUTOSERVE_STREAM_REPLICAS=5 but the NATS cluster has 3 node(s) up" in result.stderr
    assert "nothing was changed" in result.stderr
    assert await replicas(cluster_nc) == dict.fromkeys(STREAMS, 3)


async def test_a_replica_count_other_than_1_3_5_is_refused_before_connecting(config: Path) -> None:
    result = await apply(config, f"nats://127.0.0.1:{free_port()}", "2")
    assert result.returncode == 2
    assert "AUTOSERVE_STREAM_REPLICAS: must be one of 1, 3 or 5, got '2'; nothing applied" in result.stderr


async def test_replicas_on_a_single_server_are_refused_naming_both(
    nats_server: EmbeddedNatsServer, config: Path
) -> None:
    result = await apply(config, nats_server.url, "3")
    assert result.returncode == 2
    assert "AUTOSERVE_STREAM_REPLICAS=3 but the NATS cluster has 1 node(s) up" in result.stderr


async def test_an_apply_that_moves_no_replicas_works_while_a_node_is_down(
    nats_cluster: EmbeddedNatsCluster, cluster_nc: Client, config: Path
) -> None:
    assert (await apply(config, nats_cluster.url, "3")).returncode == 0
    down = nats_cluster.nodes[2]
    down.stop()
    try:
        result = await apply(config, nats_cluster.url, "3")
        assert result.returncode == 0, result.stderr
        assert "unchanged: web" in result.stdout
    finally:
        down.launch()
        nats_cluster.wait_healthy()
