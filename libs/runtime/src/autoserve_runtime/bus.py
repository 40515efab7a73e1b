"""Connecting to NATS and provisioning streams and KV buckets, idempotently."""

from __future__ import annotations

import asyncio

import nats
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError

from autoserve_events import APPS_BUCKET, SETTINGS_BUCKET, StreamSpec, stream_specs

log = structlog.get_logger("autoserve.bus")

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class NatsUnavailable(ConnectionError):
    pass


async def connect(url: str, name: str, *, timeout: float | None = None, **options: object) -> Client:
    """Connect with unlimited reconnect attempts: a restarted server is rejoined by itself.

    A service waits for NATS as long as it takes (``timeout=None``); a command line gives up
    after ``timeout`` seconds with ``NatsUnavailable``.
    """
    errors = 0
    nc: Client | None = None

    async def disconnected() -> None:
        if nc is not None and not (nc.is_closed or nc.is_draining):
            log.warning("nats disconnected", client=name)

    async def reconnected() -> None:
        nonlocal errors
        errors = 0
        log.info("nats reconnected", client=name)

    async def error(exc: Exception) -> None:
        nonlocal errors
        errors += 1
        if errors in (1, 10) or errors % 100 == 0:  # one line per outage, not one per attempt
            log.warning("nats error", client=name, error=str(exc) or type(exc).__name__, attempts=errors)

    attempt = nats.connect(
        servers=[url],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
        error_cb=error,
        **options,  # type: ignore[arg-type]
    )
    try:
        nc = await asyncio.wait_for(attempt, timeout)
        return nc
    except TimeoutError:
        raise NatsUnavailable(f"cannot reach NATS at {url} within {timeout:g}s") from None


def _stream_config(spec: StreamSpec) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=spec.max_age_seconds,
        duplicate_window=spec.duplicate_window_seconds,
    )


async def provision(
    js: JetStreamContext,
    specs: tuple[StreamSpec, ...] | None = None,
) -> None:
    """Create the streams and KV buckets, or update them to the given retention."""
    for spec in specs or stream_specs():
        config = _stream_config(spec)
        try:
            await js.stream_info(spec.name)
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)
    for bucket, description in (
        (APPS_BUCKET, "AutoServe app specs, one key per app"),
        (SETTINGS_BUCKET, "AutoServe global settings (detector thresholds)"),
    ):
        try:
            await js.key_value(bucket)
        except BucketNotFoundError:
            await js.create_key_value(
                KeyValueConfig(bucket=bucket, description=description, history=5, storage=StorageType.FILE)
            )
