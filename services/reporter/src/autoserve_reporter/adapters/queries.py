"""The report queries: aggregates computed in ClickHouse, assembled by the pure core.

Every query reads ``FINAL``, so a row stored twice (a replay, a retried insert) counts once.
The SQL is the one the README shows an operator.
"""

from __future__ import annotations

from typing import Any

from ..core import report as core
from ..core.incidents import DEFAULT_CONFIRM_SECONDS, INCIDENT_COLUMNS, AuditRow, IncidentList, incident_list
from ..core.rows import EVENTS_TABLE, METRICS_TABLE
from .clickhouse import Store

WINDOW = (
    "app_name = {app:String}"
    " AND timestamp >= fromUnixTimestamp64Milli({since:Int64})"
    " AND timestamp <= fromUnixTimestamp64Milli({until:Int64})"
)

# The seed's numbers: uptime from health_check_status, avg and p95 from
# health_check_response_time; quantileExact(0.95) is the seed's sorted(v)[int(0.95 * n)].
# One metric type per query: within it, parts (time-ordered batches) do not overlap, so
# FINAL merges almost nothing. GROUPING SETS gives the app and every instance in one scan;
# the app's row is the one with an empty instance_id.
STATUS = f"""
SELECT if(grouping(instance_id) = 1, '', instance_id) AS instance,
    count() AS total, countIf(value = 1) AS successful, countIf(value = 0) AS failed
FROM {METRICS_TABLE} FINAL
WHERE {WINDOW} AND metric_type = 'health_check_status'
GROUP BY GROUPING SETS ((), (instance_id))
"""

RESPONSE_TIME = f"""
SELECT if(grouping(instance_id) = 1, '', instance_id) AS instance,
    avg(value) AS avg_response_time_ms, quantileExact(0.95)(value) AS p95_response_time_ms
FROM {METRICS_TABLE} FINAL
WHERE {WINDOW} AND metric_type = 'health_check_response_time'
GROUP BY GROUPING SETS ((), (instance_id))
"""

ERRORS = f"""
SELECT instance_id, error_type, count() AS errors
FROM {METRICS_TABLE} FINAL
WHERE {WINDOW} AND metric_type = 'health_check_errors'
GROUP BY instance_id, error_type
"""

TIMELINE = f"""
SELECT
    toUnixTimestamp(toStartOfInterval(timestamp, toIntervalSecond({{size:UInt32}}))) AS bucket,
    countIf(metric_type = 'health_check_status') AS total,
    countIf(metric_type = 'health_check_status' AND value = 1) AS successful,
    avgIf(value, metric_type = 'health_check_response_time') AS avg_response_time_ms
FROM {METRICS_TABLE} FINAL
WHERE {WINDOW} AND metric_type IN ('health_check_status', 'health_check_response_time')
GROUP BY bucket
ORDER BY bucket
"""

INCIDENT_EVENTS = f"""
SELECT instance_id, toFloat64(timestamp), type, event_id, failure_type, strategy, success, healthy, duration_ms
FROM {EVENTS_TABLE} FINAL
WHERE {WINDOW} AND type IN ('FailureDetected', 'RecoveryExecuted', 'HealthChanged')
ORDER BY timestamp, emitted_at, event_id
"""
assert len(INCIDENT_COLUMNS) == 9

KNOWN = f"""
SELECT count() FROM (
    SELECT 1 FROM {METRICS_TABLE} WHERE app_name = {{app:String}} LIMIT 1
    UNION ALL
    SELECT 1 FROM {EVENTS_TABLE} WHERE app_name = {{app:String}} LIMIT 1
)
"""

# App-wide maintenance windows the alerter recorded (SilenceCreated with maintenance = true
# and no instance) that overlap the period; a report that excludes maintenance leaves their
# rows out. One instance's maintenance does not take the whole app out of its report.
MAINTENANCE = f"""
SELECT JSONExtractFloat(payload, 'starts_at') AS starts_at, JSONExtractFloat(payload, 'ends_at') AS ends_at
FROM {EVENTS_TABLE} FINAL
WHERE app_name = {{app:String}} AND type = 'SilenceCreated' AND JSONExtractBool(payload, 'maintenance')
    AND JSONExtractString(payload, 'instance_id') = ''
    AND starts_at < {{until_s:Float64}} AND ends_at > {{since_s:Float64}}
"""
OUTSIDE_MAINTENANCE = (
    " AND NOT arrayExists((s, e) -> toUnixTimestamp64Milli(timestamp) >= s AND toUnixTimestamp64Milli(timestamp) < e,"
    " {ms_starts:Array(Int64)}, {ms_ends:Array(Int64)})"
)


def _outside_maintenance(sql: str) -> str:
    return sql.replace(WINDOW, WINDOW + OUTSIDE_MAINTENANCE)


APPS = f"SELECT DISTINCT app_name FROM {METRICS_TABLE} UNION DISTINCT SELECT DISTINCT app_name FROM {EVENTS_TABLE}"


def _params(app: str, w: core.Window) -> dict[str, Any]:
    return {"app": app, "since": int(w.since * 1000), "until": int(w.until * 1000)}


class Reports:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def has_data(self, app: str) -> bool:
        return (await self.store.query(KNOWN, {"app": app}))[0][0] > 0

    async def apps(self) -> list[str]:
        return sorted(row[0] for row in await self.store.query(APPS))

    async def maintenance(self, app: str, w: core.Window) -> list[tuple[float, float]]:
        rows = await self.store.query(MAINTENANCE, {"app": app, "since_s": w.since, "until_s": w.until})
        return core.maintenance_intervals(((float(a), float(b)) for a, b in rows), w)

    async def health_report(
        self, app: str, hours: float, now: float, exclude_maintenance: bool = False
    ) -> core.HealthReport:
        w = core.window(hours, now)
        params = _params(app, w)
        status_sql, times_sql, errors_sql = STATUS, RESPONSE_TIME, ERRORS
        excluded = 0.0
        if exclude_maintenance and (intervals := await self.maintenance(app, w)):
            params |= {
                "ms_starts": [int(a * 1000) for a, _ in intervals],
                "ms_ends": [int(b * 1000) for _, b in intervals],
            }
            status_sql, times_sql, errors_sql = (_outside_maintenance(q) for q in (STATUS, RESPONSE_TIME, ERRORS))
            excluded = sum(b - a for a, b in intervals)
        status = {row[0]: row[1:] for row in await self.store.query(status_sql, params)}
        times = {row[0]: row[1:] for row in await self.store.query(times_sql, params)}
        errors = await self.store.query(errors_sql, params)

        def checks(instance: str) -> core.Checks:
            return core.checks(*status.get(instance, (0, 0, 0)), *times.get(instance, (None, None)))

        report = core.health_report(
            app,
            w,
            checks(""),
            ((error_type, n) for _, error_type, n in errors),
            ((i, checks(i)) for i in sorted(set(status) | set(times)) if i),
            errors,
            now,
        )
        report.excluded_maintenance_seconds = excluded
        return report

    async def timeline(self, app: str, hours: float, now: float, bucket: int | str | None = None) -> core.Timeline:
        w = core.window(hours, now)
        size = core.bucket_seconds(hours, bucket)
        rows = await self.store.query(TIMELINE, {**_params(app, w), "size": size})
        return core.timeline(app, w, size, rows)

    async def incidents(
        self, app: str, hours: float, now: float, confirm_seconds: float = DEFAULT_CONFIRM_SECONDS
    ) -> IncidentList:
        w = core.window(hours, now)
        rows = await self.store.query(INCIDENT_EVENTS, _params(app, w))
        return incident_list(app, hours, (AuditRow(*row) for row in rows), confirm_seconds)
