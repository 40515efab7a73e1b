"""Bus security with a real nats-server running deploy/nats/nats-server.conf: each user may
publish only what its service owns, the operator user only reads, every user reads only its
own replies (its inbox prefix), the breaker answers only the requests it received, the admin
acks and silences alerts, bad credentials are refused, and a service without create rights
waits for the admin to provision."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from autoserve_cli.apply import store_config
from autoserve_config import load_config_text
from autoserve_events import (
    APPS_BUCKET,
    BREAKER_ALLOW_RPC,
    EVENTS_STREAM,
    PROBES_STREAM,
    AlertAcknowledged,
    AlertChanged,
    AllowReply,
    AllowRequest,
    BreakerStateChanged,
    ContainerObserved,
    Event,
    FailureDetected,
    FailureType,
    HealthChanged,
    NotificationLogged,
    ProbeCompleted,
    RecoveryExecuted,
    RecoveryStrategy,
    SilenceCreated,
    decode,
    decode_allow_reply,
    encode,
    encode_message,
    headers_for,
    subject_for,
)
from autoserve_runtime import EventPublisher, free_port, nats_server_binary, provision, spawn_child, stop_child
from autoserve_runtime.breaker_client import BreakerClient
from autoserve_runtime.bus import (
    CLAIMS_BUCKET,
    NatsAuth,
    NatsConfigError,
    absorb_url_credentials,
    connect,
    permission_denials,
    redact_url,
)

from ..conftest import plant_secret
from .conftest import LOCALHOST, check, config_for, wait_for

ROOT = Path(__file__).resolve().parents[2]
NATS_CONF = ROOT / "deploy" / "nats" / "nats-server.conf"
AUTOSERVE = str(Path(sys.executable).parent / "autoserve")
SERVICE_USERS = ("prober", "detector", "breaker", "recovery", "reporter", "alerter")
USERS = (*SERVICE_USERS, "admin", "operator", "client")


def inbox(user: str) -> str:
    """The user's inbox prefix, as the deploy config grants it (AUTOSERVE_NATS_INBOX_PREFIX)."""
    return f"_INBOX_{user}"


@dataclass
class SecureNats:
    """nats-server on the deploy config; every password planted, random, and recorded."""

    store: Path
    conf: Path = NATS_CONF
    port: int = field(default_factory=free_port)
    passwords: dict[str, str] = field(
        default_factory=lambda: {u: f"planted-{u}-{secrets.token_hex(12)}" for u in USERS}
    )
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        for user, password in self.passwords.items():
            plant_secret(password, f"nats password of {user}")  # the session's log scan looks for them

    @property
    def url(self) -> str:
        return f"nats://{LOCALHOST}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.store / "nats-server.log"

    def server_env(self) -> dict[str, str]:
        return {**os.environ, **{f"AUTOSERVE_{u.upper()}_PASSWORD": p for u, p in self.passwords.items()}}

    def start(self, timeout: float = 20.0) -> SecureNats:
        self.store.mkdir(parents=True, exist_ok=True)
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        command = [nats_server_binary(), "-c", str(self.conf), "-a", LOCALHOST, "-p", str(self.port),
                   "-sd", str(self.store / "js"), "-l", str(self.log_file)]  # fmt: skip
        self.process = spawn_child(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.server_env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            if self.log_file.exists():
                with self.log_file.open("rb") as log:
                    log.seek(offset)
                    if b"Server is ready" in log.read():
                        return self
            time.sleep(0.05)
        raise RuntimeError(f"nats-server not ready in {timeout}s; see {self.log_file}")

    def stop(self) -> None:
        if self.process is not None:
            stop_child(self.process)

    def violations(self) -> list[str]:
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return [line for line in text.splitlines() if "Violation" in line]

    def password_file(self, user: str, directory: Path) -> Path:
        path = directory / f"{user}.password"
        plant_secret(self.passwords[user], f"nats password of {user}", allowed_in=[path])
        path.write_text(self.passwords[user] + "\n")
        path.chmod(0o600)
        return path

    def env(self, user: str, directory: Path | None = None) -> dict[str, str]:
        """A service's environment: the URL, its user, its password (from a file if given)."""
        env = {"AUTOSERVE_NATS_URL": self.url, "AUTOSERVE_NATS_USER": user, "AUTOSERVE_NATS_INBOX_PREFIX": inbox(user)}
        if directory is not None:
            env["AUTOSERVE_NATS_PASSWORD_FILE"] = str(self.password_file(user, directory))
        else:
            env["AUTOSERVE_NATS_PASSWORD"] = self.passwords[user]
        return env

    def auth(self, user: str) -> NatsAuth:
        return NatsAuth(user=user, password=self.passwords[user], inbox_prefix=inbox(user))


@pytest.fixture
def secure_nats(tmp_path: Path) -> Iterator[SecureNats]:
    server = SecureNats(tmp_path / "secure-nats").start()
    yield server
    server.stop()


def refused(kind: str, subject: str) -> str:
    """The error nats-py hands to ``error_cb`` (it lower-cases the server's -ERR text)."""
    return f'nats: permissions violation for {kind} to "{subject.lower()}"'


@dataclass
class Session:
    """A raw nats-py connection as one user, recording the server's async errors."""

    nc: Client
    errors: list[str]

    async def refusals(self, action, timeout: float = 5.0) -> list[str]:  # type: ignore[no-untyped-def]
        """The errors the server sends for ``action``. A refusal (-ERR) is asynchronous and
        can come after the next PONG, so wait for it (bounded): only call this for an action
        that is expected to be refused; prove allowed ones by their effect."""
        before = len(self.errors)
        await action()
        await self.nc.flush(timeout=5)
        deadline = time.monotonic() + timeout
        while len(self.errors) == before and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.errors[before:]


async def session(server: SecureNats, user: str, inbox_prefix: str | None = None) -> Session:
    """``inbox_prefix`` defaults to the user's own (the operator has none: it only subscribes)."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        server.url, user=user, password=server.passwords[user], error_cb=on_error, max_reconnect_attempts=0,
        inbox_prefix=inbox_prefix or inbox(user),
    )  # fmt: skip
    return Session(nc, errors)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any NATS setting, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("AUTOSERVE_NATS_")}, **extra}


async def command(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """An ``autoserve`` command as the operator runs it, off the event loop."""
    run = subprocess.run
    return await asyncio.to_thread(run, [AUTOSERVE, *args], env=env, capture_output=True, text=True, timeout=60)


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status
    except OSError:
        return 0


async def stored(server: SecureNats, filter_subject: str) -> list[tuple[str, Event]]:
    """Every event in AUTOSERVE_EVENTS on ``filter_subject``, read as the admin."""
    admin = await connect(server.url, "test-admin-read", timeout=10, auth=server.auth("admin"))
    found: list[tuple[str, Event]] = []
    try:
        js = admin.jetstream()
        info = await js.stream_info(EVENTS_STREAM, subjects_filter=filter_subject)
        total = sum((info.state.subjects or {}).values())
        if total:
            sub = await js.subscribe(filter_subject, stream=EVENTS_STREAM, ordered_consumer=True,
                                     deliver_policy=DeliverPolicy.ALL)  # fmt: skip
            for _ in range(total):
                msg = await sub.next_msg(timeout=5)
                found.append((msg.subject, decode(msg.data)))
            await sub.unsubscribe()
    finally:
        await admin.close()
    return found


async def provisioned(server: SecureNats) -> None:
    nc = await connect(server.url, "test-admin", timeout=10, auth=server.auth("admin"))
    try:
        await provision(nc.jetstream())
        text = config_for({"web": {"health_check": check(path="/"), "instances": [{"id": "w-1", "host": LOCALHOST,
                                                                                     "port": 9}]}})  # fmt: skip
        await store_config(nc.jetstream(), load_config_text(text))
    finally:
        await nc.close()


T = 1_700_000_000.0
SAMPLES: dict[str, Event] = {
    "ProbeCompleted": ProbeCompleted(instance_id="w-1", app_name="web", check_type="http", is_healthy=False,
                                     response_time_ms=1.0, timestamp=T),
    "ContainerObserved": ContainerObserved(instance_id="w-1", app_name="web", container_id="c", event="die",
                                           timestamp=T),
    "HealthChanged": HealthChanged(instance_id="w-1", app_name="web", healthy=False, previous=True, consecutive=3,
                                   reason="test", timestamp=T),
    "FailureDetected": FailureDetected(failure_type=FailureType.PORT_NOT_LISTENING, instance_id="w-1",
                                       app_name="web", severity="high", message="planted", timestamp=T),
    "RecoveryExecuted": RecoveryExecuted(strategy=RecoveryStrategy.RESTART_CONTAINER, failure_type=None,
                                         instance_id="w-1", app_name="web", success=True, timestamp=T,
                                         duration_ms=1.0),
    "BreakerStateChanged": BreakerStateChanged(app_name="web", instance_id="w-1", state="open",
                                               previous_state="closed", consecutive_failures=5,
                                               consecutive_successes=0, reason="test", timestamp=T),
    "AlertChanged": AlertChanged(alert_id="a1b2c3d4e5f6", app_name="web", instance_id="w-1", status="firing",
                                 previous_status=None, failure_type="port_not_listening", severity="high",
                                 message="planted", timestamp=T, starts_at=T),
    "NotificationLogged": NotificationLogged(receiver="ops", group_key="web", outcome="sent", timestamp=T,
                                             app_name="web", firing=["a1b2c3d4e5f6"], attempts=1),
    "SilenceCreated": SilenceCreated(silence_id="s1", app_name="web", starts_at=T, ends_at=T + 3600,
                                     created_by="alerting.maintenance_windows", reason="window", timestamp=T,
                                     maintenance=True, window="nightly"),
    "AlertAcknowledged": AlertAcknowledged(alert_id="a1b2c3d4e5f6", app_name="web", instance_id="w-1",
                                           acknowledged_by="someone", timestamp=T),
}  # fmt: skip

# Which events each service's user may publish: what the service owns, nothing else.
OWNS: dict[str, set[str]] = {
    "prober": {"ProbeCompleted", "ContainerObserved"},
    "detector": {"HealthChanged", "FailureDetected"},
    "breaker": {"BreakerStateChanged"},
    "recovery": {"RecoveryExecuted", "FailureDetected"},  # panic mode is a critical FailureDetected
    "reporter": set(),
    # Alerts, its notification log, maintenance-window silences; an ack is an operator's (admin).
    "alerter": {"AlertChanged", "NotificationLogged", "SilenceCreated"},
}


@pytest.mark.parametrize("user", SERVICE_USERS)
async def test_each_service_user_publishes_only_the_events_its_service_owns(secure_nats: SecureNats, user: str) -> None:
    await provisioned(secure_nats)
    me = await session(secure_nats, user)
    js = me.nc.jetstream()
    try:
        for name, event in SAMPLES.items():
            subject = subject_for(event)
            if name in OWNS[user]:  # allowed: JetStream stores it
                ack = await js.publish(subject, encode(event), headers=headers_for(event), timeout=5)
                assert ack.stream in ("AUTOSERVE_PROBES", EVENTS_STREAM)
            else:
                errors = await me.refusals(lambda s=subject, e=event: me.nc.publish(s, encode(e)))
                assert errors == [refused("publish", subject)], (user, name, errors)
        if user != "prober":  # every consumer dead-letters what it cannot take; the prober consumes nothing
            ack = await js.publish(f"autoserve.deadletter.{user}", b"{}", timeout=5)
            assert ack.stream == EVENTS_STREAM
        other = "autoserve.deadletter.reporter" if user != "reporter" else "autoserve.deadletter.detector"
        assert await me.refusals(lambda: me.nc.publish(other, b"{}")) == [refused("publish", other)]
        # No service may create, delete or purge streams, nor write the config.
        for api in ("$JS.API.STREAM.CREATE.X", f"$JS.API.STREAM.DELETE.{EVENTS_STREAM}",
                    f"$JS.API.STREAM.PURGE.{EVENTS_STREAM}", "$KV.autoserve-apps.web"):  # fmt: skip
            assert await me.refusals(lambda a=api: me.nc.publish(a, b"{}")) == [refused("publish", api)]
    finally:
        await me.nc.close()


async def test_a_prober_credential_publishing_failure_detected_is_refused_and_nothing_is_stored(
    secure_nats: SecureNats,
) -> None:
    await provisioned(secure_nats)
    prober = await connect(secure_nats.url, "test-prober", timeout=10, auth=secure_nats.auth("prober"))
    event = SAMPLES["FailureDetected"]
    try:
        with pytest.raises(nats.errors.TimeoutError):  # JetStream never sees it, so no ack comes
            await prober.jetstream().publish(subject_for(event), encode(event), headers=headers_for(event), timeout=2)
        assert permission_denials(prober) == [refused("publish", subject_for(event))]
    finally:
        await prober.close()
    admin = await connect(secure_nats.url, "test-admin", timeout=10, auth=secure_nats.auth("admin"))
    try:
        info = await admin.jetstream().stream_info(EVENTS_STREAM)
        assert info.state.messages == 0
    finally:
        await admin.close()
    assert any("user:prober" in line and "autoserve.event.failure.web.w-1" in line for line in secure_nats.violations())


async def test_the_operator_user_reads_failure_events_and_can_do_nothing_else(secure_nats: SecureNats) -> None:
    await provisioned(secure_nats)
    operator = await session(secure_nats, "operator")
    detector = await session(secure_nats, "detector")
    received: list[str] = []

    async def on_failure(msg: Msg) -> None:
        received.append(msg.subject)

    try:
        await operator.nc.subscribe("autoserve.event.failure.>", cb=on_failure)
        await operator.nc.flush()
        await detector.nc.publish(subject_for(SAMPLES["FailureDetected"]), encode(SAMPLES["FailureDetected"]))
        await wait_for(lambda: received == ["autoserve.event.failure.web.w-1"], timeout=10, what="the failure event")
        for subject in ("autoserve.event.failure.web.w-1", "autoserve.probe.completed.web.w-1",
                        "autoserve.rpc.breaker.override", "$JS.API.STREAM.INFO.AUTOSERVE_EVENTS"):  # fmt: skip
            assert await operator.refusals(lambda s=subject: operator.nc.publish(s, b"{}")) == [
                refused("publish", subject)
            ]
        for subject in ("autoserve.probe.>", "_INBOX.>", "autoserve.rpc.breaker.allow", ">"):
            errors = await operator.refusals(lambda s=subject: operator.nc.subscribe(s))
            assert errors == [refused("subscription", subject)], errors
    finally:
        await operator.nc.close()
        await detector.nc.close()


async def test_wrong_or_missing_credentials_are_refused(secure_nats: SecureNats) -> None:
    with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
        await nats.connect(secure_nats.url, user="prober", password="wrong", max_reconnect_attempts=0,
                           allow_reconnect=False, connect_timeout=5)  # fmt: skip
    with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
        await nats.connect(secure_nats.url, max_reconnect_attempts=0, allow_reconnect=False, connect_timeout=5)


async def test_a_service_without_create_rights_waits_for_the_admin_to_provision(secure_nats: SecureNats) -> None:
    detector = await connect(secure_nats.url, "test-detector", timeout=10, auth=secure_nats.auth("detector"))
    try:
        waiting = asyncio.create_task(provision(detector.jetstream()))
        await wait_for(lambda: bool(permission_denials(detector)), timeout=20, what="the create to be refused")
        assert permission_denials(detector)[0] == refused("publish", "$JS.API.STREAM.CREATE.AUTOSERVE_PROBES")
        assert not waiting.done()
        await provisioned(secure_nats)
        await asyncio.wait_for(waiting, 30)
        # Provisioned now: a second start only reads, and is refused nothing.
        denied = len(permission_denials(detector))
        await asyncio.wait_for(provision(detector.jetstream()), 10)
        assert len(permission_denials(detector)) == denied
    finally:
        await detector.close()


async def test_credentials_from_files_and_tls(
    tmp_path: Path, secure_nats: SecureNats, named_cert: tuple[Path, Path]
) -> None:
    env = secure_nats.env("prober", tmp_path)
    auth = NatsAuth.from_env(env)
    assert secure_nats.passwords["prober"] not in repr(auth) + str(auth)
    assert repr(auth) == "user prober, inbox _INBOX_prober"
    nc = await connect(secure_nats.url, "from-file", timeout=10, auth=auth)
    await nc.close()
    # TLS: a server with the (optional) tls block, a client trusting its CA.
    cert, key = named_cert
    conf = tmp_path / "tls.conf"
    conf.write_text(NATS_CONF.read_text() + f'tls {{ cert_file: "{cert}", key_file: "{key}", timeout: 2 }}\n')
    tls_server = SecureNats(tmp_path / "tls-nats", conf=conf, passwords=secure_nats.passwords).start()
    try:
        secure = NatsAuth.from_env({**env, "AUTOSERVE_NATS_TLS_CA": str(cert)})
        assert repr(secure) == "user prober, tls, inbox _INBOX_prober"
        nc = await connect(f"tls://{LOCALHOST}:{tls_server.port}", "tls", timeout=10, auth=secure)
        assert nc.is_connected
        await nc.close()
        with pytest.raises((ssl.SSLError, nats.errors.Error, OSError)):  # no CA: the self-signed cert is untrusted
            await connect(f"tls://{LOCALHOST}:{tls_server.port}", "tls", timeout=5,
                          auth=NatsAuth.from_env(env), max_reconnect_attempts=0, allow_reconnect=False)  # fmt: skip
    finally:
        tls_server.stop()


def test_credential_settings_are_checked_and_named_without_their_values(tmp_path: Path) -> None:
    with pytest.raises(NatsConfigError, match="AUTOSERVE_NATS_PASSWORD and AUTOSERVE_NATS_PASSWORD_FILE"):
        NatsAuth.from_env({"AUTOSERVE_NATS_USER": "u", "AUTOSERVE_NATS_PASSWORD": "s3cret",
                           "AUTOSERVE_NATS_PASSWORD_FILE": "/x"})  # fmt: skip
    with pytest.raises(NatsConfigError, match=r"AUTOSERVE_NATS_PASSWORD_FILE: cannot read /nonexistent/pw"):
        NatsAuth.from_env({"AUTOSERVE_NATS_USER": "u", "AUTOSERVE_NATS_PASSWORD_FILE": "/nonexistent/pw"})
    with pytest.raises(NatsConfigError, match="AUTOSERVE_NATS_PASSWORD is set but AUTOSERVE_NATS_USER is not"):
        NatsAuth.from_env({"AUTOSERVE_NATS_PASSWORD": "s3cret"})
    with pytest.raises(NatsConfigError, match=r"more than one NATS credential is set \(USER, TOKEN\)"):
        NatsAuth.from_env({"AUTOSERVE_NATS_USER": "u", "AUTOSERVE_NATS_TOKEN": "t"})
    with pytest.raises(NatsConfigError, match=r"AUTOSERVE_NATS_TLS_CA: no such file: /nonexistent/ca\.pem"):
        NatsAuth.from_env({"AUTOSERVE_NATS_TLS_CA": "/nonexistent/ca.pem"})
    for bad in ("_INBOX.>", "_INBOX_*", "_INBOX.", "my inbox"):
        with pytest.raises(NatsConfigError, match=r"AUTOSERVE_NATS_INBOX_PREFIX: .* is not a subject prefix"):
            NatsAuth.from_env({"AUTOSERVE_NATS_INBOX_PREFIX": bad})
    mine = NatsAuth.from_env({"AUTOSERVE_NATS_INBOX_PREFIX": "_INBOX_detector"})
    assert mine.options() == {"inbox_prefix": "_INBOX_detector"} and repr(mine) == "none, inbox _INBOX_detector"
    assert NatsAuth.from_env({}).options() == {}  # nats-py's default, _INBOX
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    auth = NatsAuth.from_env({"AUTOSERVE_NATS_TOKEN_FILE": str(token)})
    assert auth.options() == {"token": "tok-123"} and repr(auth) == "token"
    try:
        NatsAuth.from_env(
            {"AUTOSERVE_NATS_USER": "u", "AUTOSERVE_NATS_PASSWORD": "s3cret", "AUTOSERVE_NATS_TOKEN": "x"}
        )
    except NatsConfigError as exc:
        assert "s3cret" not in str(exc)


def test_urls_with_credentials_are_redacted_and_their_credentials_moved_to_the_environment() -> None:
    assert redact_url("nats://svc:s3cret@nats.example:4222") == "nats://***@nats.example:4222"
    assert redact_url("tls://tok@nats.example") == "tls://***@nats.example"
    assert redact_url("nats://nats.example:4222") == "nats://nats.example:4222"
    env: dict[str, str] = {}
    assert absorb_url_credentials("nats://svc:s3cret@nats.example:4222", env) == "nats://nats.example:4222"
    assert env == {"AUTOSERVE_NATS_USER": "svc", "AUTOSERVE_NATS_PASSWORD": "s3cret"}
    env = {}
    assert absorb_url_credentials("nats://tok@h:1", env) == "nats://h:1" and env == {"AUTOSERVE_NATS_TOKEN": "tok"}
    assert absorb_url_credentials(None, env) is None


def test_the_committed_nats_config_is_the_generated_one() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_nats_conf.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stderr}\nregenerate with: make deploy-config"


# -- replies are private: each user subscribes only under its own inbox prefix --------------


async def test_each_user_reads_only_its_own_replies(secure_nats: SecureNats) -> None:
    await provisioned(secure_nats)
    users = [u for u in USERS if u != "operator"]  # the operator subscribes to events only
    for user in users:
        me = await session(secure_nats, user)
        try:
            # Its own inbox works: a reply reaches it (JetStream's, or "no responders" for the client).
            if user == "client":
                with pytest.raises(nats.errors.NoRespondersError):
                    await me.nc.request(BREAKER_ALLOW_RPC, b"{}", timeout=5)
            else:
                assert (await me.nc.jetstream().stream_info(EVENTS_STREAM)).config.name == EVENTS_STREAM
            # Anyone else's replies, or everyone's, it may not read.
            for subject in ("_INBOX.>", *(f"{inbox(u)}.>" for u in users if u != user), ">"):
                errors = await me.refusals(lambda s=subject, m=me: m.nc.subscribe(s))
                assert errors == [refused("subscription", subject)], (user, subject, errors)
        finally:
            await me.nc.close()


async def test_with_its_inbox_prefix_a_service_gets_every_kind_of_reply(secure_nats: SecureNats) -> None:
    from autoserve_recovery.feeds import work_subscription

    await provisioned(secure_nats)
    prober = await session(secure_nats, "prober")
    detector = await connect(secure_nats.url, "test-detector", timeout=10, auth=secure_nats.auth("detector"))
    recovery = await connect(secure_nats.url, "test-recovery", timeout=10, auth=secure_nats.auth("recovery"))
    try:
        js, rjs = detector.jetstream(), recovery.jetstream()
        await provision(js)  # JetStream API answers: stream and bucket info
        probe = SAMPLES["ProbeCompleted"]
        await prober.nc.jetstream().publish(subject_for(probe), encode(probe), headers=headers_for(probe), timeout=5)
        work = await work_subscription(rjs, ack_wait=30)  # recovery's pull consumer
        # A publish ack (request/reply), and the publisher's acks on one wildcard inbox.
        health = SAMPLES["HealthChanged"]
        await js.publish(subject_for(health), encode(health), headers=headers_for(health), timeout=5)
        publisher = EventPublisher(js).start()
        assert await asyncio.wait_for(publisher.submit(SAMPLES["FailureDetected"], track=True), 10)  # type: ignore[arg-type]
        await publisher.close()
        # A KV watch (an ordered consumer delivering to an inbox) and an ordered replay.
        watcher = await (await js.key_value(APPS_BUCKET)).watchall()
        assert (await watcher.updates(timeout=5)).key == "web"  # type: ignore[union-attr]
        await watcher.stop()
        replay = await js.subscribe(probe_subject := subject_for(probe), stream=PROBES_STREAM, ordered_consumer=True,
                                    deliver_policy=DeliverPolicy.ALL)  # fmt: skip
        assert (await replay.next_msg(timeout=5)).subject == probe_subject
        await replay.unsubscribe()
        # Recovery: a pull fetch (its replies on an inbox) and its claims bucket (direct gets).
        fetched = await work.fetch(2, timeout=5)
        assert [type(decode(m.data)).__name__ for m in fetched] == ["HealthChanged", "FailureDetected"]
        for msg in fetched:
            await msg.ack()
        claims = await rjs.key_value(CLAIMS_BUCKET)
        await claims.create("web.w-1", b"r1")
        assert (await claims.get("web.w-1")).value == b"r1"
        assert permission_denials(detector) == permission_denials(recovery) == []
    finally:
        for nc in (prober.nc, detector, recovery):
            await nc.close()
    assert secure_nats.violations() == []


async def test_a_client_without_its_inbox_prefix_is_refused_its_replies(secure_nats: SecureNats) -> None:
    """The failure mode of a forgotten AUTOSERVE_NATS_INBOX_PREFIX: loud, and named."""
    await provisioned(secure_nats)
    auth = NatsAuth(user="detector", password=secure_nats.passwords["detector"])  # default _INBOX
    detector = await connect(secure_nats.url, "test-detector", timeout=10, auth=auth)
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await detector.jetstream(timeout=2).stream_info(EVENTS_STREAM)
        (denied,) = permission_denials(detector)
        assert denied.startswith('nats: permissions violation for subscription to "_inbox.'), denied
    finally:
        await detector.close()


# -- the breaker answers requests, and nothing else on anyone's inbox -----------------------


def breaker_violations(server: SecureNats) -> list[str]:
    return [line for line in server.violations() if "user:breaker" in line]


async def test_the_breaker_answers_only_the_requests_it_received_once_each(
    tmp_path: Path, secure_nats: SecureNats
) -> None:
    await provisioned(secure_nats)
    client = await session(secure_nats, "client")
    raw = await session(secure_nats, "breaker")  # a breaker credential, used by hand
    breaker: subprocess.Popen[bytes] | None = None
    try:
        # By hand: one answer per request goes through (allow_responses, max 1), a second is refused.
        async def answer_twice(msg: Msg) -> None:
            await raw.nc.publish(msg.reply, b"first")
            await raw.nc.publish(msg.reply, b"second")

        await raw.nc.subscribe(BREAKER_ALLOW_RPC, cb=answer_twice)
        await raw.nc.flush()
        before = len(raw.errors)
        reply = await client.nc.request(BREAKER_ALLOW_RPC, b"{}", timeout=5)
        assert reply.data == b"first" and reply.subject.startswith(inbox("client") + ".")
        await wait_for(lambda: len(raw.errors) > before, timeout=5, what="the second answer refused")
        assert raw.errors[before:] == [refused("publish", reply.subject)]
        # Nobody's inbox is open to it otherwise: it cannot forge a reply to a JetStream call.
        for subject in ("_INBOX.x", f"{inbox('client')}.x", f"{inbox('admin')}.x.y", f"{inbox('recovery')}.x"):
            assert await raw.refusals(lambda s=subject: raw.nc.publish(s, b"{}")) == [refused("publish", subject)]
        await raw.nc.close()
        by_hand = breaker_violations(secure_nats)

        # The real breaker, as deployed, answers a client's allow and an admin's override.
        port = free_port()
        env = clean_env(**secure_nats.env("breaker"), AUTOSERVE_METRICS_PORT=str(port))
        with (tmp_path / "breaker.log").open("wb") as log:
            breaker = spawn_child([AUTOSERVE, "run", "breaker"], env=env, stdout=log, stderr=subprocess.STDOUT)
        await wait_for(lambda: get(f"http://{LOCALHOST}:{port}/readyz") == 200 or breaker.poll() is not None,
                       timeout=60, what="breaker ready")  # fmt: skip
        assert breaker.poll() is None, (tmp_path / "breaker.log").read_text()[-3000:]
        answer = await BreakerClient(client.nc, timeout=5).check("web", "w-1")
        assert (answer.allow, answer.state, answer.known) == (True, "closed", True)
        raw_answer = await client.nc.request(
            BREAKER_ALLOW_RPC, encode_message(AllowRequest(app_name="web", instance_id="w-1")), timeout=5
        )
        assert decode_allow_reply(raw_answer.data) == AllowReply(allow=True, state="closed", known=True)
        opened = await command("breaker", "open", "web", "w-1", env=clean_env(**secure_nats.env("admin")))
        assert opened.returncode == 0, opened.stderr
        assert opened.stdout.startswith("web/w-1: open (held until `autoserve breaker reset`)")
        assert not (await BreakerClient(client.nc, timeout=5).check("web", "w-1")).allow
    finally:
        if breaker is not None:
            stop_child(breaker)
        for nc in (client.nc, raw.nc):
            await nc.close()
    assert breaker_violations(secure_nats) == by_hand  # the service was refused nothing
    log_text = (tmp_path / "breaker.log").read_text()
    assert "permission denied" not in log_text, log_text[-3000:]


# -- operators ack and silence alerts with the admin credential ----------------------------


async def test_the_admin_acks_and_silences_alerts_and_the_operator_may_not(
    tmp_path: Path, secure_nats: SecureNats
) -> None:
    await provisioned(secure_nats)
    alerter = await session(secure_nats, "alerter")
    alert = SAMPLES["AlertChanged"]
    try:
        await alerter.nc.jetstream().publish(subject_for(alert), encode(alert), headers=headers_for(alert), timeout=5)
    finally:
        await alerter.nc.close()
    admin_env = clean_env(**secure_nats.env("admin", tmp_path))
    operator_env = clean_env(**secure_nats.env("operator", tmp_path))

    acked = await command("alerts", "ack", "a1b2", "--by", "ops@example", "--comment", "on it", env=admin_env)
    assert acked.returncode == 0, acked.stderr
    assert acked.stdout.startswith("acknowledged a1b2c3d4e5f6 (web/w-1 port_not_listening) as ops@example")
    silenced = await command("alerts", "silence", "--app", "web", "--for", "2h", "--reason", "planned upgrade",
                             "--by", "ops@example", env=admin_env)  # fmt: skip
    assert silenced.returncode == 0, silenced.stderr
    assert silenced.stdout.startswith("silenced web until ")

    # The events landed in AUTOSERVE_EVENTS, on the subjects the alerter folds.
    (ack_subject, ack), = await stored(secure_nats, "autoserve.event.alert.ack.>")  # fmt: skip
    assert ack_subject == "autoserve.event.alert.ack.web" and isinstance(ack, AlertAcknowledged)
    assert (ack.alert_id, ack.acknowledged_by, ack.comment) == ("a1b2c3d4e5f6", "ops@example", "on it")
    (silence_subject, silence), = await stored(secure_nats, "autoserve.event.alert.silence.>")  # fmt: skip
    assert silence_subject == "autoserve.event.alert.silence.web" and isinstance(silence, SilenceCreated)
    assert (silence.app_name, silence.instance_id, silence.reason) == ("web", "", "planned upgrade")
    assert round(silence.ends_at - silence.starts_at) == 7200
    assert [line for line in secure_nats.violations() if "user:admin" in line] == []

    # The read-only operator may not: neither through the command nor by hand.
    for args in (("alerts", "ack", "a1b2"), ("alerts", "silence", "--app", "web", "--for", "1h", "--reason", "x")):
        refused_run = await command(*args, env=operator_env)
        assert refused_run.returncode != 0, refused_run.stdout
        assert "nats permission denied" in refused_run.stderr and "user operator" in refused_run.stderr
        assert secure_nats.passwords["operator"] not in refused_run.stdout + refused_run.stderr
    operator = await session(secure_nats, "operator")
    try:
        for name in ("AlertAcknowledged", "SilenceCreated"):
            subject = subject_for(SAMPLES[name])
            errors = await operator.refusals(lambda s=subject, n=name: operator.nc.publish(s, encode(SAMPLES[n])))
            assert errors == [refused("publish", subject)]
    finally:
        await operator.nc.close()
    assert len(await stored(secure_nats, "autoserve.event.alert.ack.>")) == 1
    assert len(await stored(secure_nats, "autoserve.event.alert.silence.>")) == 1
    assert any("user:operator" in line for line in secure_nats.violations())


def test_every_deploy_file_gives_each_user_its_own_inbox_prefix() -> None:
    """The prefixes the config grants (proven live above) are the ones the deploy files set."""
    import yaml

    deploy = ROOT / "deploy"
    compose = yaml.safe_load((deploy / "compose" / "compose.yaml").read_text())["services"]
    users = {spec["environment"]["AUTOSERVE_NATS_USER"]: spec["environment"] for spec in compose.values()
             if "AUTOSERVE_NATS_USER" in spec.get("environment", {})}  # fmt: skip
    assert set(users) == {*SERVICE_USERS, "admin"}
    assert all(env["AUTOSERVE_NATS_INBOX_PREFIX"] == inbox(user) for user, env in users.items()), users
    pods = [d["spec"]["template"]["spec"] for d in yaml.safe_load_all((deploy / "k8s" / "autoserve.yaml").read_text())
            if d["kind"] == "Deployment"]  # fmt: skip
    envs = [{e["name"]: e.get("value") for e in pod["containers"][0]["env"]} for pod in pods]
    assert sorted(env["AUTOSERVE_NATS_USER"] for env in envs) == sorted(SERVICE_USERS)
    assert all(env["AUTOSERVE_NATS_INBOX_PREFIX"] == inbox(env["AUTOSERVE_NATS_USER"]) for env in envs), envs
    unit = (deploy / "systemd" / "autoserve@.service").read_text()
    assert (
        "Environment=AUTOSERVE_NATS_USER=%i\n" in unit and "Environment=AUTOSERVE_NATS_INBOX_PREFIX=_INBOX_%i\n" in unit
    )


async def signed_in_round_trip(nc: Client) -> None:
    """A message published and received on the signed-in connection, which is then closed."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def on_message(msg: Msg) -> None:
        if not got.done():
            got.set_result(msg.data)

    await nc.subscribe("autoserve.auth.check", cb=on_message)
    await nc.publish("autoserve.auth.check", b"signed in")
    assert await asyncio.wait_for(got, 10) == b"signed in"
    await nc.close()


async def test_an_nkey_user_connects_with_its_seed_file_and_a_wrong_seed_is_refused(tmp_path: Path) -> None:
    """AUTOSERVE_NATS_NKEY: the server knows the user only by its public key; the client
    signs the server's nonce with the seed (nats-py's nkeys extra, installed)."""
    import nkeys

    def seed_file(name: str) -> tuple[Path, str]:
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        path = tmp_path / f"{name}.nk"
        plant_secret(seed, f"nkey seed of {name}", allowed_in=[path])
        path.write_bytes(seed + b"\n")
        path.chmod(0o600)
        return path, nkeys.from_seed(bytearray(seed)).public_key.decode()

    good, public = seed_file("service")
    wrong, _ = seed_file("stranger")
    conf = tmp_path / "nkey.conf"
    conf.write_text(f'jetstream {{}}\nauthorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    server = SecureNats(tmp_path / "nkey-nats", conf=conf).start()
    try:
        auth = NatsAuth.from_env({"AUTOSERVE_NATS_NKEY": str(good)})
        assert repr(auth) == "nkey" and good.read_text().strip() not in repr(auth) + str(auth.describe())
        nc = await connect(server.url, "nkey", timeout=10, auth=auth)
        await signed_in_round_trip(nc)
        with pytest.raises((nats.errors.Error, OSError)):
            await connect(server.url, "stranger", timeout=5, auth=NatsAuth.from_env({"AUTOSERVE_NATS_NKEY": str(wrong)}),
                          max_reconnect_attempts=0, allow_reconnect=False)  # fmt: skip
    finally:
        server.stop()


def signed_jwt(issuer: Any, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
    """A NATS JWT (v2) signed by ``issuer``'s nkey, as ``nsc`` writes them."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    claims = {"iat": int(time.time()), "iss": issuer.public_key.decode(), "name": name, "sub": subject,
              "nats": {"version": 2, **nats_claims}}  # fmt: skip
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims).encode()).digest()).decode().rstrip("=")
    header = b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    signed = f"{header}.{b64(json.dumps(claims).encode())}"
    return f"{signed}.{b64(issuer.sign(signed.encode()))}"


async def test_a_creds_file_signs_in_on_an_operator_mode_server_and_an_untrusted_one_is_refused(tmp_path: Path) -> None:
    """AUTOSERVE_NATS_CREDS: a user JWT and its seed in one file (the decentralised auth of
    ``nsc``). The operator trusts one account; a user issued by another is refused."""
    import nkeys

    def keypair(prefix: int) -> tuple[bytes, Any]:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return seed, nkeys.from_seed(bytearray(seed))

    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
                 "conn": -1, "leaf": -1}  # fmt: skip
    _, operator = keypair(nkeys.PREFIX_BYTE_OPERATOR)
    _, account = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    _, stranger = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    account_pub = account.public_key.decode()
    conf = tmp_path / "operator.conf"
    conf.write_text(
        f'operator: "{signed_jwt(operator, operator.public_key.decode(), "test", {"type": "operator"})}"\n'
        f"resolver: MEMORY\n"
        f'resolver_preload: {{ {account_pub}: "{signed_jwt(operator, account_pub, "autoserve", {"type": "account", "limits": unlimited})}" }}\n'
    )

    def creds(name: str, issuer: Any) -> Path:
        seed, user = keypair(nkeys.PREFIX_BYTE_USER)
        token = signed_jwt(issuer, user.public_key.decode(), name, {"type": "user", "pub": {}, "sub": {},
                                                                     "subs": -1, "data": -1, "payload": -1})  # fmt: skip
        path = tmp_path / f"{name}.creds"
        plant_secret(seed, f"creds seed of {name}", allowed_in=[path])
        path.write_text(f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
                        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n")  # fmt: skip
        path.chmod(0o600)
        return path

    good, untrusted = creds("prober", account), creds("intruder", stranger)
    server = SecureNats(tmp_path / "operator-nats", conf=conf).start()
    try:
        auth = NatsAuth.from_env({"AUTOSERVE_NATS_CREDS": str(good)})
        assert repr(auth) == "creds file"
        nc = await connect(server.url, "creds", timeout=10, auth=auth)
        await signed_in_round_trip(nc)
        with pytest.raises((nats.errors.Error, OSError)):
            await connect(server.url, "intruder", timeout=5,
                          auth=NatsAuth.from_env({"AUTOSERVE_NATS_CREDS": str(untrusted)}),
                          max_reconnect_attempts=0, allow_reconnect=False)  # fmt: skip
    finally:
        server.stop()
