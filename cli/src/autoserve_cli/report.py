"""``autoserve report APP``: the seed's health report, asked of the reporter's API.

With the embedded engine (chDB) only the reporter process may open the data directory, so
this command never reads ClickHouse itself: it is an HTTP client of the reporter.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

DEFAULT_REPORTER_URL = "http://127.0.0.1:8710"


def reporter_url(flag: str | None) -> str:
    return (flag or os.environ.get("AUTOSERVE_REPORTER_URL") or DEFAULT_REPORTER_URL).rstrip("/")


def _ms(value: float | None) -> str:
    return "no data" if value is None else f"{value:,.1f} ms"


def _pct(value: float | None) -> str:
    return "no data" if value is None else f"{value:.2f} %"


def _when(ts: float | None) -> str:
    return "—" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render(report: dict[str, Any], incidents: dict[str, Any] | None, console: Console) -> None:
    hours = report["report_period_hours"]
    console.print(
        f"[bold]{report['app_name']}[/] — last {hours:g} h ({_when(report['period_start'])} → {_when(report['period_end'])})"
    )
    if report["status"] != "ok":
        console.print("[yellow]no data[/]: no health checks stored in this period")
        return
    summary = Table(show_header=False, box=None)
    for label, value in (
        ("uptime", _pct(report["uptime_percent"])),
        (
            "health checks",
            f"{report['total_health_checks']:,} ({report['successful_checks']:,} ok, {report['failed_checks']:,} failed)",
        ),
        ("avg response time", _ms(report["avg_response_time_ms"])),
        ("p95 response time", _ms(report["p95_response_time_ms"])),
        ("errors", ", ".join(f"{k} {v:,}" for k, v in report["error_breakdown"].items()) or "none"),
    ):
        summary.add_row(f"[dim]{label}[/]", value)
    console.print(summary)
    instances = Table(title="per instance", title_justify="left")
    for column in ("instance", "uptime", "checks", "failed", "avg", "p95", "errors"):
        instances.add_column(column, justify="left" if column in ("instance", "errors") else "right")
    for i in report["instances"]:
        instances.add_row(i["instance_id"], _pct(i["uptime_percent"]), f"{i['total_health_checks']:,}",
                          f"{i['failed_checks']:,}", _ms(i["avg_response_time_ms"]), _ms(i["p95_response_time_ms"]),
                          ", ".join(f"{k} {v}" for k, v in i["error_breakdown"].items()))  # fmt: skip
    console.print(instances)
    if incidents and incidents["incidents"]:
        table = Table(title="incidents", title_justify="left")
        for column in ("instance", "started", "failure", "status", "time to recover", "recovered by"):
            table.add_column(column)
        for i in incidents["incidents"][-20:]:
            ttr = "—" if i["time_to_recover_s"] is None else f"{i['time_to_recover_s']:.1f} s"
            table.add_row(
                i["instance_id"], _when(i["started_at"]), i["failure_type"], i["status"], ttr, i["recovered_by"] or "—"
            )
        console.print(table)


def _get(client: httpx.Client, path: str, params: dict[str, Any]) -> dict[str, Any]:
    response = client.get(path, params=params)
    if response.status_code != 200:
        try:
            reason = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            reason = response.text[:300]
        raise ReportFailed(reason)
    return response.json()


class ReportFailed(Exception):
    pass


def show_report(app: str, hours: float, as_json: bool, url: str | None, exclude_maintenance: bool = False) -> int:
    base = reporter_url(url)
    try:
        with httpx.Client(base_url=base, timeout=30.0) as client:
            params = {"hours": hours, "exclude_maintenance": str(exclude_maintenance).lower()}
            report = _get(client, f"/v1/apps/{app}/report", params)
            incidents = None if as_json else _get(client, f"/v1/apps/{app}/incidents", {"hours": hours})
    except ReportFailed as exc:
        print(f"autoserve report: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"autoserve report: cannot reach the reporter at {base} ({type(exc).__name__}); is `autoserve run "
              "reporter` or `autoserve up` running? (set AUTOSERVE_REPORTER_URL or --reporter-url)", file=sys.stderr)  # fmt: skip
        return 1
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render(report, incidents, Console())
    return 0
