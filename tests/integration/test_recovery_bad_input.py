# ruff: noqa: F811  (pytest fixtures imported from test_recovery_docker are used as parameters)
"""Bad input: each gives one failed ``RecoveryExecuted`` with a clear error, no crash, and
no retry storm (the failed attempt's backoff defers what follows)."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client

from autoserve_events import EVENTS_STREAM, RecoveryExecuted
from autoserve_recovery.feeds import WORK_DURABLE
from autoserve_runtime import free_port

from ..support.recovery import publish_copies, stopped
from .conftest import Outputs, apply_yaml, config_for, wait_for
from .test_recovery_docker import app, app_config, executed, recoveries, run_box  # noqa: F401


def failed(outputs: Outputs) -> list[RecoveryExecuted]:
    return [e for e in executed(outputs) if not e.success]


async def deferred(nc: Client, count: int) -> bool:
    """``count`` inputs delivered and held back (negatively acknowledged with a delay)."""
    info = await nc.jetstream().consumer_info(EVENTS_STREAM, WORK_DURABLE)
    return info.num_pending == 0 and info.num_ack_pending >= count


async def test_a_failure_for_an_unknown_app_is_a_failed_recovery_not_a_crash(
    app: str, nc: Client, recoveries, outputs: Outputs
) -> None:
    await apply_yaml(nc, app_config(app))
    service = await recoveries()
    await publish_copies(nc, stopped("ghost-app", "0123456789ab" * 5), 3)
    await wait_for(lambda: failed(outputs), timeout=20, what="a failed RecoveryExecuted")
    event = failed(outputs)[0]
    assert event.app_name == "ghost-app" and event.error is not None
    assert "unknown app 'ghost-app'" in event.error and "autoserve-apps" in event.error
    assert event.strategy == "restart_container" and event.failure_type == "container_stopped"
    await wait_for(lambda: deferred(nc, 0), 10, "copies handled")
    assert len(executed(outputs)) == 1 and service.ready.is_set()


async def test_an_unknown_static_instance_names_the_instance(
    app: str, nc: Client, recoveries, outputs: Outputs
) -> None:
    await apply_yaml(nc, config_for({app: {"instances": [{"id": "web-1", "host": "127.0.0.1", "port": free_port()}]}}))
    await recoveries(docker=False)
    await publish_copies(nc, stopped(app, "nosuch-1"), 1)
    await wait_for(lambda: failed(outputs), timeout=20, what="a failed RecoveryExecuted")
    assert failed(outputs)[0].error == f"unknown instance 'nosuch-1' of app {app!r}: not in its instances"


async def test_a_container_that_no_longer_exists_fails_once_and_backs_off(
    app: str, nc: Client, recoveries, outputs: Outputs
) -> None:
    await apply_yaml(nc, app_config(app))
    service = await recoveries()
    await publish_copies(nc, stopped(app, "deadbeef0000" * 5), 1)
    await wait_for(lambda: failed(outputs), timeout=20, what="a failed RecoveryExecuted")
    event = failed(outputs)[0]
    assert event.error == "container 'deadbeef0000' does not exist (any more)"
    assert event.details["next_allowed_at"] - event.timestamp >= 10  # backoff applies to failed attempts too
    for _ in range(5):  # more failures for it: all wait for the backoff, none is tried now
        await publish_copies(nc, stopped(app, "deadbeef0000" * 5), 1)
    await wait_for(lambda: deferred(nc, 5), 10, "five failures deferred")
    assert len(executed(outputs)) == 1 and service.ready.is_set()


async def test_docker_socket_unavailable_is_a_failed_recovery_with_a_clear_error(
    app: str, nc: Client, recoveries, outputs: Outputs, busybox_image: str, tmp_path
) -> None:
    await apply_yaml(nc, app_config(app))
    container = await asyncio.to_thread(run_box, busybox_image, app, port=free_port())
    service = await recoveries(docker_url=f"unix://{tmp_path}/no-docker.sock")
    await publish_copies(nc, stopped(app, container), 2)
    await wait_for(lambda: failed(outputs), timeout=20, what="a failed RecoveryExecuted")
    event = failed(outputs)[0]
    assert event.error is not None and event.error.startswith("docker engine unavailable")
    await wait_for(lambda: deferred(nc, 0), 10, "copies handled")
    assert len(executed(outputs)) == 1 and service.ready.is_set()


async def test_a_malformed_message_is_dead_lettered_and_the_service_goes_on(
    app: str, nc: Client, recoveries, outputs: Outputs, busybox_image: str
) -> None:
    await apply_yaml(nc, app_config(app))
    await recoveries()
    await nc.jetstream().publish(f"autoserve.event.failure.{app}.x", b'{"type": "FailureDetected", "oops": 1}')
    await wait_for(lambda: outputs.dead_letters(), timeout=20, what="a dead letter")
    assert outputs.dead_letters()[0].subject == "autoserve.deadletter.recovery"
    assert outputs.dead_letters()[0].headers["Autoserve-Reason"].startswith("FailureDetected: Object missing")
    outputs.messages = [m for m in outputs.messages if m.subject.startswith("autoserve.event.recovery.")]
    container = await asyncio.to_thread(run_box, busybox_image, app, port=free_port())
    await publish_copies(nc, stopped(app, container), 1)
    await wait_for(lambda: executed(outputs), timeout=20, what="the next failure acted on")
    assert executed(outputs)[0].success
