"""Connecting to NATS: seed lists, credentials, TLS (provisioning is ``provisioning``).

Credentials come from the environment, one variable per option, or from files they name
(``NatsAuth.from_env``); they are never logged, and a URL's ``user:password@`` is moved out
of the URL before anything can print it (``absorb_url_credentials``).

``AUTOSERVE_NATS_INBOX_PREFIX`` sets where this connection's replies arrive (JetStream API
answers, publish acks, KV watches and ordered consumers, request/reply). The deploy config
gives each user only its own prefix, ``_INBOX_<user>``, so no user can read another's
replies; the default, ``_INBOX``, is what nats-py (and every other client) uses.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
import structlog
from nats.aio.client import Client

from .observability import watch_nats

log = structlog.get_logger("autoserve.bus")

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
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


def seed_urls(url: str) -> list[str]:
    """The seeds of ``AUTOSERVE_NATS_URL`` / ``--nats-url``: a comma-separated list, each a
    node of one cluster (the client learns the others from the server)."""
    seeds = [seed.strip() for seed in url.split(",") if seed.strip()]
    if not seeds:
        raise NatsConfigError(f"AUTOSERVE_NATS_URL: {url!r} holds no URL")
    return seeds


def redact_url(url: str) -> str:
    """``nats://user:secret@host:4222`` -> ``nats://***@host:4222``, each seed of a list."""

    def redact(seed: str) -> str:
        parts = urlsplit(seed)
        if "@" not in parts.netloc:
            return seed
        return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))

    return ",".join(redact(seed) for seed in url.split(","))


def absorb_url_credentials(url: str | None, env: dict[str, str] | os._Environ[str] | None = None) -> str | None:
    """Move ``user:password@`` (or ``token@``) out of ``url`` into the environment variables
    ``connect`` reads, and return the URL without them: every later log line and every child
    process sees a clean URL, and children still get the credentials. In a seed list, the
    seeds that carry credentials must carry the same ones (one credential per cluster)."""
    if not url or "@" not in url:
        return url
    env = os.environ if env is None else env
    found: dict[str, str] = {}
    clean = []
    for seed in url.split(","):
        parts = urlsplit(seed.strip())
        if "@" not in parts.netloc:
            clean.append(seed.strip())
            continue
        if parts.password is not None:
            credential = {"AUTOSERVE_NATS_USER": parts.username or "", "AUTOSERVE_NATS_PASSWORD": parts.password}
        else:
            credential = {"AUTOSERVE_NATS_TOKEN": parts.username or ""}
        if found and credential != found:
            raise NatsConfigError(
                f"AUTOSERVE_NATS_URL: the seeds {redact_url(url)} carry different credentials; "
                "a cluster takes one (or set AUTOSERVE_NATS_USER and AUTOSERVE_NATS_PASSWORD)"
            )
        found = credential
        clean.append(urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])))
    env.update(found)
    return ",".join(clean)


# -- connecting ----------------------------------------------------------------------------


async def connect(
    url: str, name: str, *, timeout: float | None = None, auth: NatsAuth | None = None, **options: object
) -> Client:
    """Connect with unlimited reconnect attempts: a restarted server is rejoined by itself.

    ``url`` is one URL or a comma-separated seed list (``seed_urls``): nats-py tries the seeds
    in random order, learns the rest of the cluster from the servers it reaches, and on a lost
    connection reconnects to any of them. A service waits for NATS as long as it takes (``timeout=None``); a command line gives up
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
    attempt = nats.connect(servers=seed_urls(url), **{**settings, **auth.options(), **options})  # type: ignore[arg-type]
    try:
        nc = await asyncio.wait_for(attempt, timeout)
    except TimeoutError:
        raise NatsUnavailable(f"cannot reach NATS at {redact_url(url)} within {timeout:g}s") from None
    nc._autoserve_denied = denied  # type: ignore[attr-defined]  # read by provisioning: a denial, not an election
    watch_nats(nc)  # /readyz: every live client connected
    return nc


def permission_denials(nc: Client) -> list[str]:
    """The server's permission errors this connection got (the last 100), oldest first."""
    return list(getattr(nc, "_autoserve_denied", ()))
