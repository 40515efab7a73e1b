"""/healthz, /readyz and /metrics of real service processes against a real nats-server, and
a graceful shutdown under load that loses no event."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from autoserve_events import (
    BREAKER_REPORT_PREFIX,
    PROBES_STREAM,
    ErrorKind,
    FailureDetected,
    FailureType,
    HealthChanged,
    ProbeCompleted,
    RecoveryExecuted,
    encode,
    subject,
    subject_for,
)
from autoserve_runtime import EmbeddedNatsServer, free_port, observability
from autoserve_runtime.observability import Endpoint, HealthServer

from .conftest import LOCALHOST, HttpTarget, Outputs, apply_yaml, check, config_for, stored_events, wait_for
from .test_recovery_claims import publish_copies, stopped
from .test_recovery_docker import app_config

AUTOSERVE = str(Path(sys.executable).parent / "autoserve")
_seq = itertools.count()


def failing_probe(instance: str = "w-1", app: str = "web") -> ProbeCompleted:
    return ProbeCompleted(instance_id=instance, app_name=app, check_type="http", is_healthy=False,
                          response_time_ms=2.0, timestamp=time.time() + next(_seq) * 1e-6, status_code=500,
                          error="Unexpected status code: 500", error_kind=ErrorKind.UNEXPECTED_STATUS)  # fmt: skip


async def publish(nc: Client, *events: ProbeCompleted) -> None:
    """Retry until stored, as a careful producer does (a retry is deduplicated)."""
    js = nc.jetstream()
    for event in events:
        deadline = time.monotonic() + 30
        while True:
            try:
                await js.publish(subject_for(event), encode(event), headers={"Nats-Msg-Id": event.event_id})
                break
            except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError):
                assert time.monotonic() < deadline, "JetStream never accepted the publish"
                await asyncio.sleep(0.1)


def start_detector(url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    return start_service("detector", url, port, log)


def start_service(name: str, url: str, port: int, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``autoserve run NAME`` with its endpoint on ``port``; its data (recovery's process
    records, the reporter's chDB) next to ``log``, JSON logs."""
    env = {**os.environ, "AUTOSERVE_DATA_DIR": str(log.parent / f"{name}-data"), "AUTOSERVE_LOG_FORMAT": "json"}
    with log.open("ab") as out:
        command = [AUTOSERVE, "run", name, "--nats-url", url, "--metrics-port", str(port), *args]
        return subprocess.Popen(command, stdout=out, stderr=out, env=env)


async def get(port: int, path: str) -> tuple[int | None, str]:
    """(status, body); (None, error) while nothing listens."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"http://{LOCALHOST}:{port}{path}") as response,
        ):
            return response.status, await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return None, str(exc)


async def wait_status(port: int, path: str, status: int, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    last: tuple[int | None, str] = (None, "")
    while time.monotonic() < deadline:
        last = await get(port, path)
        if last[0] == status:
            return last[1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} never answered {status} within {timeout}s; last: {last}")


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page, parsed by prometheus-client's own parser."""
    found: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(page: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return page[(name, frozenset(labels.items()))]


DETECTOR = {"service": "detector", "consumer": "autoserve-detector"}
WEB = {"web": {"health_check": check(failure_threshold=3), "instances": [{"id": "w-1", "host": LOCALHOST, "port": 9}]}}


def stop_and_wait(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM, then the exit status."""
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout)


async def test_readyz_waits_for_nats_and_replay_and_metrics_count(
    tmp_path: Path, nats_server: EmbeddedNatsServer, nc: Client, outputs: Outputs
) -> None:
    await apply_yaml(nc, config_for(WEB))
    port, log = free_port(), tmp_path / "detector.log"
    first = start_detector(nats_server.url, port, log)
    try:
        await wait_status(port, "/readyz", 200)
        page = samples(await wait_status(port, "/metrics", 200))
        assert value(page, "autoserve_consumer_received_total", **DETECTOR) == 0
        before = [failing_probe() for _ in range(40)]
        await publish(nc, *before)
        await wait_for(lambda: len(outputs.events(FailureDetected)) >= 40, timeout=30, what="40 failures")
        page = samples((await get(port, "/metrics"))[1])
        assert value(page, "autoserve_consumer_received_total", **DETECTOR) == 40  # the counters moved
        assert value(page, "autoserve_publish_stored_total", service="detector") >= 40
        assert value(page, "autoserve_nats_connected", client="autoserve-detector") == 1
        assert value(page, "autoserve_ready") == 1
    finally:
        code = stop_and_wait(first)
    assert code == 0

    # Before replay: NATS is down, the process is alive (healthz) but not ready (readyz).
    nats_server.stop()
    second = start_detector(nats_server.url, port, log)
    try:
        assert await wait_status(port, "/healthz", 200) == "ok\n"
        status, body = await get(port, "/readyz")
        assert status == 503
        checks = json.loads(body)["checks"]
        assert checks["nats connected"] is False and checks["service ready"] is False, checks
        page = samples((await get(port, "/metrics"))[1])
        assert value(page, "autoserve_ready") == 0

        # After replay: ready, and the 40 inputs before the restart were folded again.
        nats_server.start()
        await wait_status(port, "/readyz", 200, timeout=60)
        page = samples((await get(port, "/metrics"))[1])
        assert value(page, "autoserve_consumer_replayed_events", **DETECTOR) == 40
        assert value(page, "autoserve_consumer_received_total", **DETECTOR) == 0
        after = [failing_probe() for _ in range(10)]
        await publish(nc, *after)
        await wait_for(lambda: len(outputs.events(FailureDetected)) >= 50, timeout=30, what="ten more failures")

        def counted() -> float:
            return value(samples(text), "autoserve_consumer_received_total", **DETECTOR)

        text = ""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = (await get(port, "/metrics"))[1]
            if counted() == 10 and value(samples(text), "autoserve_consumer_lag_messages", **DETECTOR) == 0:
                break
            await asyncio.sleep(0.1)
        page = samples(text)
        assert counted() == 10
        assert value(page, "autoserve_consumer_lag_messages", **DETECTOR) == 0  # all acknowledged
        assert value(page, "autoserve_consumer_acked_sequence", **DETECTOR) == 50
        assert value(page, "autoserve_nats_reconnects_total", client="autoserve-detector") == 0
        # The consecutive count survived the restart: the replay rebuilt it.
        failures = [f for f in outputs.events(FailureDetected) if f.failure_type is FailureType.HEALTH_CHECK_FAILED]
        assert max(f.consecutive_count for f in failures) == 50
    finally:
        code = stop_and_wait(second)
    assert code == 0
    assert "stopping by cancellation" not in log.read_text()  # drained, not cancelled after the grace


async def test_the_prober_counts_probes_by_result(prober, nc: Client, http_target: HttpTarget) -> None:
    def healthy_probes() -> float:
        page = samples(observability.metrics_text().decode())
        return page.get(("autoserve_probes_total", frozenset({"check_type": "http", "result": "healthy"}.items())), 0)

    ok = healthy_probes()  # other tests in this process may have probed already
    app = {
        "health_check": check(path="/ok"),
        "instances": [{"id": f"p-{i}", "host": LOCALHOST, "port": http_target.port} for i in range(3)],
    }
    await apply_yaml(nc, config_for({"probed": app}))
    await wait_for(lambda: healthy_probes() >= ok + 6, timeout=30, what="six healthy probes counted")
    page = samples(observability.metrics_text().decode())
    assert value(page, "autoserve_probe_targets") == 3
    assert value(page, "autoserve_events_out_total", service="prober", type="ProbeCompleted") >= 6
    assert value(page, "autoserve_publish_submitted_total", service="prober") >= 6


async def test_a_taken_port_leaves_the_service_running_without_the_endpoint() -> None:
    with socket.socket() as taken:
        taken.bind((LOCALHOST, 0))
        taken.listen()
        server = HealthServer(Endpoint(LOCALHOST, taken.getsockname()[1]))
        assert await server.start() is False
        await server.stop()


async def test_sigterm_under_load_loses_no_event(
    tmp_path: Path, nats_server: EmbeddedNatsServer, nc: Client, outputs: Outputs
) -> None:
    """Probes keep coming while the detector is stopped with SIGTERM and started again:
    every probe gets its one failure event, the counts run on without a gap, and the
    stopped process acknowledged everything it had processed before it exited 0."""
    instances = [f"w-{i}" for i in range(4)]
    apps = {"web": {"health_check": check(failure_threshold=3),
                    "instances": [{"id": i, "host": LOCALHOST, "port": 9} for i in instances]}}  # fmt: skip
    await apply_yaml(nc, config_for(apps))
    port, log = free_port(), tmp_path / "detector.log"
    first = start_detector(nats_server.url, port, log)
    second: subprocess.Popen[bytes] | None = None
    probes: list[ProbeCompleted] = []
    keep_publishing = asyncio.Event()
    keep_publishing.set()

    async def steady_stream() -> None:
        """Load until the second detector is up: the SIGTERM and the restart land under it
        (bounded: 40,000 probes at most)."""
        while keep_publishing.is_set() and len(probes) < 40_000:
            batch = [failing_probe(instances[(len(probes) + n) % len(instances)]) for n in range(50)]
            await publish(nc, *batch)
            probes.extend(batch)
            await asyncio.sleep(0.005)

    try:
        await wait_status(port, "/readyz", 200)
        producer = asyncio.create_task(steady_stream())
        await wait_for(lambda: len(outputs.events(FailureDetected)) >= 300, timeout=60, what="the detector busy")
        code = await asyncio.to_thread(stop_and_wait, first)
        assert code == 0
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        assert not [line for line in lines if line["event"] == "stopping by cancellation"], "cancelled, not drained"
        stopped = [line for line in lines if line["event"] == "detector stopped"][-1]
        assert stopped["acked_seq"] == stopped["last_seq"] > 0  # everything it finished is acknowledged
        second = start_detector(nats_server.url, port, log)
        await wait_status(port, "/readyz", 200, timeout=60)
        keep_publishing.clear()
        await producer
        assert not producer.exception()

        js = nc.jetstream()

        async def caught_up() -> bool:
            info = await js.consumer_info(PROBES_STREAM, "autoserve-detector")
            last = (await js.stream_info(PROBES_STREAM)).state.last_seq
            return info.ack_floor.stream_seq == last

        deadline = time.monotonic() + 120
        while not await caught_up():
            assert time.monotonic() < deadline, "the restarted detector never acknowledged the whole stream"
            await asyncio.sleep(0.2)
    finally:
        if first.poll() is None:
            first.kill()
        if second is not None:
            code = await asyncio.to_thread(stop_and_wait, second)
            assert code == 0

    failures = [
        f for f in await stored_events(nc, FailureDetected) if f.failure_type is FailureType.HEALTH_CHECK_FAILED
    ]
    causes = Counter(f.cause_event_id for f in failures)
    assert set(causes) == {p.event_id for p in probes}, "a probe got no failure event: an event was lost"
    assert max(causes.values()) == 1, "a probe was processed twice into the audit trail"
    for instance in instances:
        counts = [f.consecutive_count for f in failures if f.instance_id == instance]
        assert counts == list(range(1, len(counts) + 1)), f"{instance}: the count broke across the restart"


async def test_events_by_type_dead_letters_and_handler_latency(
    tmp_path: Path, nats_server: EmbeddedNatsServer, nc: Client, outputs: Outputs
) -> None:
    """What EventConsumer reports itself: live inputs and outputs by type, dead letters by
    reason, and the sampled fold latency."""
    await apply_yaml(nc, config_for(WEB))
    port = free_port()
    detector = start_detector(nats_server.url, port, tmp_path / "detector.log")
    try:
        await wait_status(port, "/readyz", 200)
        await publish(nc, *[failing_probe() for _ in range(130)])
        await nc.jetstream().publish("autoserve.probe.completed.web.w-1", b"\x00 not an event")
        await wait_for(lambda: len(outputs.dead_letters()) == 1, timeout=30, what="the poison dead-lettered")
        await wait_for(lambda: len(outputs.events(FailureDetected)) >= 130, timeout=30, what="130 failures")
        page = samples((await get(port, "/metrics"))[1])
        assert value(page, "autoserve_events_in_total", service="detector", type="ProbeCompleted") == 130
        assert value(page, "autoserve_events_out_total", service="detector", type="FailureDetected") >= 130
        assert value(page, "autoserve_dead_letters_total", service="detector", reason="malformed") == 1
        assert value(page, "autoserve_handler_seconds_count", service="detector") == 2  # 130 // 64
    finally:
        code = stop_and_wait(detector)
    assert code == 0


# -- every service, and what the recovery service, the breaker and the reporter count --------

SERVICE_ARGS: dict[str, tuple[str, ...]] = {
    "prober": ("--no-docker",),
    "detector": (),
    "breaker": (),
    "recovery": ("--no-docker",),
    "reporter": (),  # its report API on a free port: added below
    "alerter": (),
}


@pytest.mark.parametrize("name", list(SERVICE_ARGS))
async def test_every_service_serves_health_readiness_and_metrics_and_drains_on_sigterm(
    name: str, tmp_path: Path, nats_server: EmbeddedNatsServer, nc: Client
) -> None:
    await apply_yaml(nc, config_for(WEB))
    port, log = free_port(), tmp_path / f"{name}.log"
    args = SERVICE_ARGS[name] + (("--listen", f"{LOCALHOST}:{free_port()}") if name == "reporter" else ())
    process = start_service(name, nats_server.url, port, log, *args)
    try:
        assert await wait_status(port, "/healthz", 200) == "ok\n"
        ready = json.loads(await wait_status(port, "/readyz", 200, timeout=60))
        assert ready["service"] == name and ready["ready"] is True and all(ready["checks"].values()), ready
        page = samples(await wait_status(port, "/metrics", 200))
        assert value(page, "autoserve_service_info", service=name) == 1
        assert value(page, "autoserve_ready") == 1
        assert any(key[0] == "autoserve_publish_submitted_total" and ("service", name) in key[1] for key in page)
        assert ("process_resident_memory_bytes", frozenset()) in page
    finally:
        code = await asyncio.to_thread(stop_and_wait, process)
    assert code == 0, log.read_text()[-3000:]
    assert "stopping by cancellation" not in log.read_text()  # drained within the grace


RECOVERY = {"service": "recovery", "consumer": "autoserve-recovery"}


async def test_recovery_metrics_count_inputs_outputs_dead_letters_latency_and_lag(
    tmp_path: Path, nats_server: EmbeddedNatsServer, nc: Client, outputs: Outputs
) -> None:
    """The recovery service fetches from its own pull consumer: its inputs, outputs, dead
    letters, handling time and the work queue's lag are exported all the same. Docker is
    off, so a restart of a container fails (an output) and backs off: the next failure of
    that instance is deferred, held unacknowledged, which is the lag."""
    await apply_yaml(nc, app_config("web", backoff_initial_seconds=120))
    port, log = free_port(), tmp_path / "recovery.log"
    process = start_service("recovery", nats_server.url, port, log, "--no-docker")
    js = nc.jetstream()
    try:
        await wait_status(port, "/readyz", 200, timeout=60)
        page = samples(await wait_status(port, "/metrics", 200))
        assert value(page, "autoserve_consumer_bound", **RECOVERY) == 1
        assert value(page, "autoserve_consumer_lag_messages", **RECOVERY) == 0
        health = HealthChanged(instance_id="c-1", app_name="web", healthy=False, previous=True, consecutive=2,
                               reason="test", timestamp=time.time())  # fmt: skip
        await js.publish(subject_for(health), encode(health))
        await publish_copies(nc, stopped("web", "c-1"), 1)
        await wait_for(lambda: outputs.events(RecoveryExecuted), timeout=30, what="the failed restart recorded")
        assert "docker engine unavailable" in (outputs.events(RecoveryExecuted)[0].error or "")
        await publish_copies(nc, stopped("web", "c-1"), 1)  # in backoff: deferred
        await js.publish(subject(FailureDetected, "web", "c-1"), b"\x00 not an event")
        await wait_for(lambda: len(outputs.dead_letters()) == 1, timeout=30, what="the poison dead-lettered")

        page: dict = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the deferred input is counted in and held
            page = samples((await get(port, "/metrics"))[1])
            if page.get(("autoserve_consumer_ack_pending_messages", frozenset(RECOVERY.items()))) == 1 and page.get(
                ("autoserve_events_in_total", frozenset({"service": "recovery", "type": "FailureDetected"}.items()))
            ) == 2:  # fmt: skip
                break
            await asyncio.sleep(0.1)
        assert value(page, "autoserve_events_in_total", service="recovery", type="FailureDetected") == 2
        assert value(page, "autoserve_events_in_total", service="recovery", type="HealthChanged") == 1
        assert value(page, "autoserve_events_out_total", service="recovery", type="RecoveryExecuted") == 1
        assert value(page, "autoserve_dead_letters_total", service="recovery", reason="malformed") == 1
        assert value(page, "autoserve_consumer_dead_lettered_total", **RECOVERY) == 1
        assert value(page, "autoserve_consumer_outputs_total", **RECOVERY) == 1
        assert value(page, "autoserve_consumer_received_total", **RECOVERY) >= 4
        assert value(page, "autoserve_consumer_lag_messages", **RECOVERY) == 1  # the deferred failure
        assert value(page, "autoserve_consumer_ack_pending_messages", **RECOVERY) == 1
        assert value(page, "autoserve_consumer_acked_sequence", **RECOVERY) >= 3
        assert value(page, "autoserve_handler_seconds_count", service="recovery") >= 4  # every input is timed
        assert value(page, "autoserve_handler_seconds_sum", service="recovery") > 0
        assert value(page, "autoserve_publish_stored_total", service="recovery") >= 1
    finally:
        code = await asyncio.to_thread(stop_and_wait, process)
    assert code == 0
    assert "stopping by cancellation" not in log.read_text()


async def test_breaker_counts_dead_lettered_reports(
    tmp_path: Path, nats_server: EmbeddedNatsServer, nc: Client, outputs: Outputs
) -> None:
    await apply_yaml(nc, config_for(WEB))
    port = free_port()
    breaker = start_service("breaker", nats_server.url, port, tmp_path / "breaker.log")
    try:
        await wait_status(port, "/readyz", 200, timeout=60)
        await nc.publish(f"{BREAKER_REPORT_PREFIX}.web.w-1", b"not a report")
        await nc.publish(f"{BREAKER_REPORT_PREFIX}.web.bad:name", b'{"success": false}')  # not a name
        await wait_for(lambda: len(outputs.dead_letters()) == 2, timeout=30, what="two reports dead-lettered")
        page = samples((await get(port, "/metrics"))[1])
        assert value(page, "autoserve_dead_letters_total", service="breaker", reason="malformed") == 2
    finally:
        code = await asyncio.to_thread(stop_and_wait, breaker)
    assert code == 0


async def test_reporter_exports_stored_rows_by_table(
    tmp_path: Path, nats_server: EmbeddedNatsServer, nc: Client
) -> None:
    await apply_yaml(nc, config_for(WEB))
    port = free_port()
    reporter = start_service("reporter", nats_server.url, port, tmp_path / "reporter.log",
                             "--listen", f"{LOCALHOST}:{free_port()}")  # fmt: skip
    try:
        await wait_status(port, "/readyz", 200, timeout=60)

        def series(page: dict, name: str, table: str) -> float | None:
            return page.get((name, frozenset({"table": table}.items())))

        page = samples((await get(port, "/metrics"))[1])
        assert series(page, "autoserve_reporter_rows_stored_total", "health_metrics") == 0
        await publish(nc, *[failing_probe() for _ in range(20)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            page = samples((await get(port, "/metrics"))[1])
            if (series(page, "autoserve_reporter_rows_stored_total", "health_metrics") or 0) >= 20:
                break
            await asyncio.sleep(0.2)
        assert series(page, "autoserve_reporter_rows_stored_total", "health_metrics") >= 20
        assert series(page, "autoserve_reporter_batches_stored_total", "health_metrics") >= 1
        assert series(page, "autoserve_reporter_insert_failures_total", "health_metrics") == 0
        assert series(page, "autoserve_reporter_buffered_rows", "health_metrics") == 0
        assert series(page, "autoserve_reporter_rows_stored_total", "events") is not None
        assert value(page, "autoserve_events_in_total", service="reporter", type="ProbeCompleted") == 20
    finally:
        code = await asyncio.to_thread(stop_and_wait, reporter)
    assert code == 0
