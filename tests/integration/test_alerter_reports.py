"""Reports in ClickHouse (real chDB) can leave out the maintenance windows the alerter records."""

from __future__ import annotations

import json
import time
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from autoserve_events import ProbeCompleted, SilenceCreated
from autoserve_reporter.adapters.api import build_app
from autoserve_reporter.adapters.clickhouse import Store
from autoserve_reporter.adapters.migrations import migrate
from autoserve_reporter.adapters.queries import Reports
from autoserve_reporter.core.report import maintenance_intervals, window
from autoserve_reporter.core.rows import (
    EVENT_COLUMNS,
    EVENTS_TABLE,
    METRIC_COLUMNS,
    METRICS_TABLE,
    event_row,
    metric_rows,
)

NOW = float(int(time.time()) // 60 * 60)  # recent: the tables have a TTL


def test_maintenance_intervals_are_clipped_and_merged() -> None:
    w = window(1, NOW)
    rows = [(NOW - 7200, NOW - 3000), (NOW - 3100, NOW - 2000), (NOW - 600, NOW + 600), (NOW - 9000, NOW - 8000)]
    assert maintenance_intervals(rows, w) == [(NOW - 3600, NOW - 2000), (NOW - 600, NOW)]


async def test_a_report_can_exclude_maintenance_time(tmp_path: Path) -> None:
    store = Store(f"chdb://{tmp_path / 'ch'}")
    try:
        await migrate(store)
        probes = [
            ProbeCompleted(instance_id="web-1", app_name="web", check_type="http", is_healthy=not (1800 < age <= 2400),
                           response_time_ms=5.0, timestamp=NOW - age, error=None if not (1800 < age <= 2400) else "timeout")
            for age in range(0, 3600, 60)
        ]  # fmt: skip
        lines = b"".join(json.dumps(list(r)).encode() + b"\n" for p in probes for r in metric_rows(p))
        await store.insert_lines(METRICS_TABLE, METRIC_COLUMNS, lines)
        window_event = SilenceCreated(silence_id="m1", app_name="web", starts_at=NOW - 2400, ends_at=NOW - 1800,
                                      created_by="alerting.maintenance_windows", reason="deploy", timestamp=NOW - 2400,
                                      maintenance=True, window="deploys")  # fmt: skip
        plain = SilenceCreated(silence_id="s1", app_name="web", starts_at=NOW - 600, ends_at=NOW, created_by="bob",
                               reason="noisy", timestamp=NOW - 600)  # fmt: skip
        one_instance = SilenceCreated(silence_id="m2", app_name="web", instance_id="web-1", starts_at=NOW - 1200,
                                      ends_at=NOW - 900, created_by="alerting.maintenance_windows", reason="disk",
                                      timestamp=NOW - 1200, maintenance=True, window="disk")  # fmt: skip
        rows = [event_row(e) for e in (window_event, plain, one_instance)]
        await store.insert_lines(
            EVENTS_TABLE, EVENT_COLUMNS, b"".join(json.dumps(list(r)).encode() + b"\n" for r in rows)
        )
        reports = Reports(store)
        full = await reports.health_report("web", 1, NOW)
        assert (full.total_health_checks, full.failed_checks) == (60, 10)
        assert full.excluded_maintenance_seconds == 0
        clean = await reports.health_report("web", 1, NOW, exclude_maintenance=True)
        assert (clean.total_health_checks, clean.failed_checks, clean.uptime_percent) == (50, 0, 100.0)
        # Neither the plain silence nor one instance's maintenance takes time out of the app's report.
        assert clean.excluded_maintenance_seconds == 600

        # The same through the report API that `autoserve report --exclude-maintenance` calls.
        # The API's clock is the wall clock, not NOW: two hours hold every probe above however
        # long the suite ran before this test.
        async with TestClient(TestServer(build_app(_Source(reports)))) as client:
            response = await client.get("/v1/apps/web/report", params={"hours": "2", "exclude_maintenance": "true"})
            assert response.status == 200
            body = await response.json()
            assert (body["total_health_checks"], body["excluded_maintenance_seconds"]) == (50, 600)
            response = await client.get("/v1/apps/web/report", params={"exclude_maintenance": "perhaps"})
            assert response.status == 400
            assert "exclude_maintenance" in (await response.json())["error"]
    finally:
        await store.close()


class _Source:
    """The report API's view of a reporter: real reports over the test's chDB store."""

    def __init__(self, reports: Reports) -> None:
        self.reports = reports

    async def known_app(self, app: str) -> bool:
        return app == "web"

    async def apps(self) -> list[str]:
        return ["web"]

    def is_ready(self) -> bool:
        return True

    def status(self) -> dict[str, object]:
        return {}
