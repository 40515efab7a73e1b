"""The detector against a real nats-server: thresholds, replay after a kill, duplicates,
poison messages, and a nats-server crash mid-stream."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from pathlib import Path

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from autoserve_events import (
    EVENTS_STREAM,
    PROBES_STREAM,
    ErrorKind,
    FailureDetected,
    FailureType,
    HealthChanged,
    ProbeCompleted,
    encode,
    subject_for,
)
from autoserve_runtime import EmbeddedNatsServer

from .conftest import (
    LOCALHOST,
    HttpTarget,
    Outputs,
    ServiceRunner,
    apply_yaml,
    check,
    config_for,
    stored_events,
    wait_for,
)

_seq = itertools.count()
AUTOSERVE = str(Path(sys.executable).parent / "autoserve")


def probe(healthy: bool, instance: str = "w-1", app: str = "web", **fields: object) -> ProbeCompleted:
    failed = (
        {}
        if healthy
        else {"status_code": 500, "error": "Unexpected status code: 500", "error_kind": ErrorKind.UNEXPECTED_STATUS}
    )
    return ProbeCompleted(instance_id=instance, app_name=app, check_type="http", is_healthy=healthy,
                          response_time_ms=3.0, timestamp=time.time() + next(_seq) * 1e-6, **{**failed, **fields})  # fmt: skip


async def publish(nc: Client, *events: ProbeCompleted, msg_id: str | None = None) -> None:
    """Publish as a careful producer does: retry until stored (a retry is deduplicated)."""
    js = nc.jetstream()
    for event in events:
        deadline = time.monotonic() + 30
        while True:
            try:
                await js.publish(subject_for(event), encode(event), headers={"Nats-Msg-Id": msg_id or event.event_id})
                break
            except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError):
                assert time.monotonic() < deadline, "JetStream never accepted the publish"
                await asyncio.sleep(0.1)


def caused_by(outputs: Outputs, cause: ProbeCompleted) -> list[FailureDetected]:
    return [e for e in outputs.events(FailureDetected) if e.cause_event_id == cause.event_id]


WEB = {
    "web": {
        "health_check": check(failure_threshold=3, success_threshold=2),
        "instances": [{"id": "w-1", "host": LOCALHOST, "port": 9}],
    }
}


async def test_health_changes_only_as_the_thresholds_say(
    detector_runner: ServiceRunner, nc: Client, outputs: Outputs
) -> None:
    await apply_yaml(nc, config_for(WEB))
    await detector_runner.start()
    P, F = True, False
    sequence = [P, F, P, P, F, F, P, F, F, F, F, P, F, P, P]
    events = [probe(r) for r in sequence]
    await publish(nc, *events)
    await wait_for(lambda: caused_by(outputs, events[-3]), what="the last failure to be processed")
    await wait_for(lambda: len(outputs.events(HealthChanged)) >= 3, what="three transitions")
    changes = [(c.previous, c.healthy, c.consecutive) for c in outputs.events(HealthChanged)]
    assert changes == [(None, True, 2), (True, False, 3), (False, True, 2)]
    fails = outputs.events(FailureDetected)
    assert [f.consecutive_count for f in fails if f.failure_type is FailureType.HEALTH_CHECK_FAILED] == [
        1,
        1,
        2,
        1,
        2,
        3,
        4,
        1,
    ]


async def test_a_slow_target_gives_high_response_time(
    detector_runner: ServiceRunner, prober, nc: Client, outputs: Outputs, http_target: HttpTarget
) -> None:
    app = {
        "health_check": check(path="/slowish"),
        "instances": [{"id": "s-1", "host": LOCALHOST, "port": http_target.port}],
    }
    config = config_for({"slowpoke": app}) + "detector:\n  max_response_time_ms: 100\n"
    await apply_yaml(nc, config)
    await detector_runner.start()
    await wait_for(lambda: outputs.events(FailureDetected), timeout=30, what="a failure")
    failure = outputs.events(FailureDetected)[0]
    assert (failure.failure_type, failure.severity, failure.app_name) == (
        FailureType.HIGH_RESPONSE_TIME,
        "medium",
        "slowpoke",
    )
    assert failure.details["response_time_ms"] >= 300 and failure.details["threshold"] == 100


async def wait_until_consuming(nc: Client) -> None:
    """The detector's durable consumer has a live subscriber: it replayed and went live."""
    js = nc.jetstream()
    bound = False

    async def check() -> None:
        nonlocal bound
        try:
            bound = bool((await js.consumer_info(PROBES_STREAM, "autoserve-detector")).push_bound)
        except NotFoundError:
            bound = False

    deadline = time.monotonic() + 30
    while not bound:
        assert time.monotonic() < deadline, "the detector never bound its consumer"
        await check()
        await asyncio.sleep(0.05)


def start_detector_process(url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([AUTOSERVE, "run", "detector", "--nats-url", url], stdout=out, stderr=out)


async def test_killed_mid_incident_it_resumes_with_the_same_counts(
    tmp_path: Path, nats_server: EmbeddedNatsServer, nc: Client, outputs: Outputs
) -> None:
    await apply_yaml(nc, config_for(WEB))
    first = start_detector_process(nats_server.url, tmp_path / "detector.log")
    try:
        await wait_until_consuming(nc)
        warmup = [probe(True), probe(True)]
        await publish(nc, *warmup)
        await wait_for(lambda: outputs.events(HealthChanged), timeout=30, what="the detector to be live")
        failing = [probe(False) for _ in range(4)]
        await publish(nc, *failing)
        await wait_for(lambda: caused_by(outputs, failing[-1]), what="four failures processed")
    finally:
        first.kill()  # SIGKILL in the middle of the incident
        first.wait()
    second = start_detector_process(nats_server.url, tmp_path / "detector.log")
    try:
        await wait_until_consuming(nc)
        fifth = probe(False)
        await publish(nc, fifth)
        await wait_for(lambda: caused_by(outputs, fifth), timeout=30, what="the fifth failure after the restart")
        failure = caused_by(outputs, fifth)[0]
        assert (failure.consecutive_count, failure.total_count, failure.is_critical) == (5, 5, True)
        assert failure.first_occurrence == failing[0].timestamp
        changes = await stored_events(nc, HealthChanged)
        assert [(c.previous, c.healthy) for c in changes] == [(None, True), (True, False)]  # none twice
        failures = [
            f for f in await stored_events(nc, FailureDetected) if f.failure_type is FailureType.HEALTH_CHECK_FAILED
        ]
        assert [f.consecutive_count for f in failures] == [1, 2, 3, 4, 5]
    finally:
        second.terminate()
        assert second.wait(30) == 0  # SIGTERM drains and exits cleanly


async def test_a_duplicate_delivery_changes_nothing(
    detector_runner: ServiceRunner, nc: Client, outputs: Outputs
) -> None:
    await apply_yaml(nc, config_for(WEB))
    await detector_runner.start()
    first, again = probe(False), probe(False)
    await publish(nc, first)
    await publish(nc, first, msg_id="a-different-msg-id")  # stored twice: only event_id tells
    await publish(nc, again)
    await wait_for(lambda: caused_by(outputs, again), what="the second failure")
    assert caused_by(outputs, again)[0].consecutive_count == 2
    assert detector_runner.service.consumer.stats.duplicates == 1


async def test_poison_messages_are_dead_lettered_and_the_consumer_goes_on(
    detector_runner: ServiceRunner, nc: Client, outputs: Outputs
) -> None:
    await apply_yaml(nc, config_for(WEB))
    await detector_runner.start()
    js = nc.jetstream()
    subject = "autoserve.probe.completed.web.w-1"
    poison = {
        b"\x00\xffnot json": "not an event",
        b'{"type": "ProbeCompleted", "is_healthy": "maybe"}': "ProbeCompleted",
        b'{"type": "ProbeExploded", "schema_version": 1}': "unknown event type 'ProbeExploded'",
        b'{"type": "ProbeCompleted", "x": "' + b"y" * 100_000 + b'"}': "oversized",
    }
    for payload in poison:
        await js.publish(subject, payload)
    after = probe(False)
    await publish(nc, after)
    await wait_for(lambda: caused_by(outputs, after), what="a good message after the poison")
    await wait_for(lambda: len(outputs.dead_letters()) == len(poison), what="every poison message dead-lettered")
    letters = outputs.dead_letters()
    assert {m.subject for m in letters} == {"autoserve.deadletter.detector"}
    for letter, reason in zip(letters, poison.values(), strict=True):
        assert reason in letter.headers["Autoserve-Reason"]
        assert letter.headers["Autoserve-Subject"] == subject
    assert caused_by(outputs, after)[0].consecutive_count == 1


async def test_nats_server_crash_mid_stream_loses_and_doubles_nothing(
    detector_runner: ServiceRunner, nats_server: EmbeddedNatsServer, nc: Client, outputs: Outputs
) -> None:
    await apply_yaml(nc, config_for(WEB))
    await detector_runner.start()
    before = [probe(False) for _ in range(3)]
    await publish(nc, *before)
    await wait_for(lambda: caused_by(outputs, before[-1]), what="failures before the crash")
    nats_server.kill()
    nats_server.start()
    await wait_for(lambda: nc.is_connected, timeout=30, what="reconnect")
    after = [probe(False) for _ in range(3)]
    await publish(nc, *after)
    await wait_for(lambda: caused_by(outputs, after[-1]), timeout=30, what="failures after the restart")
    assert caused_by(outputs, after[-1])[0].consecutive_count == 6
    assert caused_by(outputs, after[-1])[0].total_count == 6
    await asyncio.sleep(0)  # let late duplicates, if any, arrive before counting the trail
    failures = [
        f for f in await stored_events(nc, FailureDetected) if f.failure_type is FailureType.HEALTH_CHECK_FAILED
    ]
    assert [f.consecutive_count for f in failures] == [1, 2, 3, 4, 5, 6]


async def test_two_services_dead_lettering_the_same_message_store_two_letters(
    detector_runner: ServiceRunner, nats_server: EmbeddedNatsServer, nc: Client, outputs: Outputs
) -> None:
    from autoserve_breaker.service import BreakerService

    await apply_yaml(nc, config_for(WEB))
    await detector_runner.start()
    breaker = ServiceRunner(lambda: BreakerService(nats_server.url))
    await breaker.start()
    try:
        js = nc.jetstream()
        await js.publish("autoserve.probe.completed.web.w-1", b"\x00\xffnot json")
        await wait_for(lambda: len(outputs.dead_letters()) == 2, what="a letter from each service")
        stored = await js.stream_info(EVENTS_STREAM, subjects_filter="autoserve.deadletter.>")
        assert stored.state.subjects == {"autoserve.deadletter.detector": 1, "autoserve.deadletter.breaker": 1}
    finally:
        await breaker.stop()


async def test_probes_for_an_unconfigured_app_or_instance_become_no_state_and_are_dead_lettered(
    detector_runner: ServiceRunner, nats_server: EmbeddedNatsServer, nc: Client, outputs: Outputs
) -> None:
    """Anyone with publish rights can put a probe on the bus: one for an app nobody
    configured, or an instance not listed, used to create a phantom instance and an alert."""
    from autoserve_breaker.service import BreakerService
    from autoserve_runtime.observability import DEAD_LETTERS

    await apply_yaml(nc, config_for(WEB))
    await detector_runner.start()
    breaker = ServiceRunner(lambda: BreakerService(nats_server.url))
    await breaker.start()
    try:
        phantoms = [probe(False, app="ghost", instance="g-1"), probe(False, instance="w-99")]
        for _ in range(3):
            await publish(nc, *(probe(False, app=p.app_name, instance=p.instance_id) for p in phantoms))
        real = probe(False)
        await publish(nc, real)
        await wait_for(lambda: caused_by(outputs, real), what="the configured instance's failure")
        await wait_for(lambda: len(outputs.dead_letters()) == 12, what="6 letters each from detector and breaker")
        reasons = {m.headers["Autoserve-Reason"] for m in outputs.dead_letters()}
        assert reasons == {
            "unconfigured: app 'ghost' is not configured",
            "unconfigured: instance 'w-99' is neither listed nor discovered for app 'web'",
        }
        assert {(e.app_name, e.instance_id) for e in outputs.events()} == {("web", "w-1")}
        assert set(detector_runner.service.detector.instances) == {("web", "w-1")}
        assert DEAD_LETTERS.child("detector")["unconfigured"] >= 6
    finally:
        await breaker.stop()
