"""The reporter end to end: a real nats-server, real chDB, the real prober, the report API
over HTTP on 127.0.0.1, and ``autoserve report`` as a separate process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client

from autoserve_events import (
    PROBES_STREAM,
    ProbeCompleted,
    encode,
    subject_for,
)
from autoserve_prober.service import ProberService
from autoserve_reporter.adapters.clickhouse import Store
from autoserve_reporter.core.rows import METRICS_TABLE, metric_rows
from autoserve_reporter.service import ReporterService, ReporterSettings, consumer_specs
from autoserve_runtime import EmbeddedNatsServer, free_port, provision, spawn_child, stop_child

from ..incidents import incident_events
from .conftest import LOCALHOST, HttpTarget, ServiceRunner, apply_yaml, check, config_for, wait_for

AUTOSERVE = str(Path(sys.executable).parent / "autoserve")


class Reporter:
    """A reporter in the test's loop with its own chDB directory and API port."""

    def __init__(self, nats_url: str, data: Path, **overrides: object) -> None:
        self.port = free_port()
        self.settings = ReporterSettings(
            clickhouse_url=f"chdb://{data}", listen=f"{LOCALHOST}:{self.port}", batch_seconds=0.2, **overrides
        )
        self.runner = ServiceRunner(lambda: ReporterService(nats_url, self.settings))
        self.url = f"http://{LOCALHOST}:{self.port}"

    @property
    def service(self) -> ReporterService:
        return self.runner.service

    async def get(self, path: str, **params: object) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            return await client.get(path, params=params)

    async def report(self, app: str, hours: float = 24) -> dict:
        response = await self.get(f"/v1/apps/{app}/report", hours=hours)
        assert response.status_code == 200, response.text
        return response.json()

    async def total(self, app: str) -> int:
        response = await self.get(f"/v1/apps/{app}/report", hours=24)
        return response.json()["total_health_checks"] if response.status_code == 200 else -1


@pytest.fixture
async def reporter(nats_server: EmbeddedNatsServer, nc: Client, tmp_path: Path) -> AsyncIterator[Reporter]:
    await provision(nc.jetstream())
    r = Reporter(nats_server.url, tmp_path / "clickhouse")
    await r.runner.start()
    yield r
    await r.runner.stop()


async def cli(*args: str) -> tuple[int, str, str]:
    """``autoserve`` as its own process, so the API in this loop keeps answering."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "autoserve_cli.main", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


def probe(app: str, instance: str, t: float, rt: float, healthy: bool = True, **kw: object) -> ProbeCompleted:
    return ProbeCompleted(instance_id=instance, app_name=app, check_type="http", is_healthy=healthy,
                          response_time_ms=rt, timestamp=t, **kw)  # fmt: skip


async def publish(nc: Client, events: list, *, msg_id_suffix: str = "") -> None:
    js = nc.jetstream()
    acks = [
        await js.publish_async(subject_for(e), encode(e), headers={"Nats-Msg-Id": e.event_id + msg_id_suffix})
        for e in events
    ]
    await asyncio.wait_for(asyncio.gather(*acks), 30)


def comparable(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("generated_at", "period_start", "period_end")}


# -- end to end -------------------------------------------------------------------------


async def test_probes_flow_in_and_cli_and_api_agree(
    nats_server: EmbeddedNatsServer, nc: Client, http_target: HttpTarget, reporter: Reporter
) -> None:
    await apply_yaml(nc, config_for({"web": {"health_check": check(path="/ok"), "instances": [
        {"id": "web-1", "host": LOCALHOST, "port": http_target.port},
    ]}, "broken": {"health_check": check(path="/fail"), "instances": [
        {"id": "b-1", "host": LOCALHOST, "port": http_target.port},
    ]}}))  # fmt: skip
    prober = ServiceRunner(lambda: ProberService(nats_server.url, docker=False))
    await prober.start()
    try:
        await wait_for(lambda: _at_least(reporter, "web", 3), timeout=20, what="3 web probes reported")
        await wait_for(lambda: _at_least(reporter, "broken", 3), timeout=20, what="3 broken probes reported")
    finally:
        await prober.stop()
    # everything published is stored before comparing
    info = await nc.jetstream().stream_info(PROBES_STREAM)
    durable = consumer_specs(reporter.settings)[0].durable
    await wait_for(lambda: _acked(reporter, durable) >= info.state.last_seq, what="all probes stored")

    api = await reporter.report("web")
    code, out, err = await cli("report", "web", "--json", "--reporter-url", reporter.url)
    assert code == 0, err
    assert comparable(json.loads(out)) == comparable(api)
    assert api["uptime_percent"] == 100.0 and api["instances"][0]["instance_id"] == "web-1"
    assert api["p95_response_time_ms"] > 0

    broken = await reporter.report("broken")
    assert broken["uptime_percent"] == 0.0 and broken["failed_checks"] == broken["total_health_checks"]
    assert broken["error_breakdown"] == {"http": broken["failed_checks"]}  # 500: error_kind unexpected_status

    code, out, err = await cli("report", "broken", "--reporter-url", reporter.url)
    assert code == 0, err
    assert "uptime" in out and "0.00 %" in out and "b-1" in out and "http" in out


async def _at_least(reporter: Reporter, app: str, n: int) -> bool:
    return await reporter.total(app) >= n


def _acked(reporter: Reporter, durable: str) -> int:
    return next(c.stats.acked_seq for c in reporter.service.consumers if c._spec.durable == durable)


async def test_report_api_errors_and_openapi(nc: Client, reporter: Reporter) -> None:
    now = time.time()
    await publish(nc, [probe("shop", "s1", now - 5, 3.0)])
    await wait_for(lambda: _at_least(reporter, "shop", 1), timeout=20, what="shop stored")

    missing = await reporter.get("/v1/apps/nope/report")
    assert missing.status_code == 404 and "unknown app 'nope'" in missing.json()["error"]
    bad = await reporter.get("/v1/apps/shop/report", hours="abc")
    assert bad.status_code == 400 and bad.json()["error"].startswith("hours: ") and "'abc'" in bad.json()["error"]
    bad = await reporter.get("/v1/apps/shop/report", hours="-2")
    assert bad.status_code == 400
    bad = await reporter.get("/v1/apps/shop.x/incidents")
    assert bad.status_code == 400 and bad.json()["error"].startswith("app: ")
    bad = await reporter.get("/v1/apps/shop/timeline", bucket_seconds="zero")
    assert bad.status_code == 400 and bad.json()["error"].startswith("bucket_seconds: ")

    assert (await reporter.get("/v1/apps")).json()["apps"] == ["shop"]
    timeline = (await reporter.get("/v1/apps/shop/timeline", hours=1)).json()
    assert sum(b["total_health_checks"] for b in timeline["buckets"]) == 1
    incidents = (await reporter.get("/v1/apps/shop/incidents")).json()
    assert incidents["incidents"] == [] and incidents["by_strategy"] == []
    spec = (await reporter.get("/openapi.json")).json()
    assert {"/v1/apps/{app}/report", "/v1/apps/{app}/incidents", "/v1/apps/{app}/timeline"} <= set(spec["paths"])
    assert "HealthReport" in spec["components"]["schemas"]
    health = await reporter.get("/v1/health")
    assert health.status_code == 200 and health.json()["ready"] is True

    code, _, err = await cli("report", "nope", "--reporter-url", reporter.url)
    assert code == 1 and "unknown app 'nope'" in err
    code, _, err = await cli("report", "shop", "--hours", "0", "--reporter-url", reporter.url)
    assert code == 2 and "hours: " in err


# -- idempotency: duplicates and replays ----------------------------------------------------


async def test_duplicates_and_replay_change_no_report(
    nats_server: EmbeddedNatsServer, nc: Client, tmp_path: Path
) -> None:
    await provision(nc.jetstream())
    now = time.time()
    probes = [probe("pay", f"p{k % 4}", now - 600 + k * 0.5, float(k % 97), healthy=k % 9 != 0,
                    **({} if k % 9 else {"error": "Connection refused"})) for k in range(800)]  # fmt: skip
    audit = incident_events("pay", "p1", now - 500, 30.0) + incident_events("pay", "p2", now - 400, 12.0)
    events = probes + audit

    reporter = Reporter(nats_server.url, tmp_path / "ch")
    await reporter.runner.start()
    try:
        await publish(nc, events)
        await wait_for(lambda: _at_least(reporter, "pay", 800), timeout=20, what="800 probes stored")
        incidents_url = "/v1/apps/pay/incidents"
        await wait_for(lambda: _incident_count(reporter, 2), timeout=20, what="2 incidents")
        before = comparable(await reporter.report("pay"))
        incidents_before = (await reporter.get(incidents_url)).json()
        assert incidents_before["by_strategy"][0]["avg_time_to_recover_s"] == pytest.approx(21.0)

        # the same events again, past JetStream's duplicate window (new Nats-Msg-Id): redelivery
        await publish(nc, events, msg_id_suffix="-again")
        info = await nc.jetstream().stream_info(PROBES_STREAM)
        durable = consumer_specs(reporter.settings)[0].durable
        await wait_for(lambda: _acked(reporter, durable) >= info.state.last_seq, what="duplicates taken")
        assert sum(c.stats.duplicates for c in reporter.service.consumers) >= len(events)
        assert comparable(await reporter.report("pay")) == before
    finally:
        await reporter.runner.stop()

    # a restarted reporter has forgotten the ids: a replay is stored again, and FINAL collapses it
    reporter = Reporter(nats_server.url, tmp_path / "ch")
    await reporter.runner.start()
    try:
        await publish(nc, events, msg_id_suffix="-replay")
        store = reporter.service.store
        sql = f"SELECT count() FROM {METRICS_TABLE} WHERE app_name = 'pay' AND metric_type = 'health_check_status'"
        await wait_for(lambda: _raw_count_at_least(store, sql, 1600), timeout=20, what="replayed rows stored")
        await wait_for(lambda: _events_stored(reporter, len(audit) * 2), timeout=20, what="replayed audit rows stored")
        assert comparable(await reporter.report("pay")) == before
        assert (await reporter.get(incidents_url)).json() == incidents_before
    finally:
        await reporter.runner.stop()


async def _incident_count(reporter: Reporter, n: int) -> bool:
    response = await reporter.get("/v1/apps/pay/incidents")
    return response.status_code == 200 and len(response.json()["incidents"]) == n


async def _raw_count_at_least(store, sql: str, n: int) -> bool:
    return (await store.query(sql))[0][0] >= n


async def _events_stored(reporter: Reporter, n: int) -> bool:
    return (await reporter.service.store.query("SELECT count() FROM events"))[0][0] >= n


# -- a ClickHouse outage: buffer, stop pulling, retry, lose nothing -------------------------


async def test_clickhouse_outage_loses_nothing_and_stops_pulling(
    nats_server: EmbeddedNatsServer, nc: Client, tmp_path: Path
) -> None:
    """A real failure: the table is detached in the real engine, so every insert fails with
    ClickHouse's own UNKNOWN_TABLE error through the real client; then it is attached again."""
    await provision(nc.jetstream())
    max_ack_pending = 300
    reporter = Reporter(nats_server.url, tmp_path / "ch", max_ack_pending=max_ack_pending, batch_rows=100)
    await reporter.runner.start()
    try:
        store = reporter.service.store
        await store.command(f"DETACH TABLE {METRICS_TABLE}")
        now = time.time()
        probes = [probe("ops", f"o{k % 5}", now - 300 + k * 0.1, 2.0) for k in range(1000)]
        await publish(nc, probes)
        writer = reporter.service.metrics
        await wait_for(lambda: writer.stats.insert_failures >= 2, what="inserts failing")
        durable = consumer_specs(reporter.settings)[0].durable
        js = nc.jetstream()

        async def stopped_pulling() -> bool:
            info = await js.consumer_info(PROBES_STREAM, durable)
            return info.num_ack_pending == max_ack_pending and info.num_pending == 1000 - max_ack_pending

        await wait_for(stopped_pulling, timeout=20, what="the reporter to stop pulling at max_ack_pending")
        assert writer.stats.buffered_rows <= max_ack_pending * 3  # bounded; nothing dropped
        assert writer.stats.rows_stored == 0

        await store.command(f"ATTACH TABLE {METRICS_TABLE}")
        await wait_for(lambda: _at_least(reporter, "ops", 1000), timeout=60, what="all 1000 probes stored")
        report = await reporter.report("ops")
        assert report["total_health_checks"] == 1000
        distinct = await store.query(f"SELECT uniqExact(event_id) FROM {METRICS_TABLE} WHERE app_name = 'ops'")
        assert distinct[0][0] == 1000
        await wait_for(lambda: _fully_acked(js, durable), timeout=20, what="every message acknowledged")
    finally:
        await reporter.runner.stop()


async def _fully_acked(js, durable: str) -> bool:
    info = await js.consumer_info(PROBES_STREAM, durable)
    return info.num_ack_pending == 0 and info.num_pending == 0


# -- poison messages ---------------------------------------------------------------------


async def test_poison_messages_are_dead_lettered_and_the_rest_stored(nc: Client, reporter: Reporter, outputs) -> None:
    now = time.time()
    js = nc.jetstream()
    await js.publish("autoserve.probe.completed.web.x", b"\x00not json")
    await js.publish("autoserve.event.failure.web.x", b'{"type":"FailureDetected","app_name":"web"}')
    bad_time = probe("web", "x", 1e13, 1.0)
    await js.publish(subject_for(bad_time), encode(bad_time))
    await publish(nc, [probe("web", "x", now, 4.0)])

    await wait_for(lambda: len(outputs.dead_letters()) == 3, what="3 dead letters")
    reasons = sorted(m.headers["Autoserve-Reason"] for m in outputs.dead_letters())
    assert any("timestamp: must be epoch seconds" in r and "10000000000000.0" in r for r in reasons), reasons
    assert all(m.subject == "autoserve.deadletter.reporter" for m in outputs.dead_letters())
    await wait_for(lambda: _at_least(reporter, "web", 1), timeout=20, what="the good probe stored")
    assert (await reporter.report("web"))["total_health_checks"] == 1


# -- graceful shutdown under load: SIGTERM mid-ingestion loses nothing --------------------


class ReporterProcess:
    """``autoserve run reporter`` as its own process, as deployed: SIGTERM is a real signal."""

    def __init__(self, nats_url: str, clickhouse_url: str, log: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://{LOCALHOST}:{self.port}"
        self.log = log
        self.env = {**os.environ, "AUTOSERVE_NATS_URL": nats_url, "AUTOSERVE_CLICKHOUSE_URL": clickhouse_url,
                    "AUTOSERVE_REPORTER_LISTEN": f"{LOCALHOST}:{self.port}", "AUTOSERVE_METRICS_PORT": str(free_port()),
                    **env}  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> ReporterProcess:
        with self.log.open("ab") as out:
            self.process = spawn_child(
                [AUTOSERVE, "run", "reporter"], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        await wait_for(self._ready, timeout=60, what="the reporter process ready")
        return self

    async def _ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log.read_text()[-3000:]
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                return (await client.get(f"{self.url}/v1/health")).json().get("ready") is True
        except httpx.HTTPError:
            return False

    async def total(self, app: str) -> int:
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.get(f"{self.url}/v1/apps/{app}/report", params={"hours": 24})
        except httpx.HTTPError:
            return -1
        return response.json()["total_health_checks"] if response.status_code == 200 else -1

    async def sigterm(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, 60)

    def kill(self) -> None:
        if self.process is not None:
            stop_child(self.process)


async def test_sigterm_under_load_loses_no_event_and_stores_each_once(
    nats_server: EmbeddedNatsServer, nc: Client, tmp_path: Path
) -> None:
    """Probes are published while ``autoserve run reporter`` ingests them; a SIGTERM stops it
    mid-stream (exit status 0), a new process takes over, and ClickHouse ends up with every
    probe exactly once."""
    await provision(nc.jetstream())
    n, chunk = 6000, 150
    now = time.time()
    probes = [probe("load", f"l{k % 8}", now - 1800 + k * 0.25, float(k % 50), healthy=k % 7 != 0,
                    **({} if k % 7 else {"error": "Connection refused"})) for k in range(n)]  # fmt: skip
    clickhouse_url = f"chdb://{tmp_path / 'ch'}"
    log = tmp_path / "reporter.log"

    async def publish_continuously() -> None:
        for start in range(0, n, chunk):  # 40 chunks, paced: the load runs across the stop
            await publish(nc, probes[start : start + chunk])
            await asyncio.sleep(0.1)

    first = await ReporterProcess(nats_server.url, clickhouse_url, log).start()
    second = ReporterProcess(nats_server.url, clickhouse_url, log)
    publishing = asyncio.create_task(publish_continuously())
    try:
        await wait_for(lambda: _stored_some(first, "load"), timeout=60, what="the first batches stored")
        assert not publishing.done(), "the load ended before the stop: not a stop under load"
        assert await first.sigterm() == 0, log.read_text()[-3000:]
        (first_stats,) = stop_lines(log)
        await asyncio.wait_for(publishing, 120)  # JetStream keeps what arrives while no reporter runs

        await second.start()
        await wait_for(lambda: _total_is(second, "load", n), timeout=120, what=f"all {n} probes reported")
        assert await second.sigterm() == 0, log.read_text()[-3000:]
        second_stats = stop_lines(log)[1]
    finally:
        publishing.cancel()
        first.kill()
        second.kill()

    store = Store(clickhouse_url)  # the reporter's own Store, on its data, once it has stopped
    try:
        distinct, final, raw = (await store.query(
            f"SELECT (SELECT uniqExact(event_id) FROM {METRICS_TABLE} WHERE app_name = 'load'),"
            f" (SELECT count() FROM {METRICS_TABLE} FINAL WHERE app_name = 'load' AND metric_type = 'health_check_status'),"
            f" (SELECT count() FROM {METRICS_TABLE} WHERE app_name = 'load' AND metric_type = 'health_check_status')"
        ))[0]  # fmt: skip
    finally:
        await store.close()
    assert distinct == n and final == n  # every event, each counted once
    # The drain: the first process stopped mid-ingestion, stored every probe it had taken
    # (nothing left buffered) and acknowledged each, so the second got exactly the rest.
    taken = first_stats["probes"]
    assert 0 < taken["received"] < n and taken["acked_seq"] == taken["received"], first_stats
    assert first_stats["metrics"]["buffered_rows"] == 0
    assert first_stats["metrics"]["rows_stored"] == sum(len(metric_rows(p)) for p in probes[: taken["received"]])
    assert second_stats["probes"]["received"] == n - taken["received"], second_stats
    assert raw == n  # so no row was stored twice either


def stop_lines(log: Path) -> list[dict]:
    """The probe consumer's and the metrics writer's numbers from each "reporter stopped" line."""
    durable = consumer_specs(ReporterSettings("chdb://unused"))[0].durable
    lines = [json.loads(line) for line in log.read_text().splitlines() if '"reporter stopped"' in line]
    return [{"probes": s["consumers"][durable], "metrics": s["writers"][METRICS_TABLE]} for s in lines]


async def _stored_some(reporter: ReporterProcess, app: str) -> bool:
    return await reporter.total(app) > 0


async def _total_is(reporter: ReporterProcess, app: str, n: int) -> bool:
    return await reporter.total(app) == n
