"""Two alerters as real ``autoserve run alerter`` processes, one active for each alert group,
and our webhook receiver (``autoserve_alerter.adapters.inbox``, which drops repeats of an
idempotency key) on 127.0.0.1.

1. The group's owner is SIGKILLed while the group waits (``group_wait``): the other member
   takes it over within its lease and the receiver gets the notification once.
2. The owner is SIGKILLed after its receiver took the notification and before the answer
   came back (so it is sent and never logged): the other member sends it again with the
   same key, the receiver drops the repeat, and the survivor counts one possible repeat.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families

from autoserve_alerter.adapters.inbox import SEEN_KEY, webhook_inbox
from autoserve_alerter.core.idempotency import SeenKeys
from autoserve_events import AlertChanged, NotificationLogged, decode
from autoserve_runtime import EmbeddedNatsServer, free_port, provision, spawn_child, stop_child
from autoserve_runtime.ownership import owner_of

from ..support.web import serving_app
from .conftest import LOCALHOST, apply_yaml, wait_for
from .test_alerter import SECRET, config, crash, publish, webhook
from .test_reporter import AUTOSERVE

pytestmark = pytest.mark.members  # the members lane of make test, beside the others

TTL = 2
# Longer than a TTL plus a renewal: the owner dies while its group waits, so long before the
# flush that it could not have sent it (the repeat count stays 0).
GROUP_WAIT = 5.0
MEMBERS = ("a", "b")


@dataclass
class Inbox:
    """Our webhook receiver, recording what it hands on; ``hold`` keys wait for ``release``."""

    port: int = field(default_factory=free_port)
    delivered: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # wall clock, by delivery
    hold: set[str] = field(default_factory=set)  # group keys whose first notification hangs
    holding: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    seen: SeenKeys | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}/hook"

    async def deliver(self, payload: dict[str, Any], key: str) -> None:
        self.delivered.append((key, payload))
        self.arrived.append(time.time())
        if payload["groupKey"] in self.hold:
            self.hold.discard(payload["groupKey"])
            self.holding.append(key)
            await self.release.wait()  # the sender dies before the answer

    def of(self, group: str) -> list[str]:
        return [key for key, payload in self.delivered if payload["groupKey"] == group]


@pytest.fixture
async def inbox() -> AsyncIterator[Inbox]:
    target = Inbox()
    app = webhook_inbox(target.deliver, secret=SECRET.encode())
    target.seen = app[SEEN_KEY]
    async with serving_app(app, target.port):
        yield target
        target.release.set()


class Member:
    def __init__(self, name: str, nats_url: str, logs: Path) -> None:
        self.name = name
        self.metrics_port = free_port()
        self.log = logs / f"alerter-{name}.log"
        self.env = {**os.environ, "AUTOSERVE_NATS_URL": nats_url, "AUTOSERVE_METRICS_PORT": str(self.metrics_port),
                    "AUTOSERVE_MEMBER": name, "AUTOSERVE_MEMBER_TTL": str(TTL), "AUTOSERVE_TEST_HMAC": SECRET}  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Member:
        with self.log.open("ab") as out:
            self.process = spawn_child([AUTOSERVE, "run", "alerter"], env=self.env, stdout=out, stderr=out)
        return self

    def _get(self, path: str) -> tuple[int, str]:
        assert self.process is not None and self.process.poll() is None, self.log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://{LOCALHOST}:{self.metrics_port}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except OSError:
            return 0, ""

    async def ready(self) -> bool:
        return (await asyncio.to_thread(self._get, "/readyz"))[0] == 200

    def maybe_repeated(self) -> float:
        _, text = self._get("/metrics")
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "autoserve_alerter_notifications_maybe_repeated_total"
            and sample.labels == {"receiver": "team", "type": "webhook"}
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            stop_child(self.process)


def group_of(app: str) -> str:
    return f"0:{{app={app}}}"  # the root route, grouped by app (the default group_by)


def app_owned_by(member: str, taken: set[str]) -> str:
    """An app name whose group ``member`` owns while both members live."""
    return next(app for i in range(100) if (app := f"app{i}") not in taken
                and owner_of(group_of(app), MEMBERS) == member)  # fmt: skip


@dataclass
class Log:
    """What the alerters published: alerts and the notification log."""

    alerts: list[AlertChanged] = field(default_factory=list)
    sent: list[NotificationLogged] = field(default_factory=list)

    async def on_message(self, msg: Msg) -> None:
        event = decode(msg.data)
        if isinstance(event, AlertChanged):
            self.alerts.append(event)
        elif isinstance(event, NotificationLogged) and event.outcome == "sent":
            self.sent.append(event)

    def sent_for(self, group: str) -> list[str]:
        return [e.event_id for e in self.sent if e.group_key == group]


async def test_two_alerters_the_owner_killed_while_its_group_waits_and_while_it_sends(
    nats_server: EmbeddedNatsServer, nc: Client, inbox: Inbox, tmp_path: Path
) -> None:
    await provision(nc.jetstream())
    published = Log()
    await nc.subscribe("autoserve.event.alert.>", cb=published.on_message)
    route = {"group_wait": f"{GROUP_WAIT:g}s", "group_interval": "1s"}
    first = app_owned_by("a", set())
    second = app_owned_by("a", {first})
    apps = {app: {"instances": [{"id": "web-1", "host": LOCALHOST, "port": 1}]} for app in (first, second)}
    await apply_yaml(nc, config({"team": webhook(inbox.url)}, route=route, apps=apps, resolve_timeout="1h"))
    members = {name: Member(name, nats_server.url, tmp_path) for name in MEMBERS}
    try:
        for member in members.values():
            member.start()
        for member in members.values():
            await wait_for(member.ready, timeout=60, what=f"alerter {member.name} ready")

        # 1. Killed while the group waits: the other member sends it, once.
        failed = crash(app=first)
        await publish(nc, failed)
        await wait_for(lambda: any(a.app_name == first for a in published.alerts), what="the alert fired")
        members["a"].kill()
        due, killed_at = failed.timestamp + GROUP_WAIT, time.time()
        await wait_for(lambda: len(inbox.of(group_of(first))) == 1, timeout=30, what="the notification, from b")
        await wait_for(lambda: published.sent_for(group_of(first)), what="b logged it sent")
        print(f"\n1. owner killed {due - killed_at:.2f}s before its group's flush was due (TTL {TTL}s): "
              f"b notified {inbox.arrived[-1] - due:.2f}s after it fell due")  # fmt: skip
        assert inbox.of(group_of(first)) == published.sent_for(group_of(first))  # one key, the logged one
        assert members["b"].maybe_repeated() == 0  # a died before the flush was due: nothing it could have sent

        # 2. Killed between sending and logging: b sends it again, the receiver drops it.
        members["a"] = Member("a", nats_server.url, tmp_path).start()
        await wait_for(members["a"].ready, timeout=60, what="a back")
        inbox.hold.add(group_of(second))
        await publish(nc, crash(app=second))
        await wait_for(lambda: inbox.holding, timeout=30, what="a's notification taken, its answer held")
        members["a"].kill()
        killed_at = time.monotonic()
        await wait_for(lambda: inbox.seen is not None and inbox.seen.repeats == 1, timeout=30,
                       what="b's copy of the same key, dropped")  # fmt: skip
        resent = time.monotonic() - killed_at
        await wait_for(lambda: published.sent_for(group_of(second)), what="b logged it sent")
        repeats = members["b"].maybe_repeated()
        print(f"2. owner killed after sending, before logging: b sent it again {resent:.2f}s after the kill; "
              f"delivered {len(inbox.of(group_of(second)))}, repeats dropped {inbox.seen.repeats if inbox.seen else 0}, "
              f"counted maybe-repeated {repeats:g}")  # fmt: skip
        assert inbox.of(group_of(second)) == inbox.holding == published.sent_for(group_of(second))
        assert repeats == 1
    finally:
        inbox.release.set()
        for member in members.values():
            member.stop()
    # Each notification reached the receiver's handler once, under one key each; and a, back
    # as the owner of the first group, did not send again what b's log entry says was sent.
    keys = [key for key, _ in inbox.delivered]
    assert len(keys) == len(set(keys)) == 2, json.dumps([p for _, p in inbox.delivered])[:2000]
    assert inbox.seen is not None and inbox.seen.repeats == 1
