"""``autoserve status`` and ``autoserve events`` against known events in a real nats-server."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
from nats.aio.client import Client

from autoserve_events import (
    AlertChanged,
    BreakerStateChanged,
    ContainerObserved,
    ErrorKind,
    Event,
    FailureDetected,
    FailureType,
    HealthChanged,
    NotificationLogged,
    ProbeCompleted,
    RecoveryExecuted,
    RecoveryStrategy,
    decode,
    encode,
    subject_for,
)
from autoserve_runtime import provision

AUTOSERVE = str(Path(sys.executable).parent / "autoserve")
T0 = time.time() - 600  # ten minutes ago, in steps of a second


def at(seconds: float) -> float:
    return T0 + seconds


def probe(app: str, instance: str, healthy: bool, seconds: float) -> ProbeCompleted:
    failed = {} if healthy else {"error": "Connection refused", "error_kind": ErrorKind.CONNECTION_REFUSED}
    return ProbeCompleted(app_name=app, instance_id=instance, check_type="http", is_healthy=healthy,
                          response_time_ms=4.5, status_code=200 if healthy else None, timestamp=at(seconds),
                          **failed)  # fmt: skip


def health(app: str, instance: str, healthy: bool, previous: bool | None, seconds: float) -> HealthChanged:
    return HealthChanged(app_name=app, instance_id=instance, healthy=healthy, previous=previous, consecutive=3,
                         reason="3 consecutive probes", timestamp=at(seconds))  # fmt: skip


FAILURE = FailureDetected(failure_type=FailureType.PORT_NOT_LISTENING, app_name="web", instance_id="w-2",
                          severity="high", message="Connection refused", timestamp=at(30), consecutive_count=3,
                          total_count=3)  # fmt: skip
OLDER_FAILURE = FailureDetected(failure_type=FailureType.HEALTH_CHECK_FAILED, app_name="web", instance_id="w-2",
                                severity="medium", message="HTTP 500", timestamp=at(20))  # fmt: skip
RECOVERY = RecoveryExecuted(strategy=RecoveryStrategy.RESTART_CONTAINER, failure_type=FailureType.PORT_NOT_LISTENING,
                            app_name="web", instance_id="w-2", success=True, timestamp=at(40), duration_ms=812.0,
                            failure_event_id=FAILURE.event_id)  # fmt: skip
BREAKER = BreakerStateChanged(app_name="web", instance_id="w-2", state="open", previous_state="closed",
                              consecutive_failures=5, consecutive_successes=0, reason="failure threshold reached",
                              timestamp=at(35))  # fmt: skip
CONTAINER = ContainerObserved(app_name="web", instance_id="w-2", container_id="c0ffee" * 10, event="die",
                              exit_code=137, timestamp=at(29))  # fmt: skip

# In publish order: the audit trail (AUTOSERVE_EVENTS) and the probes (AUTOSERVE_PROBES).
AUDIT: list[Event] = [
    health("web", "w-1", True, None, 10),
    health("web", "w-2", True, None, 11),
    OLDER_FAILURE,
    health("web", "w-2", False, True, 25),
    FAILURE,
    BREAKER,
    RECOVERY,
]
PROBES: list[Event] = [
    probe("web", "w-1", True, 1),
    probe("web", "w-2", True, 2),
    probe("api", "a-1", True, 3),
    CONTAINER,
    probe("web", "w-1", True, 50),
    probe("web", "w-2", False, 51),
    probe("api", "a-1", True, 52),
]


async def publish_known(nc: Client) -> None:
    js = nc.jetstream()
    await provision(js)
    for event in [*PROBES, *AUDIT]:
        await js.publish(subject_for(event), encode(event), headers={"Nats-Msg-Id": event.event_id})


async def autoserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([AUTOSERVE, *args], capture_output=True, text=True, timeout=timeout)

    return await asyncio.to_thread(run)


def alert(instance: str, status: str, previous: str | None, second: int) -> AlertChanged:
    return AlertChanged(alert_id=f"a-{instance}", app_name="web", instance_id=instance, status=status,
                        previous_status=previous, failure_type="port_not_listening", severity="high",
                        message="Connection refused", timestamp=at(second), starts_at=at(12))  # fmt: skip


ALERTS = [alert("w-1", "firing", None, 12), alert("w-1", "resolved", "firing", 14), alert("w-2", "firing", None, 45)]


async def test_status_json_joins_the_last_of_every_kind(nc: Client, nats_server) -> None:
    await publish_known(nc)
    for event in ALERTS:
        await nc.jetstream().publish(subject_for(event), encode(event), headers={"Nats-Msg-Id": event.event_id})
    result = await autoserve("status", "--json", "--nats-url", nats_server.url)
    assert result.returncode == 0, result.stderr
    rows = {(r["app_name"], r["instance_id"]): r for r in json.loads(result.stdout)}
    assert list(rows) == [("api", "a-1"), ("web", "w-1"), ("web", "w-2")]  # sorted

    w2 = rows[("web", "w-2")]
    assert (w2["health"], w2["health_since"], w2["health_reason"]) == ("unhealthy", at(25), "3 consecutive probes")
    assert (w2["breaker"], w2["breaker_forced"], w2["breaker_since"]) == ("open", False, at(35))
    assert w2["last_probe"] == {"timestamp": at(51), "is_healthy": False, "check_type": "http", "status_code": None,
                                "response_time_ms": 4.5, "error": "Connection refused",
                                "error_kind": "connection_refused"}  # fmt: skip
    assert w2["last_failure"] == {"timestamp": at(30), "failure_type": "port_not_listening", "severity": "high",
                                  "message": "Connection refused", "consecutive_count": 3, "is_critical": False,
                                  "event_id": FAILURE.event_id}  # fmt: skip
    assert w2["last_recovery"] == {"timestamp": at(40), "strategy": "restart_container", "success": True,
                                   "failure_type": "port_not_listening", "duration_ms": 812.0, "error": None,
                                   "event_id": RECOVERY.event_id}  # fmt: skip
    assert w2["probes_seen"] == 1  # the last per subject: one message per instance, however many were stored
    assert (w2["is_healthy"], w2["status_code"]) == (False, None)  # the flat probe fields stay, as before
    assert w2["alert"] == {"alert_id": "a-w-2", "status": "firing", "failure_type": "port_not_listening",
                           "severity": "high", "since": at(45), "acknowledged_by": None}  # fmt: skip
    assert rows[("web", "w-1")]["alert"]["status"] == "resolved"
    assert rows[("api", "a-1")]["alert"] is None

    w1, a1 = rows[("web", "w-1")], rows[("api", "a-1")]
    assert (w1["health"], w1["breaker"], w1["last_failure"], w1["last_recovery"]) == ("healthy", "closed", None, None)
    assert w1["last_probe"]["timestamp"] == at(50)
    assert (a1["health"], a1["breaker"], a1["last_probe"]["is_healthy"]) == ("unknown", "closed", True)

    only_web = await autoserve("status", "--json", "--app", "web", "--nats-url", nats_server.url)
    assert [(r["app_name"], r["instance_id"]) for r in json.loads(only_web.stdout)] == [("web", "w-1"), ("web", "w-2")]

    table = await autoserve("status", "--once", "--nats-url", nats_server.url)
    assert table.returncode == 0, table.stderr
    w2_line = next(line for line in table.stdout.splitlines() if "w-2" in line)
    for text in ("unhealthy", "open", "failed", "port_not_listening", "restart_container", "firing"):
        assert text in w2_line, (text, w2_line)
    assert "3 instances · 1 healthy · 1 unhealthy" in " ".join(table.stdout.split())
    assert "1 alerts firing" in " ".join(table.stdout.split())


async def test_events_reads_the_log_in_order_and_filters(nc: Client, nats_server) -> None:
    await publish_known(nc)
    url = ("--nats-url", nats_server.url)

    everything = await autoserve("events", "--json", *url)
    assert everything.returncode == 0, everything.stderr
    assert [decode(line.encode()) for line in everything.stdout.splitlines()] == AUDIT  # the audit trail, in order

    readable = await autoserve("events", *url)
    lines = readable.stdout.splitlines()
    assert len(lines) == len(AUDIT)
    assert lines[4].split(None, 1)[1] == (
        "FailureDetected      web/w-2  port_not_listening severity=high consecutive=3 total=3: Connection refused"
    )
    assert lines[0].startswith(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at(10))))
    assert "RecoveryExecuted" in lines[6] and "restart_container succeeded in 812.0ms" in lines[6]
    assert "closed -> open: failure threshold reached" in lines[5]

    failures = await autoserve("events", "--type", "failure", "--app", "web", "--instance", "w-2", "--json", *url)
    assert [decode(line.encode()) for line in failures.stdout.splitlines()] == [OLDER_FAILURE, FAILURE]

    probes = await autoserve("events", "--type", "ProbeCompleted,container", "--app", "web", "--json", *url)
    expected = [e for e in PROBES if e.app_name == "web"]
    assert sorted(msgspec.json.encode(e) for e in expected) == sorted(
        line.encode() for line in probes.stdout.splitlines()
    )

    both = await autoserve("events", "--type", "health", "--type", "probe", "--app", "web", "--json", *url)
    got = [decode(line.encode()) for line in both.stdout.splitlines()]
    assert sorted(got, key=lambda e: e.timestamp) == got  # two streams merged by event time
    assert len(got) == 4 + 3

    headers = {"Autoserve-Reason": "not an event: bad JSON", "Autoserve-Subject": "autoserve.probe.completed.web.w-1",
               "Autoserve-Stream-Seq": "17", "Nats-Msg-Id": "dl-1"}  # fmt: skip
    await nc.jetstream().publish("autoserve.deadletter.detector", b"\x00garbage", headers=headers)
    parked = await autoserve("events", "--type", "deadletter", *url)
    assert parked.stdout.count("\n") == 1 and parked.stdout.split(None, 1)[1] == (
        "DeadLetter           detector  not an event: bad JSON (from autoserve.probe.completed.web.w-1 #17)\n"
    )
    parked_json = json.loads((await autoserve("events", "--type", "deadletter", "--json", *url)).stdout)
    assert (parked_json["type"], parked_json["service"], parked_json["stream_seq"]) == ("DeadLetter", "detector", "17")
    assert (await autoserve("events", "--json", *url)).stdout.count("\n") == len(AUDIT)  # not in the default

    none = await autoserve("events", "--app", "nothing-here", *url)
    assert (none.returncode, none.stdout) == (0, "")

    bad = await autoserve("events", "--type", "Bogus", *url)
    assert bad.returncode == 2 and "--type: unknown event type 'Bogus'" in bad.stderr


async def test_events_reads_the_alerting_events(nc: Client, nats_server) -> None:
    logged = NotificationLogged(receiver="team", group_key="0:{app=web}", outcome="sent", timestamp=at(13),
                                app_name="web", seq=1, firing=["a-w-1"], attempts=1)  # fmt: skip
    js = nc.jetstream()
    await provision(js)
    for event in [*ALERTS, logged]:
        await js.publish(subject_for(event), encode(event), headers={"Nats-Msg-Id": event.event_id})
    url = ("--nats-url", nats_server.url)
    alerts = await autoserve("events", "--type", "alert", "--app", "web", "--instance", "w-1", "--json", *url)
    assert [decode(line.encode()) for line in alerts.stdout.splitlines()] == ALERTS[:2]
    nflog = await autoserve("events", "--type", "nflog", "--app", "web", *url)
    assert nflog.stdout.split(None, 1)[1] == (
        "NotificationLogged   web  sent to team tier=0 seq=1 firing=1 resolved=0 attempts=1\n"
    )


async def test_events_follow_prints_new_events_until_interrupted(nc: Client, nats_server) -> None:
    await publish_known(nc)
    command = [AUTOSERVE, "events", "-f", "--type", "health", "--app", "web", "--nats-url", nats_server.url]
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        history = [await asyncio.wait_for(process.stdout.readline(), 30) for _ in range(3)]
        assert all(b"HealthChanged" in line for line in history)
        new = health("web", "w-2", True, False, 60)
        await nc.jetstream().publish(subject_for(new), encode(new))
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert "web/w-2  healthy (was unhealthy) after 3 consecutive" in line
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
