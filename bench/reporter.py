"""Reporter benchmarks: ingestion from JetStream into ClickHouse (chDB) by one
``autoserve run reporter`` process beside a bare ``client.insert`` of the same rows, and
report latency over 10 million stored probes.

Everything is on 127.0.0.1; the reporter runs as the operator runs it, with its own
embedded engine directory. The 10 million probes are generated inside ClickHouse with
``INSERT ... SELECT FROM numbers()`` (not through NATS), then the reporter process is
started on that directory and asked over its HTTP API, as ``autoserve report`` does.
"""

from __future__ import annotations

import asyncio
import datetime
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import httpx
from nats.js.api import DeliverPolicy

from autoserve_events import PROBES_STREAM, ErrorKind, ProbeCompleted
from autoserve_reporter.adapters.clickhouse import Store
from autoserve_reporter.adapters.migrations import migrate
from autoserve_reporter.adapters.queries import Reports
from autoserve_reporter.core.rows import METRIC_COLUMNS, METRICS_TABLE, metric_rows
from autoserve_reporter.service import ReporterSettings, consumer_specs
from autoserve_runtime import connect, free_port, provision, spawn_child, stop_child
from bench.common import LOG_DIR, VENV_BIN, WORK_DIR, Table, cpu_seconds, fmt, nats_server
from bench.detector import publish_all

# 10,000,000 probes: 100 apps x 100 instances, one probe a second each for 1,000 s; every
# 50th fails with an error row. Timestamps end now, so a 24 h report covers them all.
GENERATE = f"""
INSERT INTO {METRICS_TABLE} (app_name, metric_type, instance_id, timestamp, event_id, value, unit, check_type,
                             success, error_type, status_code)
SELECT
    concat('app-', toString(intDiv(number, 100) % 100)),
    m.1,
    concat('i-', toString(number % 100)),
    fromUnixTimestamp64Milli(toInt64(({{start:Float64}} + intDiv(number, 10000)) * 1000)),
    hex(cityHash64(number)),
    multiIf(m.1 = 'health_check_status', if(number % 50 = 7, 0., 1.),
            m.1 = 'health_check_response_time', 1 + (cityHash64(number, 1) % 1000) / 10., 1.),
    m.2,
    'http',
    if(m.1 = 'health_check_response_time', if(number % 50 = 7, 'false', 'true'), ''),
    if(m.1 = 'health_check_errors', 'http', ''),
    if(m.1 = 'health_check_errors', '503', '')
FROM numbers({{n:UInt64}})
ARRAY JOIN if(number % 50 = 7,
    [('health_check_response_time', 'ms'), ('health_check_status', 'status'), ('health_check_errors', 'count')],
    [('health_check_response_time', 'ms'), ('health_check_status', 'status')]) AS m
"""


def probe(n: int, now: float) -> ProbeCompleted:
    healthy = n % 20 != 0
    failed = {} if healthy else {"status_code": 503, "error": "Unexpected status code: 503",
                                 "error_kind": ErrorKind.UNEXPECTED_STATUS}  # fmt: skip
    return ProbeCompleted(instance_id=f"i{n % 1000}", app_name=f"app{n % 10}", check_type="http", is_healthy=healthy,
                          response_time_ms=float(n % 300), timestamp=now - 3600 + n * 1e-3, **failed)  # fmt: skip


class ReporterProcess:
    def __init__(self, nats_url: str, data: Path, name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = LOG_DIR / f"{name}.log"
        with log.open("ab") as out:
            self.process = spawn_child(
                [str(VENV_BIN / "autoserve"), "run", "reporter", "--nats-url", nats_url,
                 "--clickhouse-url", f"chdb://{data}", "--listen", f"127.0.0.1:{self.port}"],
                stdout=out, stderr=out,
            )  # fmt: skip
        self.client = httpx.AsyncClient(base_url=self.url, timeout=30)

    async def health(self) -> dict | None:
        try:
            response = await self.client.get("/v1/health")
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    async def ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while await self.health() is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the reporter did not become ready; see bench/.work/logs")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await self.client.aclose()
        stop_child(self.process, 30)


async def ingestion_table(events: int) -> Table:
    table = Table(
        "Reporter: ingestion, JetStream → ClickHouse (chDB), one process",
        ["path", "events", "rows", "seconds", "rows/s", "events/s", "reporter CPU s"],
    )
    server = nats_server("nats-reporter").start()
    data = WORK_DIR / "reporter-ingest"
    shutil.rmtree(data, ignore_errors=True)
    nc = await connect(server.url, "bench-reporter", timeout=10)
    reporter: ReporterProcess | None = None
    try:
        js = nc.jetstream()
        await provision(js)
        # the reporter's durable consumers, from the start of the stream, before publishing
        spec = consumer_specs(ReporterSettings(clickhouse_url="chdb:///unused"))[0]
        await js.add_consumer(PROBES_STREAM, replace(spec.config(), deliver_policy=DeliverPolicy.ALL))
        now = time.time()
        inputs = [probe(n, now) for n in range(events)]
        rows = [r for p in inputs for r in metric_rows(p)]
        await publish_all(js, inputs)

        reporter = ReporterProcess(server.url, data, "reporter-ingest")
        await reporter.ready()
        started = time.perf_counter()
        cpu0 = cpu_seconds(reporter.process.pid)
        deadline = time.monotonic() + 300
        while True:
            health = await reporter.health()
            stored = health["writers"][METRICS_TABLE]["rows_stored"] if health else 0
            if stored >= len(rows):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {stored} of {len(rows)} rows stored")
            await asyncio.sleep(0.05)
        seconds = time.perf_counter() - started
        cpu = cpu_seconds(reporter.process.pid) - cpu0
        await reporter.stop()
        reporter = None
        rate = len(rows) / seconds
        table.add("reporter (consume, map, batch, insert, ack)", fmt(events), fmt(len(rows)), fmt(seconds, 2),
                  fmt(rate), fmt(events / seconds), fmt(cpu, 1))  # fmt: skip

        bare_rate, bare_seconds = await _bare_insert(rows)
        table.add("bare client.insert, same rows, 10,000 a call", "—", fmt(len(rows)), fmt(bare_seconds, 2),
                  fmt(bare_rate), "—", "—")  # fmt: skip
        table.notes += [
            f"Goal ≥ 50,000 rows/s: {'met' if rate >= 50_000 else 'NOT met'}. "
            f"Reporter / bare insert = {rate / bare_rate:.2f}.",
            "The stream is filled first; the clock runs from the reporter's API answering to the last row stored "
            "(acknowledged only after that). A probe is 2 rows, a failed probe 3 (the seed's metric rows).",
            "The reporter inserts JSONCompactEachRow through clickhouse-connect's raw_insert; the bare path is "
            "clickhouse-connect's client.insert of Python tuples (datetimes converted beforehand, not timed).",
        ]
    finally:
        if reporter is not None:
            await reporter.stop()
        await nc.close()
        server.stop()
    return table


async def _bare_insert(rows: list[tuple]) -> tuple[float, float]:
    data = WORK_DIR / "reporter-bare"
    shutil.rmtree(data, ignore_errors=True)
    store = Store(f"chdb://{data}")
    try:
        await migrate(store)
        ts = METRIC_COLUMNS.index("timestamp")
        converted = [(*r[:ts], datetime.datetime.fromtimestamp(r[ts], datetime.UTC), *r[ts + 1 :]) for r in rows]

        def insert_all(client) -> None:
            for i in range(0, len(converted), 10_000):
                client.insert(METRICS_TABLE, converted[i : i + 10_000], column_names=list(METRIC_COLUMNS))

        started = time.perf_counter()
        await store.run(insert_all)
        seconds = time.perf_counter() - started
    finally:
        await store.close()
    return len(rows) / seconds, seconds


async def latency_table(probes: int = 10_000_000, runs: int = 15) -> Table:
    table = Table(
        f"Reporter: report latency over {probes / 1e6:g} million stored probes",
        ["query", "p50 ms", "p95 ms", "max ms"],
    )
    data = WORK_DIR / "reporter-10m"
    shutil.rmtree(data, ignore_errors=True)
    store = Store(f"chdb://{data}")
    now = time.time()
    try:
        await migrate(store)
        started = time.perf_counter()
        await store.command(GENERATE, {"start": now - probes / 10_000, "n": probes})
        generate_s = time.perf_counter() - started
        stored = (await store.query(f"SELECT count() FROM {METRICS_TABLE}"))[0][0]
        deadline = time.monotonic() + 60  # let the background merges of the fresh parts settle
        while (await store.query("SELECT count() FROM system.merges"))[0][0] and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        reports = Reports(store)
        sql = [await _timed(lambda: reports.health_report("app-42", 24, time.time())) for _ in range(runs)]
        timeline = [await _timed(lambda: reports.timeline("app-42", 24, time.time())) for _ in range(runs)]
        check = await reports.health_report("app-42", 24, time.time())
    finally:
        await store.close()

    server = nats_server("nats-reporter-10m").start()
    reporter = ReporterProcess(server.url, data, "reporter-10m")
    try:
        await reporter.ready()
        api = [
            await _timed(lambda: reporter.client.get("/v1/apps/app-42/report", params={"hours": 24}))
            for _ in range(runs)
        ]
    finally:
        await reporter.stop()
        server.stop()
    for name, times in (
        ("report app-42 --hours 24 via the HTTP API (what `autoserve report` asks)", api),
        ("the same report's SQL, in-process (3 queries, FINAL)", sql),
        ("availability timeline, 48 buckets, in-process", timeline),
    ):
        ordered = sorted(times)
        table.add(
            name, fmt(statistics.median(ordered), 1), fmt(ordered[int(len(ordered) * 0.95)], 1), fmt(ordered[-1], 1)
        )
    p50 = statistics.median(api)
    table.notes += [
        f"Goal < 300 ms: {'met' if p50 < 300 else 'NOT met'} (p50 via the API). {runs} runs each.",
        f"{stored:,} metric rows ({probes:,} probes x 2, plus an error row for every 50th) for 100 apps x 100 "
        f"instances at 1 s, generated in ClickHouse with INSERT … SELECT FROM numbers() in {generate_s:.1f} s "
        "(not through NATS). The report reads one app: "
        f"{check.total_health_checks:,} checks, uptime {check.uptime_percent:.2f} %, p95 {check.p95_response_time_ms} ms.",
    ]
    return table


async def _timed(call) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


async def reporter_tables(events: int = 200_000, probes: int = 10_000_000) -> list[Table]:
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return [await ingestion_table(events), await latency_table(probes)]


if __name__ == "__main__":
    from rich.console import Console

    for result in asyncio.run(reporter_tables()):
        Console().print(result.rich())
