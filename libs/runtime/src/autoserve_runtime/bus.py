"""Connecting to NATS (credentials, TLS) and provisioning streams and KV buckets.

Credentials come from the environment, one variable per option, or from files they name
(``NatsAuth.from_env``); they are never logged, and a URL's ``user:password@`` is moved out
of the URL before anything can print it (``absorb_url_credentials``).

``AUTOSERVE_NATS_INBOX_PREFIX`` sets where this connection's replies arrive (JetStream API
answers, publish acks, KV watches and ordered consumers, request/reply). The deploy config
gives each user only its own prefix, ``_INBOX_<user>``, so no user can read another's
replies; the default, ``_INBOX``, is what nats-py (and every other client) uses.

Provisioning is idempotent and works under least privilege: a stream or bucket that exists
with the wanted settings is only read (``STREAM.INFO``); creating or changing one is the
job of an admin credential (``autoserve apply``). A service whose credential may not create
a missing stream waits for it to appear instead of failing.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import ssl
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

from autoserve_events import APPS_BUCKET, SETTINGS_BUCKET, StreamSpec, stream_specs
from autoserve_events.durables import durable_specs

from .consumer import create_durable
from .observability import watch_nats

log = structlog.get_logger("autoserve.bus")

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
# The recovery service's at-most-once claims (autoserve_recovery.adapters.claims): listed
# here so that an admin provisions every bucket and no service needs create rights.
CLAIMS_BUCKET = "autoserve-recovery-claims"
CLAIMS_TTL_SECONDS = 86_400.0
WAIT_LOG_SECONDS = 30.0
# Subject tokens without wildcards: the server grants `<prefix>.>` to subscribe to.
_INBOX_PREFIX = re.compile(r"^[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*$")


class NatsUnavailable(ConnectionError):
    pass


class NatsConfigError(ValueError):
    """A credential or TLS setting is wrong; the text names the variable (never its value)."""


# -- credentials ---------------------------------------------------------------------------


def _read_secret(var: str, path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise NatsConfigError(f"{var}: cannot read {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True, repr=False)
class NatsAuth:
    """How to authenticate to NATS. ``repr`` shows which options are set, never a secret."""

    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    inbox_prefix: str | None = None  # not a secret: where replies arrive (nats-py default _INBOX)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NatsAuth:
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            return env.get(f"AUTOSERVE_NATS_{name}") or None

        def secret(name: str) -> str | None:
            value, path = get(name), get(f"{name}_FILE")
            if value and path:
                raise NatsConfigError(f"AUTOSERVE_NATS_{name} and AUTOSERVE_NATS_{name}_FILE are both set: use one")
            return _read_secret(f"AUTOSERVE_NATS_{name}_FILE", path) if path else value

        auth = cls(
            user=get("USER"),
            password=secret("PASSWORD"),
            token=secret("TOKEN"),
            creds_file=get("CREDS"),
            nkey_seed_file=get("NKEY"),
            tls_ca=get("TLS_CA"),
            tls_cert=get("TLS_CERT"),
            tls_key=get("TLS_KEY"),
            inbox_prefix=get("INBOX_PREFIX"),
        )
        auth.check()
        return auth

    def check(self) -> None:
        if self.password and not self.user:
            raise NatsConfigError("AUTOSERVE_NATS_PASSWORD is set but AUTOSERVE_NATS_USER is not")
        kinds = [k for k, v in (("USER", self.user), ("TOKEN", self.token), ("CREDS", self.creds_file),
                                ("NKEY", self.nkey_seed_file)) if v]  # fmt: skip
        if len(kinds) > 1:
            raise NatsConfigError(f"more than one NATS credential is set ({', '.join(kinds)}): use one")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise NatsConfigError("AUTOSERVE_NATS_TLS_CERT and AUTOSERVE_NATS_TLS_KEY go together: set both or none")
        for var, path in (("CREDS", self.creds_file), ("NKEY", self.nkey_seed_file), ("TLS_CA", self.tls_ca),
                          ("TLS_CERT", self.tls_cert), ("TLS_KEY", self.tls_key)):  # fmt: skip
            if path and not Path(path).is_file():
                raise NatsConfigError(f"AUTOSERVE_NATS_{var}: no such file: {path}")
        if self.inbox_prefix is not None and not _INBOX_PREFIX.match(self.inbox_prefix):
            raise NatsConfigError(
                f"AUTOSERVE_NATS_INBOX_PREFIX: {self.inbox_prefix!r} is not a subject prefix "
                "(tokens of [A-Za-z0-9_$-] separated by dots, no wildcards, e.g. _INBOX_detector)"
            )

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def describe(self) -> str:
        """What a log line may say: the kind of credential and the user name, no secret."""
        kind = (
            f"user {self.user}" if self.user else "token" if self.token else
            "creds file" if self.creds_file else "nkey" if self.nkey_seed_file else "none"
        )  # fmt: skip
        inbox = f", inbox {self.inbox_prefix}" if self.inbox_prefix else ""
        return f"{kind}{', tls' if self.tls else ''}{inbox}"

    __repr__ = __str__ = describe

    def options(self) -> dict[str, object]:
        """Keyword arguments for ``nats.connect``."""
        options: dict[str, object] = {}
        if self.user:
            options |= {"user": self.user, "password": self.password or ""}
        if self.token:
            options["token"] = self.token
        if self.creds_file:
            options["user_credentials"] = self.creds_file
        if self.nkey_seed_file:
            options["nkeys_seed"] = self.nkey_seed_file
        if self.tls:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert and self.tls_key:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            options["tls"] = context
        if self.inbox_prefix:
            options["inbox_prefix"] = self.inbox_prefix
        return options


def redact_url(url: str) -> str:
    """``nats://user:secret@host:4222`` -> ``nats://***@host:4222``; anything else unchanged."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def absorb_url_credentials(url: str | None, env: dict[str, str] | os._Environ[str] | None = None) -> str | None:
    """Move ``user:password@`` (or ``token@``) out of ``url`` into the environment variables
    ``connect`` reads, and return the URL without them: every later log line and every child
    process sees a clean URL, and children still get the credentials."""
    if not url or "@" not in urlsplit(url).netloc:
        return url
    env = os.environ if env is None else env
    parts = urlsplit(url)
    if parts.password is not None:
        env["AUTOSERVE_NATS_USER"] = parts.username or ""
        env["AUTOSERVE_NATS_PASSWORD"] = parts.password
    elif parts.username:
        env["AUTOSERVE_NATS_TOKEN"] = parts.username
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


# -- connecting ----------------------------------------------------------------------------


async def connect(
    url: str, name: str, *, timeout: float | None = None, auth: NatsAuth | None = None, **options: object
) -> Client:
    """Connect with unlimited reconnect attempts: a restarted server is rejoined by itself.

    A service waits for NATS as long as it takes (``timeout=None``); a command line gives up
    after ``timeout`` seconds with ``NatsUnavailable``. Credentials and TLS come from ``auth``,
    by default from the environment (``NatsAuth.from_env``); explicit ``options`` win.
    """
    auth = NatsAuth.from_env() if auth is None else auth
    url = absorb_url_credentials(url, env := {}) or url
    if env:  # credentials in the URL itself: use them, never print them
        auth = NatsAuth.from_env({**os.environ, **env})
    errors = 0
    denied: deque[str] = deque(maxlen=100)
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
        text = str(exc) or type(exc).__name__
        if "permissions violation" in text.lower():
            # Least privilege at work, or a deployment that forgot a permission: say which.
            denied.append(text)
            log.error("nats permission denied", client=name, error=text, auth=auth.describe())
            return
        errors += 1
        if errors in (1, 10) or errors % 100 == 0:  # one line per outage, not one per attempt
            log.warning("nats error", client=name, error=text, attempts=errors)

    settings: dict[str, object] = {
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
        "error_cb": error,
    }
    attempt = nats.connect(servers=[url], **{**settings, **auth.options(), **options})  # type: ignore[arg-type]
    try:
        nc = await asyncio.wait_for(attempt, timeout)
    except TimeoutError:
        raise NatsUnavailable(f"cannot reach NATS at {redact_url(url)} within {timeout:g}s") from None
    nc._autoserve_denied = denied  # type: ignore[attr-defined]  # read by provisioning
    watch_nats(nc)  # /readyz: every live client connected
    return nc


def permission_denials(nc: Client) -> list[str]:
    """The server's permission errors this connection got (the last 100), oldest first."""
    return list(getattr(nc, "_autoserve_denied", ()))


# -- provisioning --------------------------------------------------------------------------


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


def _same(have: StreamConfig, want: StreamConfig) -> bool:
    def close(a: float | None, b: float | None) -> bool:
        return math.isclose(a or 0.0, b or 0.0, rel_tol=1e-6, abs_tol=1e-3)

    return (
        sorted(have.subjects or []) == sorted(want.subjects or [])
        and close(have.max_age, want.max_age)
        and close(have.duplicate_window, want.duplicate_window)
        and have.description == want.description
        and (have.retention, have.storage, have.discard) == (want.retention, want.storage, want.discard)
    )


def bucket_configs() -> tuple[KeyValueConfig, ...]:
    """Every KV bucket the services use."""
    return (
        KeyValueConfig(bucket=APPS_BUCKET, description="AutoServe app specs, one key per app", history=5,
                       storage=StorageType.FILE),
        KeyValueConfig(bucket=SETTINGS_BUCKET, description="AutoServe global settings (detector thresholds)",
                       history=5, storage=StorageType.FILE),
        KeyValueConfig(bucket=CLAIMS_BUCKET, description="AutoServe recovery: at-most-once claims and instance leases",
                       history=1, ttl=CLAIMS_TTL_SECONDS, storage=StorageType.FILE),
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


async def _create_or_wait(js: JetStreamContext, what: str, create: object, exists: object) -> None:
    started = time.monotonic()
    try:
        await create()  # type: ignore[operator]
    except (TimeoutError, nats.errors.TimeoutError):
        # A denied request is never answered: nats-server tells the client in an -ERR and
        # drops it, so the reply times out. Wait for someone allowed to create it.
        await _wait_for(what, exists, started)


async def provision(
    js: JetStreamContext,
    specs: tuple[StreamSpec, ...] | None = None,
    *,
    durables: bool = False,
) -> None:
    """Create the streams and KV buckets, or update the streams to the given retention;
    with ``durables``, every service's durable consumer too (``autoserve apply`` and
    ``autoserve up``, before anything publishes: autoserve_events.durables).

    Under least privilege (a service's credential, no create or update rights), an existing
    stream with the right settings is left alone, one with other settings is used as it is
    (with a warning), and a missing one is waited for."""
    for spec in specs or stream_specs():
        config = _stream_config(spec)
        try:
            info = await js.stream_info(spec.name)
        except NotFoundError:
            await _create_or_wait(
                js, f"stream {spec.name}", lambda c=config: js.add_stream(c), lambda n=spec.name: js.stream_info(n)
            )
            continue
        if _same(info.config, config):
            continue
        try:
            await js.update_stream(config)
        except (TimeoutError, nats.errors.TimeoutError):
            log.warning("stream settings differ from this version's, and this credential may not change them; "
                        "using the stream as it is", stream=spec.name)  # fmt: skip
    for bucket in bucket_configs():
        try:
            await js.key_value(bucket.bucket)
        except BucketNotFoundError:
            await _create_or_wait(
                js,
                f"KV bucket {bucket.bucket}",
                lambda b=bucket: js.create_key_value(b),
                lambda n=bucket.bucket: js.key_value(n),
            )
    if durables:
        for durable in durable_specs():
            if await create_durable(js, durable):
                log.info("durable consumer created", stream=durable.stream, durable=durable.name,
                         starts=durable.start_seconds_ago)  # fmt: skip
