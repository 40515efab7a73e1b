# ruff: noqa: F811  (fixtures imported from test_alerter are used as parameters)
"""The alerter's receivers where they must not leak or wander: redirects not followed, errors
naming only scheme, host and port, a bug in a receiver or in a tick, STARTTLS verified, SMTP
bounded by its timeout, misconfigured receivers refusing to send."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import structlog.testing
from aiohttp import ClientSession, web
from nats.aio.client import Client

from autoserve_alerter.adapters.receivers import DeliveryError, EmailReceiver, build_receivers
from autoserve_alerter.core.alerter import Alerter, Decisions, Notification
from autoserve_config import ReceiverConfig, parse_config
from autoserve_events import AlertChanged
from autoserve_runtime import free_port, provision

from ..support.web import serving_app
from .conftest import LOCALHOST, Outputs, ServiceRunner, apply_yaml, wait_for
from .test_alerter import Hook, alerter, config, crash, hook, logs, publish, webhook  # noqa: F401


@dataclass
class Trap:
    """Answers a receiver in the ways that must not leak or wander: redirects, errors."""

    port: int
    landed: list[bytes] = field(default_factory=list)

    def url(self, path: str, userinfo: str = "") -> str:
        return f"http://{userinfo}{LOCALHOST}:{self.port}{path}"


@pytest.fixture
async def trap() -> AsyncIterator[Trap]:
    target = Trap(free_port())

    async def moved(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["status"]), headers={"Location": "/landed"})

    async def landed(request: web.Request) -> web.Response:
        target.landed.append(await request.read())
        return web.Response(text="ok")

    async def broken(_: web.Request) -> web.Response:
        return web.Response(status=500, text="boom")

    app = web.Application()
    app.router.add_post("/moved/{status}", moved)
    app.router.add_post("/landed", landed)
    app.router.add_post("/services/{rest:.*}", broken)
    async with serving_app(app, target.port):
        yield target


def a_notification() -> Notification:
    """A real notification, as the core decides it for one crash."""
    core = Alerter(parse_config({"alerting": {"receivers": {"x": {"type": "webhook", "url": "http://127.0.0.1:9/x"}},
                                              "route": {"receiver": "x", "group_wait": "0s"}}}).alerting)  # fmt: skip
    now = time.time()
    core.handle(crash(ts=now))
    [notification] = core.tick(now).notifications
    return notification


def receiver_config(**fields: object) -> ReceiverConfig:
    return parse_config({"alerting": {"receivers": {"r": fields}, "route": {"receiver": "r"}}}).alerting.receivers["r"]


async def test_redirects_are_not_followed(nc: Client, alerter: ServiceRunner, trap: Trap, outputs: Outputs) -> None:
    receivers = {"team": webhook(trap.url("/moved/307")), "other": webhook(trap.url("/moved/308"))}
    route = {"routes": [{"match": {"app": "web"}, "receiver": "team", "continue": True},
                        {"match": {"app": "web"}, "receiver": "other"}]}  # fmt: skip
    await apply_yaml(nc, config(receivers, route=route))
    await alerter.start()
    await publish(nc, crash())
    await wait_for(lambda: len(logs(outputs, "failed")) == 2, what="both deliveries failed")
    for entry in logs(outputs, "failed"):
        assert "(a redirect)" in (entry.error or "") and "not followed" in (entry.error or "")
        assert entry.attempts == 1  # permanent: retrying cannot help
    assert trap.landed == []  # the signed body went nowhere else


async def test_errors_name_only_scheme_host_and_port_of_a_receiver(
    nc: Client, alerter: ServiceRunner, trap: Trap, outputs: Outputs, closed_port: int
) -> None:
    slack = trap.url("/services/T0/B0/tok-SECRET-slack", userinfo="alice:pw-hunter2@")
    hook = f"http://bob:pw-closed@{LOCALHOST}:{closed_port}/hook/tok-SECRET-closed?key=qs-SECRET"
    receivers = {"chat": {"type": "slack", "url": slack, "retry_for": "0s"}, "team": webhook(hook, retry_for="0s")}
    route = {"routes": [{"match": {"app": "web"}, "receiver": "chat", "continue": True},
                        {"match": {"app": "web"}, "receiver": "team"}]}  # fmt: skip
    await apply_yaml(nc, config(receivers, route=route))
    with structlog.testing.capture_logs() as captured:
        await alerter.start()
        await publish(nc, crash())
        await wait_for(lambda: len(logs(outputs, "failed")) == 2, what="both deliveries failed")
    errors = {e.receiver: e.error or "" for e in logs(outputs, "failed")}
    assert errors["chat"] == f"HTTP 500 from http://{LOCALHOST}:{trap.port}"
    assert errors["team"].startswith("ClientConnectorError") and errors["team"].endswith(
        f"(http://{LOCALHOST}:{closed_port})"
    )
    failures = [entry for entry in captured if entry["event"] == "notification failed"]
    assert {entry["receiver"] for entry in failures} == {"chat", "team"}  # the log was captured
    published = b"".join(m.data for m in outputs.messages)
    for secret in ("tok-SECRET", "qs-SECRET", "hunter2", "pw-closed", "alice", "bob:"):
        assert secret not in repr(captured) and secret.encode() not in published, secret


async def test_a_bug_in_a_receiver_fails_the_notification_and_the_group_goes_on(
    nc: Client, alerter: ServiceRunner, hook: Hook, outputs: Outputs
) -> None:
    await apply_yaml(nc, config({"team": webhook(hook.url)}))
    service = await alerter.start()
    real = service.dispatcher.receivers["team"]

    class BuggyOnce:
        name, timeout, retry_for = real.name, real.timeout, real.retry_for
        calls = 0

        async def send(self, n: Notification) -> None:
            BuggyOnce.calls += 1
            if BuggyOnce.calls == 1:
                raise RuntimeError(f"a bug that quotes {hook.url}?token=tok-SECRET")
            await real.send(n)

    service.dispatcher.receivers["team"] = BuggyOnce()
    with structlog.testing.capture_logs() as captured:
        await publish(nc, crash())
        await wait_for(lambda: len(hook.received) == 1, what="the group notified again after the failure")
    [failed] = logs(outputs, "failed")
    assert failed.error is not None and failed.error.startswith("unexpected RuntimeError in the alerter at ")
    assert [entry["error"] for entry in captured if entry["event"] == "notification failed"] == [failed.error]
    assert "tok-SECRET" not in repr(captured) and "tok-SECRET" not in failed.error
    await wait_for(lambda: len(logs(outputs, "sent")) == 1, what="the retry logged as sent")
    assert logs(outputs, "sent")[0].seq == failed.seq + 1


async def test_an_exception_in_a_tick_is_logged_and_the_timer_goes_on(
    nc: Client, alerter: ServiceRunner, hook: Hook
) -> None:
    await apply_yaml(nc, config({"team": webhook(hook.url)}))
    with structlog.testing.capture_logs() as captured:
        service = await alerter.start()
        decide = service.core.tick
        raised: list[float] = []

        def tick_that_fails_once(now: float, apps: tuple[str, ...] = ()) -> Decisions:
            if not raised:
                raised.append(now)
                raise RuntimeError("a bug in a decision")
            return decide(now, apps)

        service.core.tick = tick_that_fails_once
        await publish(nc, crash())
        await wait_for(lambda: len(hook.received) == 1, what="a notification after the failed tick")
    assert raised and service.tick_errors == 1
    assert [entry["errors"] for entry in captured if entry["event"] == "alerter tick failed; ticking on"] == [1]


async def test_starttls_verifies_the_smtp_server_certificate(
    tls_cert: tuple[Path, Path], named_cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiosmtpd.controller import Controller

    trusted_cert, trusted_key = named_cert
    monkeypatch.setenv("SSL_CERT_FILE", str(trusted_cert))  # the only CA the alerter trusts here
    messages: list[bytes] = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            messages.append(envelope.content)
            return "250 OK"

    async with ClientSession() as session:
        for cert, key, trusted in ((trusted_cert, trusted_key, True), (*tls_cert, False)):
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert, key)
            port = free_port()
            controller = Controller(Handler(), hostname=LOCALHOST, port=port, tls_context=context,
                                    require_starttls=True)  # fmt: skip
            controller.start()
            try:
                email = receiver_config(type="email", smarthost=f"{LOCALHOST}:{port}", starttls=True,
                                        **{"from": "autoserve@example.test"}, to=["oncall@example.test"])  # fmt: skip
                receiver = EmailReceiver("mail", email, session)
                if trusted:
                    await receiver.send(a_notification())
                    assert len(messages) == 1
                else:
                    with pytest.raises(DeliveryError, match="CERTIFICATE_VERIFY_FAILED"):
                        await receiver.send(a_notification())
                    assert len(messages) == 1  # nothing sent over the unverified connection
            finally:
                controller.stop()


async def test_an_smtp_session_ends_at_its_timeout_even_if_the_server_trickles() -> None:
    closed_by_client = asyncio.Event()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A greeting one byte at a time, each well within smtplib's per-read timeout."""
        writer.write(b"220 ")
        with contextlib.suppress(ConnectionError):
            for _ in range(300):  # bounded: 30 s at most
                writer.write(b"x")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                        closed_by_client.set()
                        break
        if reader.at_eof():
            closed_by_client.set()
        writer.close()

    port = free_port()
    server = await asyncio.start_server(trickle, LOCALHOST, port)
    try:
        async with ClientSession() as session:
            email = receiver_config(type="email", smarthost=f"{LOCALHOST}:{port}", timeout="1s",
                                    **{"from": "autoserve@example.test"}, to=["oncall@example.test"])  # fmt: skip
            with pytest.raises(DeliveryError, match=r"SMTP session not done within 1s"):
                await EmailReceiver("mail", email, session).send(a_notification())
        # The client hung up while the server was still trickling: the thread is over.
        await asyncio.wait_for(closed_by_client.wait(), 15)
    finally:
        server.close()


async def test_every_receiver_kind_refuses_to_send_while_misconfigured(hook: Hook) -> None:
    configs = {
        "webhook": receiver_config(type="webhook", url=hook.url),
        "slack": receiver_config(type="slack", url=hook.url),
        "alertmanager": receiver_config(type="alertmanager", url=hook.url),
        "email": receiver_config(type="email", smarthost=f"{LOCALHOST}:9", **{"from": "a@x.test"}, to=["b@x.test"]),
    }
    async with ClientSession() as session:
        receivers = build_receivers(configs, session)
        for name, receiver in receivers.items():
            receiver.problem = f"{name}: a problem found when it was built"  # type: ignore[attr-defined]
            with pytest.raises(DeliveryError, match=f"receiver {name}: {name}: a problem") as caught:
                await receiver.send(a_notification())
            assert caught.value.permanent
    assert hook.attempts == 0


async def test_alerts_cli_warns_when_it_gives_up_reading_early(nc: Client, capsys: pytest.CaptureFixture[str]) -> None:
    from autoserve_cli.alerts import read_alerting

    await provision(nc.jetstream())
    fired = AlertChanged(alert_id="a-1", app_name="web", instance_id="web-1", status="firing", previous_status=None,
                         failure_type="container_stopped", severity="critical", message="exit code 137",
                         timestamp=time.time(), starts_at=time.time())  # fmt: skip
    await publish(nc, fired)
    assert await read_alerting(nc.jetstream()) == [fired]
    assert "warning" not in capsys.readouterr().err
    assert await read_alerting(nc.jetstream(), timeout=0) == []  # no time to read anything
    assert "warning: gave up reading the alerting events" in capsys.readouterr().err
