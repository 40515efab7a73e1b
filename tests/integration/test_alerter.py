"""The alerter against a real nats-server and real receivers on 127.0.0.1: a webhook that
checks the HMAC, an SMTP server (aiosmtpd), a real Prometheus Alertmanager; restarts in the
middle, a receiver that is down then up, and poison messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
import structlog.testing
import yaml
from aiohttp import ClientSession, web
from nats.aio.client import Client

from autoserve_alerter.adapters.receivers import ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from autoserve_alerter.service import AlerterService
from autoserve_events import (
    SETTINGS_BUCKET,
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

from ..conftest import plant_secret
from ..support.web import serving_app
from .conftest import LOCALHOST, Outputs, ServiceRunner, apply_yaml, wait_for

SECRET = plant_secret("s3cret-for-tests", "alerter webhook HMAC secret")
# Secrets inside receiver URLs (a Slack token is the path): the session's log scan looks for them.
for _secret in ("tok-SECRET-slack", "tok-SECRET-closed", "qs-SECRET", "pw-hunter2", "pw-closed"):
    plant_secret(_secret, "a receiver URL's secret")


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
    async with serving_app(app, target.port):
        yield target


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


async def test_a_bad_settings_value_falls_back_to_the_newest_valid_one(
    nc: Client, alerter: ServiceRunner, hook: Hook
) -> None:
    """A value written straight into KV that does not validate: the alerter starts with the
    newest valid revision (its receivers), not the defaults, and says so."""
    await apply_yaml(nc, config({"team": webhook(hook.url)}))
    settings = await nc.jetstream().key_value(SETTINGS_BUCKET)
    bad_revision = await settings.put("alerting", b'{"receivers": "none"}')
    with structlog.testing.capture_logs() as captured:
        await alerter.start()
    [refused] = [entry for entry in captured if entry["log_level"] == "error"]
    assert (refused["key"], refused["revision"]) == ("alerting", bad_revision)
    await publish(nc, crash())
    await wait_for(lambda: len(hook.received) == 1, what="the firing notification, to the last good receiver")


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
    # The delivery's task has ended: no retry of it can come later.
    await wait_for(lambda: alerter.service.dispatcher.pending == 0, what="the delivery task done")
    assert hook.attempts == 5
    [sent] = logs(outputs, "sent")
    assert sent.attempts == 5 and len({h[ID_HEADER] for h, _ in hook.received}) == len(hook.received) == 1


async def test_a_failing_receiver_never_delays_the_others(nc: Client, alerter: ServiceRunner, hook: Hook,
                                                          outputs: Outputs, black_hole: int) -> None:  # fmt: skip
    receivers = {"slow": webhook(f"http://{LOCALHOST}:{black_hole}/hook", timeout="20s"), "team": webhook(hook.url)}
    route = {"routes": [{"match": {"app": "web"}, "receiver": "slow", "continue": True},
                        {"match": {"app": "web"}, "receiver": "team"}]}  # fmt: skip
    await apply_yaml(nc, config(receivers, route=route))
    service = await alerter.start()
    await publish(nc, crash())
    await wait_for(lambda: len(hook.received) == 1, what="the healthy receiver")
    # The black hole's notification is still in flight (a 20 s timeout, then retries for 10
    # minutes), so the healthy receiver's delivery did not wait for it.
    assert "slow" in {receiver for _, receiver, _ in service.core.in_flight}
    assert [e.receiver for e in logs(outputs)] in ([], ["team"])


async def test_restart_in_the_middle_sends_no_duplicate_and_misses_no_escalation(
    nc: Client, alerter: ServiceRunner, hook: Hook, outputs: Outputs
) -> None:
    receivers = {"team": webhook(hook.url), "pager": webhook(hook.url)}
    await apply_yaml(nc, config(receivers, route={"escalation": [{"escalate_after": "4s", "receivers": ["pager"]}]},
                                resolve_timeout="1h"))  # fmt: skip
    await alerter.start()
    await publish(nc, crash())
    await wait_for(lambda: len(hook.received) == 1, what="the first notification")
    [fired] = outputs.events(AlertChanged)
    await alerter.stop()
    assert [e.tier for e in logs(outputs)] == [0]  # stopped before the escalation was due
    # The escalation falls due while the alerter is down (the core's clock is the wall clock).
    await wait_for(lambda: time.time() >= fired.starts_at + 4, what="the escalation's due time to pass")
    service = await alerter.start()
    assert sum(service.replayed.values()) > 0
    await wait_for(lambda: len(hook.received) == 2, what="the escalation after the restart")
    assert hook.payloads()[1]["tier"] == 1
    [page] = [e for e in logs(outputs, "sent") if e.tier == 1]
    assert page.timestamp >= fired.starts_at + 4
    await publish(nc, crash("web-2"))  # the group flushes again: only web-2 is new
    await wait_for(lambda: len(hook.received) == 3, what="the next group notification")
    assert [a["labels"]["instance"] for a in hook.payloads()[2]["alerts"]] == ["web-1", "web-2"]
    # web-2 escalates on its own (4 s after its start); after that nothing is due for an hour.
    await wait_for(lambda: len(hook.received) == 4, what="web-2's escalation")
    assert hook.payloads()[3]["tier"] == 1 and [a["labels"]["instance"] for a in hook.payloads()[3]["alerts"]] == [
        "web-2"
    ]
    assert len({p["notificationId"] for p in hook.payloads()}) == 4
    await alerter.stop()
    service = await alerter.start()  # nothing new: a second restart sends nothing
    due = service.core.next_due(time.time())
    assert due is not None
    await wait_for(lambda: (service.ticked_at or 0) >= due, what="a tick at the group's next due time")
    assert list(service.notifications) == [] and len(hook.received) == 4


async def test_an_idle_alerter_sleeps_until_something_is_due_and_wakes_for_input(
    nc: Client, alerter: ServiceRunner, hook: Hook, outputs: Outputs, black_hole: int
) -> None:
    """Once the first notification is out, nothing is due for an hour (group_interval,
    repeat_interval, resolve_timeout), and the black hole's delivery is in flight (it wakes
    the timer when it ends): the timer sleeps instead of ticking every 50 ms (or, before,
    every 2 ms while a group waited on a delivery in flight). A new failure wakes it at once."""
    receivers = {"slow": webhook(f"http://{LOCALHOST}:{black_hole}/hook", timeout="20s"), "team": webhook(hook.url)}
    route = {"group_by": ["app", "instance"], "group_interval": "1h",
             "routes": [{"match": {"app": "web"}, "receiver": "slow", "continue": True},
                        {"match": {"app": "web"}, "receiver": "team"}]}  # fmt: skip
    await apply_yaml(nc, config(receivers, route=route, resolve_timeout="1h"))
    service = await alerter.start()
    await publish(nc, crash())
    await wait_for(lambda: len(logs(outputs, "sent")) == 1, what="the first notification, logged")
    assert "slow" in {receiver for _, receiver, _ in service.core.in_flight}
    before, window_ends = service.ticks, time.time() + 2.0
    await wait_for(lambda: time.time() >= window_ends, what="two idle seconds")
    idle_ticks = service.ticks - before
    assert idle_ticks <= 2, f"{idle_ticks} ticks in two idle seconds"  # 50 ms ticks would be 40
    await publish(nc, crash("web-2"))  # a new group, group_wait 0: the sleeping timer is woken for it
    await wait_for(lambda: len(hook.received) == 2, what="the new alert notified")
    assert service.ticks - before - idle_ticks <= 5


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


AM_RESOLVE_TIMEOUT = "1s"  # Alertmanager's own: an alert sent without endsAt resolves after this


@pytest.fixture
def alertmanager(tmp_path: Path, hook: Hook) -> Iterator[str]:
    """A real Alertmanager with a short ``resolve_timeout``, notifying ``hook`` at once."""
    port = free_port()
    am_config = {
        "global": {"resolve_timeout": AM_RESOLVE_TIMEOUT},
        "route": {"receiver": "hook", "group_by": ["instance"], "group_wait": "0s", "group_interval": "1s",
                  "repeat_interval": "1h"},
        "receivers": [{"name": "hook", "webhook_configs": [{"url": hook.url, "send_resolved": True}]}],
    }  # fmt: skip
    (tmp_path / "am.yml").write_text(yaml.safe_dump(am_config))
    process = subprocess.Popen(
        ["/usr/bin/prometheus-alertmanager", f"--config.file={tmp_path / 'am.yml'}",
         f"--storage.path={tmp_path / 'am-data'}", f"--web.listen-address={LOCALHOST}:{port}",
         "--cluster.listen-address="],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "am.log").open("wb"),
    )  # fmt: skip
    url = f"http://{LOCALHOST}:{port}"
    try:
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, never a proxy
        deadline = time.monotonic() + 30
        for _ in range(300):
            with contextlib.suppress(OSError), direct.open(f"{url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    break
            assert time.monotonic() < deadline and process.poll() is None, "alertmanager did not start"
            time.sleep(0.1)  # a sync fixture: the test's loop is not running yet
        else:
            raise AssertionError("alertmanager not ready after 300 looks")
        yield url
    finally:
        process.terminate()
        process.wait(10)


def _when(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def test_forwarding_to_a_real_alertmanager_stays_active_while_firing_and_resolves_with_ours(
    nc: Client, alerter: ServiceRunner, alertmanager: str, hook: Hook, outputs: Outputs
) -> None:
    """Alertmanager resolves an alert without ``endsAt`` after its ``resolve_timeout`` (1 s
    here); re-sent every second, valid for four, ours stays active past it, across a restart
    of the alerter, until it resolves here: then Alertmanager has our real end."""
    async with ClientSession() as session:

        async def forwarded() -> list[dict]:
            async with session.get(f"{alertmanager}/api/v2/alerts") as resp:
                return await resp.json()

        async def stays_active(seconds: float, what: str) -> str:
            """Poll for ``seconds``: the alert is active at every look; the last endsAt."""
            until = time.time() + seconds
            ends_at = ""
            for _ in range(int(seconds * 20) + 50):  # bounded; each look is at least 50 ms apart
                if time.time() >= until:
                    return ends_at
                [alert] = await forwarded()
                assert alert["status"]["state"] == "active", (what, alert)
                ends_at = alert["endsAt"]
                await asyncio.sleep(0.05)
            raise AssertionError(f"{what}: polling did not end")

        receiver = {"type": "alertmanager", "url": alertmanager, "resend_interval": "1s"}
        await apply_yaml(nc, config({"am": receiver}, resolve_timeout="1h"))
        await alerter.start()
        await publish(nc, crash())
        deadline = time.monotonic() + 20
        while not (alerts := await forwarded()):
            assert time.monotonic() < deadline, "the alert never reached Alertmanager"
            await asyncio.sleep(0.1)
        [alert] = alerts
        assert alert["labels"]["alertname"] == "container_stopped" and alert["labels"]["instance"] == "web-1"
        assert alert["status"]["state"] == "active" and alert["annotations"]["autoserve_alert_id"]
        first_end = _when(alert["endsAt"])
        assert first_end > time.time()  # sent with an endsAt: valid for four resend intervals
        # past Alertmanager's resolve_timeout and past the first endsAt: still active, re-sent
        last = await stays_active(first_end - time.time() + 2, "while firing")
        assert _when(last) > first_end
        await alerter.stop()
        service = await alerter.start()  # a re-send is not logged: the restarted alerter re-sends at once
        await wait_for(lambda: any(n.resend for n in service.notifications), what="a re-send after the restart")
        await stays_active(float(AM_RESOLVE_TIMEOUT.rstrip("s")) + 4, "after the restart")
        assert [p["status"] for p in hook.payloads()] == ["firing"]  # Alertmanager never resolved it itself
        await publish(nc, healthy())
        await wait_for(lambda: len(hook.received) == 2, what="Alertmanager's resolved notification")
        [resolved] = [e for e in outputs.events(AlertChanged) if e.status == "resolved"]
        [am_alert] = hook.payloads()[1]["alerts"]
        assert hook.payloads()[1]["status"] == "resolved" and am_alert["status"] == "resolved"
        assert resolved.ends_at is not None and abs(_when(am_alert["endsAt"]) - resolved.ends_at) < 0.001
        assert await forwarded() == []
        assert len([e for e in logs(outputs, "sent") if e.receiver == "am"]) >= 1  # the forward, logged
