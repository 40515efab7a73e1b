"""Provisioning the streams, KV buckets and durable consumers, and their replicas.

Provisioning is idempotent and works under least privilege: a stream or bucket that exists
with the wanted settings is only read (``STREAM.INFO``); creating or changing one is the
job of an admin credential (``autoserve apply``). A service whose credential may not create
a missing stream waits for it to appear instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Mapping

import nats.errors
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    KeyNotFoundError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, stop_never, wait_exponential

from autoserve_events import APPS_BUCKET, SETTINGS_BUCKET, StreamSpec, stream_specs
from autoserve_events.durables import durable_specs

from .bus import permission_denials
from .consumer import create_durable

log = structlog.get_logger("autoserve.provisioning")

# The recovery service's at-most-once claims (autoserve_recovery.adapters.claims): listed
# here so that an admin provisions every bucket and no service needs create rights.
CLAIMS_BUCKET = "autoserve-recovery-claims"
CLAIMS_TTL_SECONDS = 86_400.0
# Members and leases (autoserve_runtime.membership): keys carry their own TTL; an expiry
# leaves a marker (kept this long) so that the other members' watchers see it.
MEMBERS_BUCKET = "autoserve-members"
MEMBERS_MARKER_TTL_SECONDS = 60.0
WAIT_LOG_SECONDS = 30.0
# JetStream's answers when replicas cannot be placed: no suitable peers, insufficient
# resources, replicas > 1 on a server without a cluster.
_NO_PLACEMENT = {10005, 10023, 10074}
# What a request gets while a stream or the meta group elects a leader: no answer, no
# responders, or 503 "JetStream system temporarily unavailable".
ELECTION_ERRORS = (
    TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError, NoStreamResponseError,
    ServiceUnavailableError,
)  # fmt: skip


REPLICA_CHOICES = (1, 3, 5)


class ReplicasError(ValueError):
    """Replicas the cluster cannot hold; nothing was changed."""


def stream_replicas(env: Mapping[str, str] | None = None) -> int:
    """``AUTOSERVE_STREAM_REPLICAS``: the replicas of every stream and KV bucket (default 1)."""
    text = (os.environ if env is None else env).get("AUTOSERVE_STREAM_REPLICAS", "").strip() or "1"
    if text not in {str(n) for n in REPLICA_CHOICES}:
        raise ReplicasError(f"AUTOSERVE_STREAM_REPLICAS: must be one of 1, 3 or 5, got {text!r}")
    return int(text)


def cluster_size(nc: Client) -> int | None:
    """How many nodes the connected NATS has up: 1 without a cluster, else the servers the
    cluster advertises to clients (``connect_urls``, the connected one included once the
    cluster has formed); None when it advertises none (``no_advertise``): unknown, and the
    server's own placement error is the answer then."""
    info = nc._server_info  # the server's INFO, kept up to date by nats-py
    if not info.get("cluster"):
        return 1
    urls = set(info.get("connect_urls") or ())
    if not urls:
        return None
    if nc.connected_url is not None:
        urls.add(nc.connected_url.netloc)
    return len(urls)


def _denied(js: JetStreamContext, api_subject: str) -> bool:
    """Whether the server refused this connection ``api_subject``: a denied request is never
    answered (nats-server sends an -ERR and drops it), so its timeout alone cannot tell a
    denial from a stream electing its leader."""
    subject = api_subject.lower()  # nats-py lower-cases the server's -ERR text
    return any(subject in text for text in permission_denials(js._nc))


def _stream_config(spec: StreamSpec, replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=spec.max_age_seconds,
        duplicate_window=spec.duplicate_window_seconds,
        num_replicas=replicas,
    )


def _same(have: StreamConfig, want: StreamConfig) -> bool:
    def close(a: float | None, b: float | None) -> bool:
        return math.isclose(a or 0.0, b or 0.0, rel_tol=1e-6, abs_tol=1e-3)

    return (
        sorted(have.subjects or []) == sorted(want.subjects or [])
        and close(have.max_age, want.max_age)
        and close(have.duplicate_window, want.duplicate_window)
        and have.description == want.description
        and (have.retention, have.storage, have.discard) == (want.retention, want.storage, want.discard)
        and (have.num_replicas or 1) == (want.num_replicas or 1)
    )


def bucket_configs(replicas: int = 1) -> tuple[KeyValueConfig, ...]:
    """Every KV bucket the services use."""
    return (
        KeyValueConfig(bucket=APPS_BUCKET, description="AutoServe app specs, one key per app", history=5,
                       storage=StorageType.FILE, replicas=replicas),
        KeyValueConfig(bucket=SETTINGS_BUCKET, description="AutoServe global settings (detector thresholds)",
                       history=5, storage=StorageType.FILE, replicas=replicas),
        KeyValueConfig(bucket=CLAIMS_BUCKET, description="AutoServe recovery: at-most-once claims and instance leases",
                       history=1, ttl=CLAIMS_TTL_SECONDS, storage=StorageType.FILE, replicas=replicas),
        KeyValueConfig(bucket=MEMBERS_BUCKET, description="AutoServe members and leases, each key with its own TTL",
                       history=1, limit_marker_ttl=MEMBERS_MARKER_TTL_SECONDS, storage=StorageType.FILE,
                       replicas=replicas),
    )  # fmt: skip


async def live_keys(js: JetStreamContext, bucket: str) -> list[str]:
    """The keys of a KV bucket that hold a value now, sorted.

    Not nats-py's ``KeyValue.keys()``: its watcher can signal "no more keys" before the
    first one is handled when the server delivers them all before the consumer-info reply
    (num_pending is 0 and nothing is counted as received yet), so under load it returns
    too few keys. The stream's subject list is the server's own answer; a key whose last
    entry is a delete or purge marker is not live."""
    kv = await js.key_value(bucket)
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.>")
    prefix = f"$KV.{bucket}."
    keys = []
    for subject in sorted(info.state.subjects or {}):
        key = subject.removeprefix(prefix)
        try:
            await kv.get(key)  # raises KeyDeletedError (a KeyNotFoundError) for a marker
        except KeyNotFoundError:
            continue
        keys.append(key)
    return keys


async def _wait_for(what: str, exists: object, started: float) -> None:
    """Poll until ``exists()`` is true: an admin will create it (``autoserve apply``)."""
    next_log = 0.0
    while True:
        try:
            await exists()  # type: ignore[operator]
            log.info("found; continuing", what=what, waited=round(time.monotonic() - started, 1))
            return
        except (NotFoundError, BucketNotFoundError):
            pass
        now = time.monotonic()
        if now >= next_log:
            log.warning(
                "waiting for an admin to create it: run `autoserve apply` with an admin credential",
                what=what,
            )
            next_log = now + WAIT_LOG_SECONDS
        await asyncio.sleep(1.0)


async def _create_or_wait(js: JetStreamContext, stream: str, what: str, create: object, exists: object) -> None:
    started = time.monotonic()
    try:
        await create()  # type: ignore[operator]
    except (TimeoutError, nats.errors.TimeoutError):
        if not _denied(js, f"$JS.API.STREAM.CREATE.{stream}"):
            raise  # no answer during an election: provision tries again
        await _wait_for(what, exists, started)  # someone allowed to create it will


async def provision(
    js: JetStreamContext,
    specs: tuple[StreamSpec, ...] | None = None,
    *,
    durables: bool = False,
    replicas: int | None = None,
    patience: float | None = 60.0,
) -> dict[str, tuple[int, int]]:
    """Create the streams and KV buckets, or update the streams to the given retention;
    with ``durables``, every service's durable consumer too (``autoserve apply`` and
    ``autoserve up``, before anything publishes: autoserve_events.durables).

    ``replicas`` (``autoserve apply`` and ``up``: ``AUTOSERVE_STREAM_REPLICAS``) creates every
    stream and bucket with that many replicas and moves existing ones to it in place, stored
    messages kept. A service passes None: it creates what is missing with the environment's
    value and never changes an existing stream's replicas, so a service started with the
    default cannot put an R3 stream back to R1. Replicas beyond the cluster's nodes raise
    ``ReplicasError`` before anything changes. Returns the streams whose replicas moved,
    ``{name: (was, now)}`` (a KV bucket is the stream ``KV_<bucket>``).

    Under least privilege (a service's credential, no create or update rights), an existing
    stream with the right settings is left alone, one with other settings is used as it is
    (with a warning), and a missing one is waited for.

    A stream whose Raft group is electing a leader (a node just died, or the cluster just
    restarted on its stores) answers nothing for a few seconds: requests that time out are
    tried again, for ``patience`` seconds (None: as long as it takes, for a service)."""
    denials = permission_denials(js._nc)

    def electing(exc: BaseException) -> bool:  # not a request the server refused this credential
        return isinstance(exc, ELECTION_ERRORS) and permission_denials(js._nc) == denials

    async for attempt in AsyncRetrying(
        retry=retry_if_exception(electing),
        stop=stop_never if patience is None else stop_after_delay(patience),
        wait=wait_exponential(multiplier=0.25, max=2.0),
        before_sleep=lambda state: log.info("waiting for the streams' leaders", attempt=state.attempt_number),
        reraise=True,
    ):
        with attempt:
            return await _provision_once(js, specs, durables=durables, replicas=replicas)
    raise AssertionError("unreachable: the last attempt's error is raised")


async def _provision_once(
    js: JetStreamContext, specs: tuple[StreamSpec, ...] | None, *, durables: bool, replicas: int | None
) -> dict[str, tuple[int, int]]:
    wanted = stream_replicas() if replicas is None else replicas
    specs = specs or stream_specs()
    nodes = cluster_size(js._nc)
    if (
        replicas is not None
        and nodes is not None
        and replicas > nodes
        and await _replicas_to_place(js, specs, replicas)
    ):
        raise ReplicasError(
            f"AUTOSERVE_STREAM_REPLICAS={replicas} but the NATS cluster has {nodes} node(s) up: "
            f"a stream needs at least as many nodes as replicas; nothing was changed"
        )
    moved: dict[str, tuple[int, int]] = {}
    try:
        for spec in specs:
            await _provision_stream(js, _stream_config(spec, wanted), keep_replicas=replicas is None, moved=moved)
        for bucket in bucket_configs(wanted):
            await _provision_bucket(js, bucket, keep_replicas=replicas is None, moved=moved)
    except APIError as exc:
        if exc.err_code not in _NO_PLACEMENT:
            raise
        # Enough nodes in the cluster, but not enough up (or with room) right now.
        raise ReplicasError(
            f"AUTOSERVE_STREAM_REPLICAS={wanted}: NATS cannot place that many replicas "
            f"({exc.description}); the cluster has {nodes or 'an unknown number of'} node(s) up"
        ) from None
    for name, (_, now) in moved.items():
        await _wait_current(js, name, now)
    if durables:
        for durable in durable_specs():
            if await create_durable(js, durable):
                log.info("durable consumer created", stream=durable.stream, durable=durable.name,
                         starts=durable.start_seconds_ago)  # fmt: skip
    return moved


async def _replicas_to_place(js: JetStreamContext, specs: tuple[StreamSpec, ...], replicas: int) -> bool:
    """Whether a stream or bucket would be created or moved to ``replicas`` (a node down
    must not stop an apply that changes no replicas)."""
    names = [spec.name for spec in specs] + [f"KV_{bucket.bucket}" for bucket in bucket_configs()]
    for name in names:
        try:
            if ((await js.stream_info(name)).config.num_replicas or 1) != replicas:
                return True
        except NotFoundError:
            return True
    return False


async def _provision_stream(
    js: JetStreamContext, config: StreamConfig, *, keep_replicas: bool, moved: dict[str, tuple[int, int]]
) -> None:
    name = config.name or ""
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await _create_or_wait(js, name, f"stream {name}", lambda: js.add_stream(config), lambda: js.stream_info(name))
        return
    if keep_replicas:
        config.num_replicas = info.config.num_replicas
    if _same(info.config, config):
        return
    try:
        await js.update_stream(config)
    except (TimeoutError, nats.errors.TimeoutError):
        if not _denied(js, f"$JS.API.STREAM.UPDATE.{name}"):
            raise  # no answer during an election: provision tries again
        log.warning("stream settings differ from this version's, and this credential may not change them; "
                    "using the stream as it is", stream=name)  # fmt: skip
        return
    if (was := info.config.num_replicas or 1) != config.num_replicas:
        moved[name] = (was, config.num_replicas or 1)
        log.info("stream replicas changed", stream=name, was=was, now=config.num_replicas)


async def _wait_current(js: JetStreamContext, name: str, replicas: int, timeout: float = 60.0) -> None:
    """Until the stream's new Raft group has a leader and every follower has caught up: a
    write right after a replica change would otherwise time out during the election."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(*ELECTION_ERRORS):
            cluster = (await js.stream_info(name)).cluster
            followers = (cluster.replicas or []) if cluster else []
            if (
                (cluster is None or cluster.leader)
                and len(followers) == replicas - 1
                and all(peer.current for peer in followers)
            ):
                return
        await asyncio.sleep(0.2)
    raise ReplicasError(f"{name}: its {replicas} replicas did not catch up within {timeout:g}s; see the NATS logs")


async def _provision_bucket(
    js: JetStreamContext, bucket: KeyValueConfig, *, keep_replicas: bool, moved: dict[str, tuple[int, int]]
) -> None:
    """A missing bucket is created; an existing one only has its replicas moved (its other
    settings are the bucket's own, and a KV bucket is a stream named ``KV_<bucket>``)."""
    try:
        await js.key_value(bucket.bucket)
    except BucketNotFoundError:
        await _create_or_wait(
            js,
            f"KV_{bucket.bucket}",
            f"KV bucket {bucket.bucket}",
            lambda: js.create_key_value(bucket),
            lambda: js.key_value(bucket.bucket),
        )
        return
    if keep_replicas:
        return
    name = f"KV_{bucket.bucket}"
    info = await js.stream_info(name)
    if (was := info.config.num_replicas or 1) != bucket.replicas:
        info.config.num_replicas = bucket.replicas
        await js.update_stream(info.config)
        moved[name] = (was, bucket.replicas)
        log.info("stream replicas changed", stream=name, was=was, now=bucket.replicas)
