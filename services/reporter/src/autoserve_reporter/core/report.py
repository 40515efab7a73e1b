"""The seed's ``generate_health_report``, assembled from SQL aggregates, plus per-instance
reports and an availability timeline. Pure: query results and the time come in.

p95 definition (the seed's, exactly): sort the ``n`` response times ascending and take the
element at 0-based index ``floor(0.95 * n)`` (``sorted(values)[int(n * 0.95)]``). It is a
nearest-rank percentile: always one of the observed values, never interpolated. ClickHouse's
``quantileExact(0.95)`` computes exactly this index (``level * size``, truncated), which
``seed_p95`` is the oracle for in the tests. It differs from the textbook nearest rank
(``ceil(0.95 * n)``-th, 1-based) only when ``0.95 * n`` is a whole number: then it takes
the next value up (for n = 20, the maximum).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from autoserve_events import is_valid_name

P95_DEFINITION = "sorted(response_times)[floor(0.95 * n)], 0-based (the seed's formula; ClickHouse quantileExact(0.95))"
MAX_HOURS = 24 * 366
NO_DATA = "no data"
MAX_BUCKETS = 48


class BadRequest(ValueError):
    """A request the reporter refuses; the message names the field and the value."""


class UnknownApp(LookupError):
    pass


def parse_flag(name: str, raw: str | None) -> bool:
    """A boolean query parameter: true/false, 1/0, yes/no; absent is false."""
    if raw is None or raw == "":
        return False
    value = raw.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise BadRequest(f"{name}: must be true or false, got {raw!r}")


def parse_hours(raw: str | float | None, default: float = 24.0) -> float:
    """``hours``: a number > 0 and <= a year. The seed takes an int; fractions are allowed."""
    if raw is None or raw == "":
        return default
    try:
        hours = float(raw)
    except (TypeError, ValueError):
        raise BadRequest(f"hours: must be a number of hours > 0 and <= {MAX_HOURS}, got {raw!r}") from None
    if not (math.isfinite(hours) and 0 < hours <= MAX_HOURS):
        raise BadRequest(f"hours: must be a number of hours > 0 and <= {MAX_HOURS}, got {raw!r}")
    return hours


def check_app_name(app: str) -> str:
    if not is_valid_name(app):
        raise BadRequest(f"app: must match [A-Za-z0-9_-]{{1,128}}, got {app!r}")
    return app


def seed_p95(values: Sequence[float]) -> float | None:
    """The seed's p95, verbatim: the oracle for the SQL."""
    if not values:
        return None
    return sorted(values)[int(len(values) * 0.95)]


def nearest_rank(values: Sequence[float], percent: float) -> float | None:
    """Textbook nearest rank: the ceil(p/100 * n)-th smallest (1-based), for comparison."""
    if not values:
        return None
    return sorted(values)[max(1, math.ceil(percent / 100 * len(values))) - 1]


class Window(msgspec.Struct, frozen=True):
    since: float
    until: float
    hours: float


def window(hours: float, now: float) -> Window:
    return Window(since=now - hours * 3600.0, until=now, hours=hours)


class Checks(msgspec.Struct, frozen=True):
    """One aggregate row: status counts and response times over a set of probes."""

    total: int
    successful: int
    failed: int
    avg_response_time_ms: float | None
    p95_response_time_ms: float | None


class CheckSummary(msgspec.Struct, kw_only=True):
    """What the seed's report says of a set of probes: an app's, or one instance's."""

    status: str
    uptime_percent: float | None
    total_health_checks: int
    successful_checks: int
    failed_checks: int
    avg_response_time_ms: float | None
    p95_response_time_ms: float | None
    error_breakdown: dict[str, int]


class InstanceReport(CheckSummary, kw_only=True):
    instance_id: str


class HealthReport(CheckSummary, kw_only=True):
    """The seed's report keys, plus ``status``, the window, and per-instance reports.
    With no probes in the window, ``status`` is "no data" and the numbers are null."""

    app_name: str
    report_period_hours: float
    generated_at: float
    period_start: float
    period_end: float
    p95_definition: str
    instances: list[InstanceReport]
    # Beyond the seed: with maintenance excluded, the seconds of the period left out (the
    # alerter's maintenance windows and silences marked maintenance), else 0.
    excluded_maintenance_seconds: float = 0.0


def _number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def checks(total: int, successful: int, failed: int, avg: float | None, p95: float | None) -> Checks:
    """From SQL: avg of no rows is nan there; here it is None."""
    if total == 0:
        return Checks(0, 0, 0, None, None)
    return Checks(int(total), int(successful), int(failed), _number(avg), _number(p95))


def uptime(c: Checks) -> float | None:
    return c.successful / c.total * 100.0 if c.total else None


def breakdown(rows: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Error counts by category, largest first (ties by name), as the seed's dict."""
    counts: dict[str, int] = {}
    for error_type, count in rows:
        counts[error_type] = counts.get(error_type, 0) + int(count)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def summary(c: Checks, errors: dict[str, int]) -> dict[str, Any]:
    """The ``CheckSummary`` fields of an aggregate row."""
    return {
        "status": "ok" if c.total else NO_DATA,
        "uptime_percent": uptime(c),
        "total_health_checks": c.total,
        "successful_checks": c.successful,
        "failed_checks": c.failed,
        "avg_response_time_ms": c.avg_response_time_ms,
        "p95_response_time_ms": c.p95_response_time_ms,
        "error_breakdown": errors,
    }


def instance_report(instance_id: str, c: Checks, errors: dict[str, int]) -> InstanceReport:
    return InstanceReport(instance_id=instance_id, **summary(c, errors))


def health_report(
    app: str,
    w: Window,
    app_checks: Checks,
    app_errors: Iterable[tuple[str, int]],
    instance_checks: Iterable[tuple[str, Checks]],
    instance_errors: Iterable[tuple[str, str, int]],
    now: float,
) -> HealthReport:
    by_instance: dict[str, list[tuple[str, int]]] = {}
    for instance_id, error_type, count in instance_errors:
        by_instance.setdefault(instance_id, []).append((error_type, count))
    instances = [instance_report(i, c, breakdown(by_instance.get(i, []))) for i, c in sorted(instance_checks)]
    return HealthReport(
        app_name=app,
        report_period_hours=w.hours,
        **summary(app_checks, breakdown(app_errors)),
        generated_at=now,
        period_start=w.since,
        period_end=w.until,
        p95_definition=P95_DEFINITION,
        instances=instances,
    )


# -- availability timeline -------------------------------------------------------------


class Bucket(msgspec.Struct):
    start: float
    status: str
    uptime_percent: float | None
    total_health_checks: int
    successful_checks: int
    avg_response_time_ms: float | None


class Timeline(msgspec.Struct):
    app_name: str
    report_period_hours: float
    bucket_seconds: int
    buckets: list[Bucket]


def bucket_seconds(hours: float, requested: int | str | None = None) -> int:
    """Whole minutes, at most ``MAX_BUCKETS`` buckets per period unless asked otherwise."""
    if requested not in (None, ""):
        try:
            seconds = int(requested)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise BadRequest(f"bucket_seconds: must be a whole number of seconds >= 1, got {requested!r}") from None
        if seconds < 1 or hours * 3600 / seconds > 10_000:
            raise BadRequest(f"bucket_seconds: must be >= 1 and give at most 10000 buckets, got {requested!r}")
        return seconds
    return max(60, math.ceil(hours * 3600 / MAX_BUCKETS / 60) * 60)


def timeline(app: str, w: Window, size: int, rows: Iterable[tuple[float, int, int, float | None]]) -> Timeline:
    """Every bucket of the window, in order; a bucket without probes says "no data"."""
    stored = {int(start): (int(total), int(ok), avg) for start, total, ok, avg in rows}
    first = int(w.since // size * size)
    buckets = []
    for start in range(first, math.ceil(w.until), size):
        total, ok, avg = stored.get(start, (0, 0, None))
        buckets.append(
            Bucket(
                start=float(start),
                status="ok" if total else NO_DATA,
                uptime_percent=ok / total * 100.0 if total else None,
                total_health_checks=total,
                successful_checks=ok,
                avg_response_time_ms=_number(avg) if total else None,
            )
        )
    return Timeline(app_name=app, report_period_hours=w.hours, bucket_seconds=size, buckets=buckets)


# -- maintenance time ------------------------------------------------------------------


def maintenance_intervals(rows: Iterable[tuple[float, float]], w: Window) -> list[tuple[float, float]]:
    """Maintenance windows clipped to the report's window and merged where they overlap:
    the time a report can leave out (``SilenceCreated`` events with ``maintenance``)."""
    clipped = sorted(
        (max(start, w.since), min(end, w.until)) for start, end in rows if end > w.since and start < w.until
    )
    merged: list[tuple[float, float]] = []
    for start, end in clipped:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        elif end > start:
            merged.append((start, end))
    return merged
