"""Rows for ClickHouse from events: the seed's metric rows and the raw audit trail.

``metric_rows`` is the seed's ``HealthMetricsCollector.collect_health_metrics`` for one
``ProbeCompleted``; labels become typed columns (a Map would be slower to filter on).
Rows are validated here, before they join a batch: one bad value must be dead-lettered
alone, never make a whole batch fail and retry forever.
"""

from __future__ import annotations

import math

from autoserve_events import (
    AnyEvent,
    BreakerStateChanged,
    BreakerTrialAdmitted,
    ContainerObserved,
    ErrorKind,
    FailureDetected,
    HealthChanged,
    ProbeCompleted,
    RecoveryExecuted,
    encode,
)

METRICS_TABLE = "health_metrics"
EVENTS_TABLE = "events"

METRIC_COLUMNS = (
    "app_name",
    "metric_type",
    "instance_id",
    "timestamp",
    "event_id",
    "value",
    "unit",
    "check_type",
    "success",
    "error_type",
    "status_code",
)
EVENT_COLUMNS = (
    "app_name",
    "type",
    "instance_id",
    "timestamp",
    "event_id",
    "emitted_at",
    "schema_version",
    "failure_type",
    "severity",
    "strategy",
    "success",
    "healthy",
    "state",
    "previous_state",
    "duration_ms",
    "message",
    "cause_event_id",
    "payload",
)

# DateTime64 holds 1900..2299; anything outside is a producer bug, not a time.
MIN_TIMESTAMP = 0.0
MAX_TIMESTAMP = 7_258_118_400.0  # 2200-01-01
MAX_TEXT = 1000

# Where the prober says why, the category follows its ``error_kind``: the seed's text rules
# put "Unexpected status code: 503" under 'unknown'. Same categories as the seed.
_KIND_CATEGORY = {
    ErrorKind.TIMEOUT: "timeout",
    ErrorKind.CONNECTION_REFUSED: "connection",
    ErrorKind.CONNECTION_ERROR: "connection",
    ErrorKind.DNS: "dns",
    ErrorKind.TLS: "ssl",
    ErrorKind.UNEXPECTED_STATUS: "http",
    ErrorKind.UNEXPECTED_RESPONSE: "http",
    ErrorKind.REDIRECT_BLOCKED: "http",
    ErrorKind.PROTOCOL_ERROR: "http",
}


class BadEvent(ValueError):
    """An event that decodes but cannot be stored; the message names the field and value."""


def classify_error(error_message: str) -> str:
    """The seed's ``_classify_error``, rule for rule."""
    error_lower = error_message.lower()
    if "timeout" in error_lower:
        return "timeout"
    if "connection" in error_lower:
        return "connection"
    if "dns" in error_lower:
        return "dns"
    if "ssl" in error_lower or "tls" in error_lower:
        return "ssl"
    if "http" in error_lower:
        return "http"
    return "unknown"


def error_category(probe: ProbeCompleted) -> str:
    if probe.error_kind is not None:
        return _KIND_CATEGORY.get(probe.error_kind, "unknown")
    return classify_error(probe.error or "")


def _timestamp(field: str, value: float) -> float:
    if not (math.isfinite(value) and MIN_TIMESTAMP <= value <= MAX_TIMESTAMP):
        raise BadEvent(f"{field}: must be epoch seconds between 1970 and 2200, got {value!r}")
    return value


def _finite(field: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise BadEvent(f"{field}: must be a finite number >= 0, got {value!r}")
    return value


def metric_rows(probe: ProbeCompleted) -> list[tuple]:
    """The seed's two or three metric rows for one probe, in ``METRIC_COLUMNS`` order.

    Beyond the seed: every row carries ``check_type`` (cheap, and filters by protocol).
    """
    ts = _timestamp("timestamp", probe.timestamp)
    rt = _finite("response_time_ms", probe.response_time_ms)
    app, instance, check, eid = probe.app_name, probe.instance_id, probe.check_type, probe.event_id
    success = "true" if probe.is_healthy else "false"
    rows = [
        (app, "health_check_response_time", instance, ts, eid, rt, "ms", check, success, "", ""),
        (app, "health_check_status", instance, ts, eid, 1.0 if probe.is_healthy else 0.0, "status", check, "", "", ""),
    ]
    if not probe.is_healthy and probe.error:
        status = str(probe.status_code) if probe.status_code else "none"
        rows.append(
            (app, "health_check_errors", instance, ts, eid, 1.0, "count", check, "", error_category(probe), status)
        )
    return rows


def event_row(event: AnyEvent) -> tuple:
    """One audit-trail row in ``EVENT_COLUMNS`` order; ``payload`` is the whole event as JSON.

    Probe results are not audit events: they live in ``health_metrics`` only.
    """
    failure_type = severity = strategy = state = previous_state = message = cause = ""
    success: bool | None = None
    healthy: bool | None = None
    duration: float | None = None
    match event:
        case FailureDetected():
            failure_type, severity, message = str(event.failure_type), event.severity, event.message
            cause = event.cause_event_id or ""
        case RecoveryExecuted():
            strategy, success, message = str(event.strategy), event.success, event.error or ""
            failure_type = str(event.failure_type) if event.failure_type else ""
            duration, cause = _finite("duration_ms", event.duration_ms), event.failure_event_id or ""
        case HealthChanged():
            healthy, message = event.healthy, event.reason
        case BreakerStateChanged():
            state, previous_state, message = event.state, event.previous_state or "", event.reason
            cause = event.cause_event_id or ""
        case BreakerTrialAdmitted():
            message = f"trial {event.trial} of generation {event.generation}"
        case ContainerObserved():
            message = event.event
    return (
        event.app_name,
        type(event).__name__,
        event.instance_id,
        _timestamp("timestamp", event.timestamp),
        event.event_id,
        _timestamp("emitted_at", event.emitted_at),
        event.schema_version,
        failure_type,
        severity,
        strategy,
        success,
        healthy,
        state,
        previous_state,
        duration,
        message[:MAX_TEXT],
        cause,
        encode(event).decode(),
    )
