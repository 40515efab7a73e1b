# ruff: noqa: F811  (pytest fixtures imported from test_recovery_docker are used as parameters)
"""The Docker runtime against the real engine: recreate keeps the spec, scale out stops
at ``scaling.max_replicas``, and every action completes on Docker events."""

from __future__ import annotations

import asyncio
import json

import pytest

from autoserve_recovery.adapters.copy_ports import PortPolicy
from autoserve_recovery.adapters.docker import LINEAGE_LABEL, DockerRuntime
from autoserve_recovery.ports import RecoveryError
from autoserve_runtime import free_port

from .test_recovery_docker import app, docker  # noqa: F401


def inspect(container: str) -> dict:
    return json.loads(docker("inspect", container))[0]


async def test_recreate_creates_the_same_spec_again_and_scale_out_stops_at_max_replicas(
    app: str, busybox_image: str
) -> None:
    port = free_port()
    container = await asyncio.to_thread(
        docker, "run", "-d", "--network", "host", "--name", f"{app}-one", "-m", "64m", "-e", "GREETING=hello",
        "--label", f"autoserve.app={app}", "--label", f"autoserve.port={port}", "--label", "team=blue",
        busybox_image, "/bin/busybox", "sleep", "3600",  # no port: copies on host networking cannot clash
    )  # fmt: skip
    before = await asyncio.to_thread(inspect, container)
    runtime = await DockerRuntime({app: f"autoserve.app={app}"}).start()
    try:
        outcome = await runtime.recreate(app, container[:12], timeout=20)
        new_id = str(outcome.details["container_id"])
        after = await asyncio.to_thread(inspect, new_id)
        assert new_id != container and outcome.details["removed_instance_id"] == container[:12]
        assert after["Name"] == before["Name"] == f"/{app}-one" and after["State"]["Running"]
        for key in ("Image", "Env", "Cmd"):
            assert after["Config"][key] == before["Config"][key], key
        assert after["Config"]["Labels"] == {**before["Config"]["Labels"], LINEAGE_LABEL: container[:12]}
        assert after["HostConfig"]["Memory"] == 64 * 2**20 and after["HostConfig"]["NetworkMode"] == "host"
        assert outcome.details["effective_at"] > 0  # the time of Docker's start event
        with pytest.raises(RecoveryError, match="does not exist"):
            await runtime.restart(app, container[:12], 5)  # the old one is gone

        added = await runtime.scale_out(app, new_id[:12], max_replicas=2, timeout=20)
        assert added.details["replicas"] == 2 and len(await runtime.instances(app)) == 2
        with pytest.raises(RecoveryError, match=r"already runs 2 of scaling\.max_replicas 2"):
            await runtime.scale_out(app, new_id[:12], max_replicas=2, timeout=20)
        await runtime.stop(app, str(added.details["new_instance_id"]), timeout=1)
        assert await runtime.instances(app) == [new_id[:12]]
        assert [m.port for m in await runtime.members(app)] == [port]
    finally:
        await runtime.close()


async def test_a_copy_on_host_networking_gets_a_free_port_unless_docker_port_pins_one(
    app: str, busybox_image: str
) -> None:
    port = free_port()
    container = await asyncio.to_thread(
        docker, "run", "-d", "--network", "host", "--label", f"autoserve.app={app}", "--label",
        f"autoserve.port={port}", "-e", f"PORT={port}", "-e", "OTHER=1", busybox_image, "/bin/busybox", "sleep", "3600",
    )  # fmt: skip
    runtime = await DockerRuntime({app: f"autoserve.app={app}"}).start()
    try:
        runtime.ports[app] = PortPolicy(fixed=port)
        with pytest.raises(RecoveryError, match=rf"docker.port {port} puts every container on one port"):
            await runtime.scale_out(app, container[:12], max_replicas=3, timeout=20)
        assert await runtime.instances(app) == [container[:12]]  # nothing was started
        low = free_port()
        runtime.ports[app] = PortPolicy(replica_range=(low, low + 5))
        added = await runtime.scale_out(app, container[:12], max_replicas=3, timeout=20, cause="c1")
        copy = await asyncio.to_thread(inspect, str(added.details["new_instance_id"]))
        chosen = int(added.details["port"])
        assert low <= chosen <= low + 5 and copy["Config"]["Labels"]["autoserve.port"] == str(chosen)
        env = copy["Config"]["Env"]
        assert f"PORT={chosen}" in env and f"PORT={port}" not in env and "OTHER=1" in env  # PORT replaced
        assert copy["Config"]["Labels"]["autoserve.recovery.cause"] == "c1"
        assert sorted(m.port for m in await runtime.members(app)) == sorted([port, chosen])
    finally:
        await runtime.close()
