"""The documentation's examples, run for real: docs/subscribe.md's nats-py program against
a nats-server on the deploy config, as the read-only operator user; docs/clickhouse.md's
SQL against the reporter's tables in chDB."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from autoserve_events import encode, subject_for
from autoserve_reporter.adapters.clickhouse import Store
from autoserve_reporter.adapters.migrations import migrate
from autoserve_reporter.core.report import seed_p95
from autoserve_runtime import spawn_child

from ..support.secure_nats import SecureNats, session
from .test_security import SAMPLES

DOCS = Path(__file__).resolve().parents[2] / "docs"


def blocks(page: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (DOCS / page).read_text(), re.S)


async def test_the_ten_line_subscriber_in_the_docs_prints_failures(tmp_path: Path) -> None:
    (program,) = blocks("subscribe.md", "python")
    assert len([line for line in program.splitlines() if line.strip()]) <= 10
    (cli_line,) = [b for b in blocks("subscribe.md", "sh") if "nats sub" in b]
    assert "--user operator" in cli_line and "'autoserve.event.failure.>'" in cli_line
    script = tmp_path / "failures.py"
    script.write_text(program)
    server = SecureNats(tmp_path / "nats").start()
    output = tmp_path / "out.txt"
    env = {**os.environ, "NATS_URL": server.url, "NATS_PASSWORD": server.passwords["operator"], "PYTHONUNBUFFERED": "1"}
    with output.open("wb") as out:
        process = spawn_child([sys.executable, str(script)], env=env, stdout=out, stderr=subprocess.STDOUT)
    detector = await session(server, "detector")
    try:
        event = SAMPLES["FailureDetected"]
        expected = "web w-1 port_not_listening high planted"

        async def published_and_printed() -> bool:
            await detector.nc.publish(subject_for(event), encode(event))
            await detector.nc.flush()
            return expected in output.read_text()

        for _ in range(100):  # the program subscribes a moment after it starts; bounded
            if await published_and_printed() or process.poll() is not None:
                break
            await asyncio.sleep(0.2)
        assert expected in output.read_text(), output.read_text()
    finally:
        process.terminate()
        process.wait(10)
        await detector.nc.close()
        server.stop()


# Response times (one decimal, so the doc's round(…, 1) keeps them) with wide gaps at the
# top, where nearest rank and interpolation part. n = 20: the seed's index 19 is the maximum.
LATENCIES = {
    "web-2": [round(1.5**k, 1) for k in range(20)][::-1],
    "web-3": [float((k * 37) % 101) + 0.5 for k in range(23)],
}


def probe_rows(instance: str, values: list[float]) -> str:
    """One probe per value, as the reporter stores it: a status row and a response-time row."""
    rows = []
    for k, value in enumerate(values):
        when, event = f"now64(3) - toIntervalSecond({k + 1})", f"{instance}-{k}"
        rows += [
            f"('web', 'health_check_status', '{instance}', {when}, '{event}', 1, 'status', 'http', '', '', '')",
            f"('web', 'health_check_response_time', '{instance}', {when}, '{event}', {value}, 'ms', 'http', 'true', '', '')",
        ]
    return (
        "INSERT INTO health_metrics (app_name, metric_type, instance_id, timestamp, event_id, value, unit, "
        "check_type, success, error_type, status_code) VALUES " + ", ".join(rows)
    )


async def test_the_sql_in_the_docs_runs_on_the_reporters_tables(tmp_path: Path) -> None:
    queries = blocks("clickhouse.md", "sql")
    assert len(queries) >= 4
    store = Store(f"chdb://{tmp_path / 'clickhouse'}")
    try:
        await migrate(store)
        await store.command(
            "INSERT INTO health_metrics (app_name, metric_type, instance_id, timestamp, event_id, value, unit, "
            "check_type, success, error_type, status_code) VALUES "
            "('web', 'health_check_status', 'web-1', now64(3), 'p1', 1, 'status', 'http', '', '', ''), "
            "('web', 'health_check_response_time', 'web-1', now64(3), 'p1', 12.5, 'ms', 'http', 'true', '', ''), "
            "('web', 'health_check_errors', 'web-1', now64(3), 'p2', 1, 'count', 'http', '', 'connection_refused', '')"
        )
        for instance, values in LATENCIES.items():
            await store.command(probe_rows(instance, values))
        await store.command(
            "INSERT INTO events (app_name, type, instance_id, timestamp, event_id, emitted_at, schema_version, "
            "failure_type, severity, strategy, success, duration_ms, message, cause_event_id, payload) VALUES "
            "('web', 'FailureDetected', 'web-1', now64(3), 'f1', now64(3), 1, 'port_not_listening', 'high', '', "
            "NULL, NULL, 'refused', '', '{}'), "
            "('web', 'RecoveryExecuted', 'web-1', now64(3), 'r1', now64(3), 1, 'port_not_listening', '', "
            "'restart_container', true, 250, '', 'f1', '{\"failure_event_id\": \"f1\"}')"
        )
        results = [await store.query(sql) for sql in queries]
        interpolated = await store.query(queries[0].replace("quantileExactIf(", "quantileIf("))
    finally:
        await store.close()
    uptime, failures, recoveries, errors = results[:4]
    assert uptime[0] == ("web-1", 100.0, 1, 12.5, 12.5)
    # The doc's p95 is the seed's nearest rank (the reporter's), on 20 and 23 values.
    assert [row[0] for row in uptime[1:]] == list(LATENCIES)
    for (instance, values), row in zip(LATENCIES.items(), uptime[1:], strict=True):
        assert row[1:3] == (100.0, len(values)), row
        assert row[3] == pytest.approx(sum(values) / len(values), abs=0.051)
        assert row[4] == seed_p95(values), (instance, row)
    # ...which an interpolating quantile would not give on the same rows.
    assert [row[4] for row in interpolated[1:]] != [seed_p95(v) for v in LATENCIES.values()]
    assert [row[:3] for row in failures] == [("port_not_listening", "high", 1)]
    assert [row[3:] for row in recoveries] == [("restart_container", True, 250.0, "port_not_listening")]
    assert [row[1:] for row in errors] == [("connection_refused", 1)]
