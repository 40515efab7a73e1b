"""Failures published as the detector would publish them (so the recovery suites' counts are
exact), and whether recovery's work durable has handled every input."""

from __future__ import annotations

import time

from nats.aio.client import Client

from autoserve_events import EVENTS_STREAM, FailureDetected, FailureType, encode, new_event_id, subject_for
from autoserve_recovery.feeds import WORK_DURABLE


def stopped(app_name: str, container: str, at: float | None = None) -> FailureDetected:
    return FailureDetected(
        event_id=new_event_id(), failure_type=FailureType.CONTAINER_STOPPED, instance_id=container[:12],
        app_name=app_name, severity="critical", message="test: container stopped", timestamp=at or time.time(),
        details={"container_id": container}, is_critical=True,
    )  # fmt: skip


def check_failed(app_name: str, instance: str) -> FailureDetected:
    return FailureDetected(
        event_id=new_event_id(), failure_type=FailureType.HEALTH_CHECK_FAILED, instance_id=instance, app_name=app_name,
        severity="high", message="test: health check failed", timestamp=time.time(), consecutive_count=2,
    )  # fmt: skip


async def publish_copies(nc: Client, event: FailureDetected, copies: int = 1) -> None:
    """Stored ``copies`` times: no Nats-Msg-Id, so JetStream's duplicate window lets them all in."""
    js = nc.jetstream()
    for _ in range(copies):
        await js.publish(subject_for(event), encode(event))


async def work_settled(nc: Client) -> bool:
    info = await nc.jetstream().consumer_info(EVENTS_STREAM, WORK_DURABLE)
    return info.num_pending == 0 and info.num_ack_pending == 0
