# ruff: noqa: F811  (pytest fixtures imported from test_recovery_docker are used as parameters)
"""At most once with several replicas, and budgets that survive a crash of the service.
Failures are published directly (as the detector would), so the counts are exact."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client

from autoserve_events import EVENTS_STREAM, RecoveryStrategy
from autoserve_recovery.adapters.claims import CLAIMS_BUCKET, Claims, Lease, claims_bucket
from autoserve_recovery.adapters.docker import docker_time
from autoserve_recovery.feeds import WORK_DURABLE
from autoserve_runtime import EmbeddedNatsServer, free_port

from ..support.recovery import publish_copies, stopped, work_settled
from .conftest import Outputs, apply_yaml, wait_for
from .test_recovery_docker import (  # noqa: F401
    DockerEvents,
    app,
    app_config,
    docker,
    docker_events,
    executed,
    recoveries,
    run_box,
)

S = RecoveryStrategy


async def test_three_replicas_and_duplicated_failures_give_one_docker_restart_per_failure(
    app: str, nc: Client, recoveries, outputs: Outputs, busybox_image: str, docker_events: DockerEvents
) -> None:
    await apply_yaml(nc, app_config(app))
    containers = [await asyncio.to_thread(run_box, busybox_image, app, port=free_port()) for _ in range(3)]
    for replica in ("r1", "r2", "r3"):
        await recoveries(replica)
    failures = [stopped(app, c) for c in containers]
    await asyncio.gather(*(publish_copies(nc, f, 6) for f in failures))
    await wait_for(lambda: len(executed(outputs)) >= 3, timeout=30, what="three restarts")
    await wait_for(lambda: work_settled(nc), 30, "every copy handled")
    await wait_for(lambda: all(docker_events.count("restart", c) >= 1 for c in containers), what="docker restarts")
    assert [docker_events.count("restart", c) for c in containers] == [1, 1, 1]
    done = executed(outputs)
    assert len(done) == 3 and {e.failure_event_id for e in done} == {f.event_id for f in failures}
    assert all(e.strategy is S.RESTART_CONTAINER and e.success for e in done)
    # Each action's claim is recorded as done, keyed by the failure's event_id.
    kv = await nc.jetstream().key_value(CLAIMS_BUCKET)
    for failure in failures:
        lease = msgspec.json.decode((await kv.get(f"f.{failure.event_id}.restart_container")).value, type=Lease)
        assert lease.done and lease.owner in {"r1", "r2", "r3"}


def spawn_recovery(nats_url: str, replica: str, data_dir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AUTOSERVE_RECOVERY_REPLICA": replica, "AUTOSERVE_RECOVERY_LEASE_SECONDS": "2",
           "AUTOSERVE_RECOVERY_DOCKER": "1", "AUTOSERVE_DATA_DIR": str(data_dir), "AUTOSERVE_LOG_FORMAT": "json"}  # fmt: skip
    log = open(data_dir / f"{replica}.log", "ab")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "autoserve_cli.main", "run", "recovery", "--nats-url", nats_url],
                            env=env, stdout=log, stderr=log)  # fmt: skip


def replica_logs(data_dir: Path) -> str:
    """The tail of each spawned replica's log: what a failure in CI is read from."""
    return "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in sorted(data_dir.glob("*.log")))


async def consumer_bound(nc: Client) -> bool:
    try:
        await nc.jetstream().consumer_info(EVENTS_STREAM, WORK_DURABLE)
        return True
    except Exception:
        return False


async def test_a_killed_recovery_service_keeps_its_budgets_and_backoff_after_restart(
    app: str, nats_server: EmbeddedNatsServer, nc: Client, outputs: Outputs, busybox_image: str, tmp_path: Path
) -> None:
    await apply_yaml(nc, app_config(app, max_restarts=2, backoff_initial_seconds=3, backoff_max_seconds=30))
    container = await asyncio.to_thread(run_box, busybox_image, app, port=free_port())
    process = spawn_recovery(nats_server.url, "p1", tmp_path)
    try:
        await wait_for(lambda: consumer_bound(nc), 30, "recovery consuming")
        await publish_copies(nc, stopped(app, container), 1)
        await wait_for(lambda: len(executed(outputs)) == 1, timeout=30, what="first restart")
        process.send_signal(signal.SIGKILL)  # mid-incident: no clean shutdown
        await asyncio.to_thread(process.wait, 10)
        await publish_copies(nc, stopped(app, container), 1)  # it fails again while recovery is down
        process = spawn_recovery(nats_server.url, "p2", tmp_path)
        await wait_for(lambda: len(executed(outputs)) == 2, timeout=30, what="second restart after the crash")
        await publish_copies(nc, stopped(app, container), 1)
        await wait_for(lambda: len(executed(outputs)) == 3, timeout=30, what="third action")
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 15)
    first, second, third = executed(outputs)
    # The restarted service knew the first restart: its backoff (3 s) held, then doubled.
    assert second.timestamp >= first.details["next_allowed_at"] - 0.01
    assert third.timestamp >= second.details["next_allowed_at"] - 0.01
    assert second.details["next_allowed_at"] - (second.timestamp + second.duration_ms / 1000) == pytest.approx(
        6.0, abs=0.01
    )
    assert [e.details["backoff_level"] for e in (first, second, third)] == [1, 2, 3]
    # And its budget: max_restarts 2 in the window, so the third action escalates.
    assert [e.strategy for e in (first, second, third)] == [
        S.RESTART_CONTAINER,
        S.RESTART_CONTAINER,
        S.RECREATE_CONTAINER,
    ]
    assert (first.details["replica"], second.details["replica"]) == ("p1", "p2")


async def lease_holder(nc: Client, key: str) -> Lease | None:
    kv = await nc.jetstream().key_value(CLAIMS_BUCKET)
    try:
        return msgspec.json.decode((await kv.get(key)).value, type=Lease)
    except Exception:
        return None


async def test_a_replica_that_crashes_mid_action_loses_nothing_another_takes_over_after_the_lease(
    app: str, nats_server: EmbeddedNatsServer, nc: Client, outputs: Outputs, busybox_image: str, tmp_path: Path
) -> None:
    # A replace waits for the replacement to be healthy (no detector runs here: it never
    # is), so the action is still running when its replica is killed.
    rules = {"strategies": {"container_stopped": ["replace_instance"]}, "action_timeout_seconds": 5}
    await apply_yaml(nc, app_config(app, **rules))
    container = await asyncio.to_thread(run_box, busybox_image, app, port=free_port())
    processes = {name: spawn_recovery(nats_server.url, name, tmp_path) for name in ("p1", "p2")}
    try:
        await wait_for(lambda: consumer_bound(nc), 30, "recovery consuming")
        failure = stopped(app, container)
        await publish_copies(nc, failure, 1)
        key = f"f.{failure.event_id}.replace_instance"
        await wait_for(lambda: lease_holder(nc, key), 30, "an action in progress")
        owner = (await lease_holder(nc, key)).owner
        processes[owner].send_signal(signal.SIGKILL)
        await asyncio.to_thread(processes[owner].wait, 10)
        survivor = "p2" if owner == "p1" else "p1"
        try:
            await wait_for(lambda: executed(outputs), timeout=30, what="the incident finished by the survivor")
            await wait_for(lambda: work_settled(nc), 30, "the failure acknowledged")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{replica_logs(tmp_path)}") from None
    finally:
        for process in processes.values():
            process.terminate()
            await asyncio.to_thread(process.wait, 15)
    (event,) = executed(outputs)
    assert event.details["replica"] == survivor and event.strategy is S.REPLACE_INSTANCE
    assert not event.success and "not healthy within 4s" in event.error
    assert (await lease_holder(nc, key)).owner == survivor
    # The crashed replica's half-made replacement was cleaned up; only the original is left.
    left = await asyncio.to_thread(
        subprocess.run, ["docker", "ps", "-aq", "--no-trunc", "--filter", f"label=autoserve.app={app}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert left.stdout.split() == [container]


async def test_an_action_claim_that_outlives_its_crashed_owners_instance_lease_is_retried_not_dropped(
    app: str, nc: Client, recoveries, outputs: Outputs, busybox_image: str, docker_events: DockerEvents
) -> None:
    # A replica killed right after claiming: its instance lease has run out (nothing
    # renews it) but its action claim, taken a moment later, has not. The survivor holds
    # the instance lease and meets that claim; it must look again when the claim runs out,
    # not acknowledge the failure with nothing done (CI caught that once).
    await apply_yaml(nc, app_config(app))
    container = await asyncio.to_thread(run_box, busybox_image, app, port=free_port())
    failure = stopped(app, container)
    kv = await nc.jetstream().key_value(CLAIMS_BUCKET)
    ghost_until = time.time() + 3
    ghost = Lease("ghost", ghost_until, failure.event_id, action="restart_container", since=time.time())
    await kv.create(f"f.{failure.event_id}.restart_container", msgspec.json.encode(ghost))
    await recoveries("r1")
    await publish_copies(nc, failure, 1)
    await wait_for(lambda: executed(outputs), timeout=30, what="the restart after the ghost's claim ran out")
    await wait_for(lambda: work_settled(nc), 30, "the failure acknowledged")
    (event,) = executed(outputs)
    assert event.success and event.strategy is S.RESTART_CONTAINER and event.details["replica"] == "r1"
    assert event.timestamp >= ghost_until - 0.01  # not before the ghost's claim ran out
    assert "already_done" not in event.details  # the container had not restarted since the claim
    await wait_for(lambda: docker_events.count("restart", container) >= 1, what="docker restart")
    assert docker_events.count("restart", container) == 1
    lease = msgspec.json.decode((await kv.get(f"f.{failure.event_id}.restart_container")).value, type=Lease)
    assert lease.done and lease.owner == "r1"


def kill_on_docker_event(container: str, action: str, process: subprocess.Popen[bytes]) -> threading.Thread:
    """SIGKILL ``process`` the moment Docker reports ``action`` on ``container``: a thread
    reading ``docker events`` directly, so nothing stands between the event and the kill
    (``--since`` now: an event before the subscription is ready is still delivered)."""
    watcher = subprocess.Popen(["docker", "events", "--format", "{{.Action}} {{.Actor.ID}}", "--filter",
                                f"container={container}", "--since", f"{time.time():.3f}"],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip

    def watch() -> None:
        assert watcher.stdout is not None
        deadline = time.monotonic() + 60
        for line in watcher.stdout:
            if line.split()[:1] == [action]:
                process.kill()
                break
            if time.monotonic() > deadline:
                break
        watcher.terminate()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


async def test_a_replica_killed_after_the_docker_call_is_not_followed_by_a_second_restart(
    app: str, nats_server: EmbeddedNatsServer, nc: Client, outputs: Outputs, busybox_image: str, tmp_path: Path,
    docker_events: DockerEvents,
) -> None:  # fmt: skip
    await apply_yaml(nc, app_config(app))
    container = await asyncio.to_thread(run_box, busybox_image, app, port=free_port())
    first = spawn_recovery(nats_server.url, "p1", tmp_path)
    second = None
    try:
        await wait_for(lambda: consumer_bound(nc), 30, "recovery consuming")
        watcher = kill_on_docker_event(container, "kill", first)  # restart -t 0 begins with a kill
        failure = stopped(app, container)
        await publish_copies(nc, failure, 1)
        await asyncio.to_thread(watcher.join, 60)
        await asyncio.to_thread(first.wait, 10)
        assert first.returncode == -signal.SIGKILL
        claim = await lease_holder(nc, f"f.{failure.event_id}.restart_container")
        assert claim is not None and claim.owner == "p1" and claim.action == "restart_container" and not claim.done
        assert executed(outputs) == []  # killed between the Docker call and its record
        second = spawn_recovery(nats_server.url, "p2", tmp_path)
        await wait_for(lambda: executed(outputs), timeout=30, what="the incident finished by p2")
        await wait_for(lambda: work_settled(nc), 30, "the failure acknowledged")
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.terminate()
                await asyncio.to_thread(process.wait, 15)
    (event,) = executed(outputs)
    assert event.success and event.details["replica"] == "p2" and event.details["taken_over_from"] == "p1"
    assert event.details["already_done"] is True
    started_at = json.loads(docker("inspect", container))[0]["State"]["StartedAt"]
    assert event.details["effective_at"] == pytest.approx(docker_time(started_at), abs=1e-6)
    assert event.details["effective_at"] > claim.since
    await wait_for(lambda: docker_events.count("restart", container) >= 1, what="docker's restart event")
    assert docker_events.count("restart", container) == 1 and docker_events.count("start", container) == 2


async def test_an_instance_lease_renewed_while_acting_is_released_at_the_end_not_left_to_expire(
    nc: Client,
) -> None:
    # Each renewal moves the lease's revision on; the finish must still release it (it
    # once updated on the revision the lease was taken at, failed, and other replicas
    # waited out the lease).
    kv = await claims_bucket(nc.jetstream())
    mine, other = Claims(kv, "r1", lease_seconds=60), Claims(kv, "r2", lease_seconds=60)
    taken = await mine.acquire("i.shop.web-1", "cause-1", reusable=True)
    assert taken is not None
    for _ in range(2):
        await mine.renew("i.shop.web-1", "cause-1")
    assert await other.acquire("i.shop.web-1", "cause-2", reusable=True) is None  # held
    await mine.finish("i.shop.web-1", "cause-1")
    lease = await mine.peek("i.shop.web-1")
    assert lease is not None and lease.done and lease.owner == "r1"
    assert await other.acquire("i.shop.web-1", "cause-2", reusable=True) is not None  # at once
