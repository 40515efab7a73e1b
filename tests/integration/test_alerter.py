"""The alerter against a real nats-server and real receivers on 127.0.0.1: a webhook that
checks the HMAC, an SMTP server (aiosmtpd), a real Prometheus Alertmanager; restarts in the
middle, a receiver that is down then up, and poison messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from aiohttp import ClientSession, web
from nats.aio.client import Client

from autoserve_alerter.adapters.receivers import ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from autoserve_alerter.service import AlerterService
from autoserve_events import (
    AlertChanged,
    FailureDetected,
    FailureType,
    HealthChanged,
    NotificationLogged,
    encode,
    headers_for,
    subject_for,
)
from autoserve_runtime import EmbeddedNatsServer, free_port, provision

from .conftest import LOCALHOST, Outputs, ServiceRunner, apply_yaml, wait_for

SECRET = "s3cret-for-tests"


@dataclass
class Hook:
    port: int
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    failures_left: int = 0  # answer 503 this many times first
    attempts: int = 0

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}/hook"

    def payloads(self) -> list[dict]:
        return [json.loads(body) for _, body in self.received]


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    target = Hook(free_port())

    async def receive(request: web.Request) -> web.Response:
        target.attempts += 1
        if target.failures_left > 0:
            target.failures_left -= 1
            return web.Response(status=503, text="down for a moment")
        target.received.append((dict(request.headers), await request.read()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOCALHOST, target.port).start()
    yield target
    await runner.cleanup()


@pytest.fixture
async def alerter(
    nats_server: EmbeddedNatsServer, nc: Client, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ServiceRunner]:
    monkeypatch.setenv("AUTOSERVE_TEST_HMAC", SECRET)
    await provision(nc.jetstream())
    runner = ServiceRunner(lambda: AlerterService(nats_server.url, backoff=(0.05, 0.2)))
    yield runner
    await runner.stop()


def config(receivers: dict, route: dict | None = None, apps: dict | None = None, **alerting: object) -> str:
    apps = apps or {"web": {"instances": [{"id": "web-1", "host": LOCALHOST, "port": 1}]}}
    section = {"receivers": receivers, "route": {"receiver": next(iter(receivers)), "group_wait": "0s",
               "group_interval": "1s", "repeat_interval": "1h", **(route or {})}, **alerting}  # fmt: skip
    return yaml.safe_dump({"apps": apps, "alerting": section})


def webhook(url: str, **extra: object) -> dict:
    return {"type": "webhook", "url": url, "hmac_secret_env": "AUTOSERVE_TEST_HMAC", **extra}


async def publish(nc: Client, *events: object) -> None:
    js = nc.jetstream()
    for event in events:
        await js.publish(subject_for(event), encode(event), headers=headers_for(event))  # type: ignore[arg-type]


def crash(instance: str = "web-1", app: str = "web", ts: float | None = None) -> FailureDetected:
    return FailureDetected(failure_type=FailureType.CONTAINER_STOPPED, instance_id=instance, app_name=app,
                           severity="critical", message="exit code 137", timestamp=ts or time.time(), is_critical=True)  # fmt: skip


def healthy(instance: str = "web-1", app: str = "web") -> HealthChanged:
    return HealthChanged(instance_id=instance, app_name=app, healthy=True, previous=False, consecutive=1,
                         reason="probe ok", timestamp=time.time())  # fmt: skip


def logs(outputs: Outputs, outcome: str | None = None) -> list[NotificationLogged]:
    return [e for e in outputs.events(NotificationLogged) if outcome is None or e.outcome == outcome]


async def test_webhook_fires_and_resolves_with_a_valid_hmac(nc: Client, alerter: ServiceRunner, hook: Hook,
                                                            outputs: Outputs) -> None:  # fmt: skip
    await apply_yaml(nc, config({"team": webhook(hook.url)}))
    await alerter.start()
    await publish(nc, crash())
    await wait_for(lambda: len(hook.received) == 1, what="the firing notification")
    headers, body = hook.received[0]
    assert verify(SECRET.encode(), headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    assert not verify(b"wrong", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    payload = json.loads(body)
    assert payload["status"] == "firing" and payload["groupLabels"] == {"app": "web"}
    assert payload["alerts"][0]["labels"]["instance"] == "web-1" and headers[ID_HEADER] == payload["notificationId"]
    [fired] = outputs.events(AlertChanged)
    assert fired.status == "firing"
    await publish(nc, healthy())
    await wait_for(lambda: len(hook.received) == 2, what="the resolved notification")
    assert hook.payloads()[1]["status"] == "resolved"
    await wait_for(lambda: len(logs(outputs, "sent")) == 2, what="both sends logged")
    assert [e.status for e in outputs.events(AlertChanged)] == ["firing", "resolved"]


async def test_ack_from_the_cli_is_an_event_and_stops_escalation(nc: Client, nats_server: EmbeddedNatsServer,
                                                                  alerter: ServiceRunner, hook: Hook, outputs: Outputs,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from autoserve_cli.alerts import ack, list_alerts

    receivers = {"team": webhook(hook.url), "pager": webhook(hook.url + "?pager")}
    await apply_yaml(nc, config(receivers, route={"escalation": [{"escalate_after": "3s", "receivers": ["pager"]}]},
                                resolve_timeout="1h"))  # fmt: skip
    await alerter.start()
    await publish(nc, crash("web-1"), crash("web-2"))
    await wait_for(lambda: len(outputs.events(AlertChanged)) == 2, what="two alerts")
    first = next(a for a in outputs.events(AlertChanged) if a.instance_id == "web-1")
    assert await ack(nats_server.url, first.alert_id[:6], "alice") == 0
    await wait_for(lambda: any(a.status == "acknowledged" for a in outputs.events(AlertChanged)), what="acked")
    await wait_for(lambda: len(logs(outputs)) >= 2 and any(e.tier == 1 for e in logs(outputs, "sent")), timeout=20,
                   what="the escalation")  # fmt: skip
    [escalation] = [e for e in logs(outputs, "sent") if e.tier == 1]
    assert escalation.receiver == "pager" and first.alert_id not in escalation.firing and len(escalation.firing) == 1
    assert await list_alerts(nats_server.url) == 0
    assert "acked by alice" in capsys.readouterr().out


async def test_receiver_down_then_up_delivers_exactly_once(nc: Client, alerter: ServiceRunner, hook: Hook,
                                                           outputs: Outputs) -> None:  # fmt: skip
    hook.failures_left = 4
    await apply_yaml(nc, config({"team": webhook(hook.url)}))
    await alerter.start()
    await publish(nc, crash())
    await wait_for(lambda: len(hook.received) == 1 and logs(outputs, "sent"), what="delivered after retries")
    await asyncio.sleep(0)  # let any stray retry show itself within the wait below
    await wait_for(lambda: hook.attempts == 5, what="five attempts")
    [sent] = logs(outputs, "sent")
    assert sent.attempts == 5 and len({h[ID_HEADER] for h, _ in hook.received}) == len(hook.received) == 1


async def test_a_failing_receiver_never_delays_the_others(nc: Client, alerter: ServiceRunner, hook: Hook) -> None:
    with contextlib.closing(__import__("socket").socket()) as hole:  # accepts, never answers
        hole.bind((LOCALHOST, 0))
        hole.listen(64)
        black_hole = f"http://{LOCALHOST}:{hole.getsockname()[1]}/hook"
        receivers = {"slow": webhook(black_hole, timeout="20s"), "team": webhook(hook.url)}
        route = {"routes": [{"match": {"app": "web"}, "receiver": "slow", "continue": True},
                            {"match": {"app": "web"}, "receiver": "team"}]}  # fmt: skip
        await apply_yaml(nc, config(receivers, route=route))
        await alerter.start()
        started = time.monotonic()
        await publish(nc, crash())
        await wait_for(lambda: len(hook.received) == 1, what="the healthy receiver")
        assert time.monotonic() - started < 5


async def test_restart_in_the_middle_sends_no_duplicate_and_misses_no_escalation(
    nc: Client, alerter: ServiceRunner, hook: Hook, outputs: Outputs
) -> None:
    receivers = {"team": webhook(hook.url), "pager": webhook(hook.url)}
    await apply_yaml(nc, config(receivers, route={"escalation": [{"escalate_after": "4s", "receivers": ["pager"]}]},
                                resolve_timeout="1h"))  # fmt: skip
    await alerter.start()
    await publish(nc, crash())
    await wait_for(lambda: len(hook.received) == 1, what="the first notification")
    await alerter.stop()
    await asyncio.sleep(4.5)  # the escalation falls due while the alerter is down
    assert len(hook.received) == 1
    service = await alerter.start()
    assert service.replayed > 0
    await wait_for(lambda: len(hook.received) == 2, what="the escalation after the restart")
    assert hook.payloads()[1]["tier"] == 1
    await publish(nc, crash("web-2"))  # the group flushes again: only web-2 is new
    await wait_for(lambda: len(hook.received) == 3, what="the next group notification")
    ids = [p["notificationId"] for p in hook.payloads()]
    assert len(set(ids)) == 3
    assert [a["labels"]["instance"] for a in hook.payloads()[2]["alerts"]] == ["web-1", "web-2"]
    await alerter.stop()
    await alerter.start()  # nothing new: a second restart sends nothing
    await asyncio.sleep(2.5)
    assert len(hook.received) == 3


async def test_poison_messages_are_dead_lettered_and_the_consumer_goes_on(
    nc: Client, alerter: ServiceRunner, hook: Hook, outputs: Outputs
) -> None:
    await apply_yaml(nc, config({"team": webhook(hook.url)}))
    await alerter.start()
    js = nc.jetstream()
    await js.publish("autoserve.event.failure.web.web-1", b"{not json", headers={"Nats-Msg-Id": "poison-1"})
    bad = json.loads(encode(crash()))
    bad["severity"] = "apocalyptic"
    await js.publish("autoserve.event.failure.web.web-1", json.dumps(bad).encode(), headers={"Nats-Msg-Id": "poison-2"})
    await publish(nc, crash())
    await wait_for(lambda: len(hook.received) == 1, what="the good event still notifies")
    await wait_for(lambda: len([m for m in outputs.dead_letters() if m.subject == "autoserve.deadletter.alerter"]) == 2,
                   what="two dead letters")  # fmt: skip


async def test_email_over_smtp(nc: Client, alerter: ServiceRunner) -> None:
    from aiosmtpd.controller import Controller

    messages: list[tuple[str, list[str], bytes]] = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            messages.append((envelope.mail_from, envelope.rcpt_tos, envelope.content))
            return "250 OK"

    port = free_port()
    controller = Controller(Handler(), hostname=LOCALHOST, port=port)
    controller.start()
    try:
        email = {"type": "email", "smarthost": f"{LOCALHOST}:{port}", "from": "autoserve@example.test",
                 "to": ["oncall@example.test"]}  # fmt: skip
        await apply_yaml(nc, config({"mail": email}))
        await alerter.start()
        await publish(nc, crash())
        await wait_for(lambda: len(messages) == 1, what="the email")
        sender, recipients, content = messages[0]
        assert (sender, recipients) == ("autoserve@example.test", ["oncall@example.test"])
        text = content.decode()
        assert "Subject: [FIRING:1] web/web-1 container_stopped" in text
        assert "autoserve alerts ack" in text
    finally:
        controller.stop()


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    (tmp_path / "am.yml").write_text(yaml.safe_dump({"route": {"receiver": "null"}, "receivers": [{"name": "null"}]}))
    process = subprocess.Popen(
        ["/usr/bin/prometheus-alertmanager", f"--config.file={tmp_path / 'am.yml'}",
         f"--storage.path={tmp_path / 'am-data'}", f"--web.listen-address={LOCALHOST}:{port}",
         "--cluster.listen-address="],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "am.log").open("wb"),
    )  # fmt: skip
    try:
        yield f"http://{LOCALHOST}:{port}"
    finally:
        process.terminate()
        process.wait(10)


async def test_forwarding_to_a_real_alertmanager(nc: Client, alerter: ServiceRunner, alertmanager: str) -> None:
    async with ClientSession() as session:

        async def ready() -> bool:
            with contextlib.suppress(OSError, Exception):
                async with session.get(f"{alertmanager}/-/ready") as resp:
                    return resp.status == 200
            return False

        deadline = time.monotonic() + 30
        while not await ready():
            assert time.monotonic() < deadline, "alertmanager did not start"
            await asyncio.sleep(0.1)
        await apply_yaml(nc, config({"am": {"type": "alertmanager", "url": alertmanager}}))
        await alerter.start()
        await publish(nc, crash())

        async def forwarded() -> list[dict]:
            async with session.get(f"{alertmanager}/api/v2/alerts") as resp:
                return await resp.json()

        deadline = time.monotonic() + 20
        while not (alerts := await forwarded()):
            assert time.monotonic() < deadline, "the alert never reached Alertmanager"
            await asyncio.sleep(0.1)
        [alert] = alerts
        assert alert["labels"]["alertname"] == "container_stopped" and alert["labels"]["instance"] == "web-1"
        assert alert["status"]["state"] == "active" and alert["annotations"]["autoserve_alert_id"]
