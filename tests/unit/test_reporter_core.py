"""The reporter's pure core: the seed's metric rows and error categories, audit rows, bad
input, report assembly ("no data", not 0 %), the timeline, incidents, and the p95 oracle."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoserve_events import (
    BreakerStateChanged,
    BreakerTrialAdmitted,
    ContainerObserved,
    ErrorKind,
    FailureDetected,
    FailureType,
    HealthChanged,
    ProbeCompleted,
    RecoveryExecuted,
    RecoveryStrategy,
)
from autoserve_reporter.core.incidents import AuditRow, by_strategy, fold_incidents
from autoserve_reporter.core.report import (
    NO_DATA,
    BadRequest,
    Checks,
    bucket_seconds,
    check_app_name,
    checks,
    health_report,
    nearest_rank,
    parse_hours,
    seed_p95,
    timeline,
    window,
)
from autoserve_reporter.core.rows import (
    EVENT_COLUMNS,
    METRIC_COLUMNS,
    BadEvent,
    classify_error,
    event_row,
    metric_rows,
)

T0 = 1_700_000_000.0


def probe(healthy: bool = True, **kw: object) -> ProbeCompleted:
    fields = {"instance_id": "web-1", "app_name": "web", "check_type": "http", "is_healthy": healthy,
              "response_time_ms": 12.5, "timestamp": T0, **kw}  # fmt: skip
    return ProbeCompleted(**fields)


# -- the seed's metric rows -------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "category"),
    [
        ("Connection timeout after 2s", "timeout"),
        ("Connection refused", "connection"),
        ("DNS lookup failed", "dns"),
        ("SSL: certificate verify failed", "ssl"),
        ("TLS handshake", "ssl"),
        ("HTTP 503", "http"),
        ("Unexpected status code: 503", "unknown"),
        ("", "unknown"),
    ],
)
def test_classify_error_is_the_seeds(message: str, category: str) -> None:
    assert classify_error(message) == category


def test_healthy_probe_gives_the_seeds_two_rows() -> None:
    rows = [dict(zip(METRIC_COLUMNS, r, strict=True)) for r in metric_rows(probe())]
    assert [r["metric_type"] for r in rows] == ["health_check_response_time", "health_check_status"]
    assert rows[0]["value"] == 12.5 and rows[0]["unit"] == "ms" and rows[0]["success"] == "true"
    assert rows[1]["value"] == 1.0 and rows[1]["unit"] == "status"
    assert len({r["event_id"] for r in rows}) == 1  # one probe: its rows share its event_id


def test_failed_probe_with_error_adds_an_error_row() -> None:
    failed = probe(False, error="Unexpected status code: 503", status_code=503, error_kind=ErrorKind.UNEXPECTED_STATUS)
    rows = [dict(zip(METRIC_COLUMNS, r, strict=True)) for r in metric_rows(failed)]
    assert [r["metric_type"] for r in rows][-1] == "health_check_errors"
    error = rows[-1]
    assert (error["value"], error["unit"], error["error_type"], error["status_code"]) == (1.0, "count", "http", "503")
    assert rows[0]["success"] == "false" and rows[1]["value"] == 0.0


def test_error_category_falls_back_to_the_seeds_text_rules() -> None:
    rows = metric_rows(probe(False, error="connect timeout"))
    assert dict(zip(METRIC_COLUMNS, rows[-1], strict=True))["error_type"] == "timeout"
    assert dict(zip(METRIC_COLUMNS, rows[-1], strict=True))["status_code"] == "none"


def test_failed_probe_without_error_text_has_no_error_row() -> None:
    assert len(metric_rows(probe(False))) == 2  # the seed: `if not result.is_healthy and result.error`


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"timestamp": math.nan}, "timestamp"),
        ({"timestamp": 1e13}, "timestamp"),
        ({"timestamp": -5.0}, "timestamp"),
        ({"response_time_ms": math.inf}, "response_time_ms"),
        ({"response_time_ms": -1.0}, "response_time_ms"),
    ],
)
def test_unstorable_values_name_the_field_and_value(kw: dict, field: str) -> None:
    with pytest.raises(BadEvent, match=f"^{field}: .*got"):
        metric_rows(probe(**kw))


def test_every_audit_event_maps_to_a_row() -> None:
    events = [
        FailureDetected(failure_type=FailureType.HEALTH_CHECK_TIMEOUT, instance_id="i", app_name="a",
                        severity="medium", message="timed out", timestamp=T0, cause_event_id="c1"),
        RecoveryExecuted(strategy=RecoveryStrategy.RESTART_CONTAINER, failure_type=None, instance_id="i",
                         app_name="a", success=True, timestamp=T0, duration_ms=800.0, failure_event_id="f1"),
        HealthChanged(instance_id="i", app_name="a", healthy=False, previous=True, consecutive=3,
                      reason="3 failures", timestamp=T0),
        BreakerStateChanged(app_name="a", instance_id="i", state="open", previous_state="closed",
                            consecutive_failures=5, consecutive_successes=0, reason="threshold", timestamp=T0),
        BreakerTrialAdmitted(app_name="a", instance_id="i", generation=2, trial=1, timestamp=T0),
        ContainerObserved(instance_id="i", app_name="a", container_id="abc", event="die", timestamp=T0, exit_code=1),
    ]  # fmt: skip
    rows = [dict(zip(EVENT_COLUMNS, event_row(e), strict=True)) for e in events]
    assert [r["type"] for r in rows] == [type(e).__name__ for e in events]
    assert rows[0]["failure_type"] == "health_check_timeout" and rows[0]["cause_event_id"] == "c1"
    assert rows[1]["strategy"] == "restart_container" and rows[1]["success"] is True and rows[1]["duration_ms"] == 800
    assert rows[1]["cause_event_id"] == "f1"
    assert rows[2]["healthy"] is False and rows[2]["message"] == "3 failures"
    assert (rows[3]["state"], rows[3]["previous_state"]) == ("open", "closed")
    assert rows[5]["message"] == "die"
    assert all(r["event_id"] == e.event_id and '"type":' in r["payload"] for r, e in zip(rows, events, strict=True))


# -- requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "nan", "inf", "1e9", "  "])
def test_bad_hours_are_refused_with_the_value(raw: str) -> None:
    with pytest.raises(BadRequest, match=r"^hours: .*got '"):
        parse_hours(raw)


def test_hours_default_and_fractions() -> None:
    assert parse_hours(None) == 24.0
    assert parse_hours("0.5") == 0.5
    assert parse_hours("168") == 168.0


@pytest.mark.parametrize("app", ["web.x", "", "a b", "*", ">"])
def test_bad_app_names_are_refused(app: str) -> None:
    with pytest.raises(BadRequest, match=r"^app: "):
        check_app_name(app)


# -- report assembly --------------------------------------------------------------------


def test_no_data_is_no_data_not_zero_percent() -> None:
    report = health_report("web", window(24, T0), checks(0, 0, 0, math.nan, math.nan), [], [], [], T0)
    assert report.status == NO_DATA
    assert report.uptime_percent is None and report.avg_response_time_ms is None
    assert report.p95_response_time_ms is None and report.total_health_checks == 0


def test_report_assembles_seed_keys_and_instances() -> None:
    app = Checks(10, 9, 1, 5.0, 9.0)
    report = health_report(
        "web", window(2, T0), app, [("http", 1), ("timeout", 2), ("http", 2)],
        [("w2", Checks(4, 4, 0, 3.0, 4.0)), ("w1", Checks(6, 5, 1, 6.0, 9.0))],
        [("w1", "http", 1)], T0,
    )  # fmt: skip
    assert report.uptime_percent == 90.0 and report.successful_checks == 9 and report.failed_checks == 1
    assert report.error_breakdown == {"http": 3, "timeout": 2}
    assert [i.instance_id for i in report.instances] == ["w1", "w2"]
    assert report.instances[0].error_breakdown == {"http": 1} and report.instances[1].error_breakdown == {}
    assert report.period_end - report.period_start == 7200


def test_timeline_fills_every_bucket() -> None:
    aligned = 1_699_999_200.0  # a multiple of 600
    size = bucket_seconds(1)
    assert size == 120
    result = timeline("web", window(1, aligned), size, [(aligned - 600, 10, 5, 2.0)])
    assert len(result.buckets) == 30
    assert result.buckets[0].start == aligned - 3600
    filled = [b for b in result.buckets if b.status != NO_DATA]
    assert len(filled) == 1 and filled[0].uptime_percent == 50.0 and filled[0].start == aligned - 600
    unaligned = timeline("web", window(1, aligned + 30), size, [])
    assert unaligned.buckets[0].start == aligned - 3600 and len(unaligned.buckets) == 31  # partial ends


def test_bucket_seconds_validation() -> None:
    assert bucket_seconds(24, "60") == 60
    with pytest.raises(BadRequest, match=r"^bucket_seconds: .*got 'x'"):
        bucket_seconds(24, "x")
    with pytest.raises(BadRequest, match=r"^bucket_seconds: "):
        bucket_seconds(24, "1")  # 86,400 buckets


# -- p95: the seed's formula, and how it relates to textbook nearest rank --------------


def test_seed_p95_examples() -> None:
    assert seed_p95([]) is None
    assert seed_p95([7.0]) == 7.0
    values = [float(v) for v in range(1, 21)]  # n = 20: 0.95 * n is whole
    assert seed_p95(values) == 20.0 and nearest_rank(values, 95) == 19.0
    values = [float(v) for v in range(1, 101)]
    assert seed_p95(values) == 96.0 and nearest_rank(values, 95) == 95.0


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=300))
def test_seed_p95_is_an_observed_value_at_or_above_nearest_rank(values: list[float]) -> None:
    p = seed_p95(values)
    assert p in values
    assert p >= nearest_rank(values, 95)
    assert sum(v <= p for v in values) / len(values) >= 0.95  # at least 95 % are <= p95


# -- incidents --------------------------------------------------------------------------


def row(t: float, kind: str, instance: str = "w1", **kw: object) -> AuditRow:
    fields = {"failure_type": "", "strategy": "", "success": None, "healthy": None, "duration_ms": None, **kw}
    return AuditRow(instance_id=instance, timestamp=T0 + t, type=kind, event_id=f"{instance}-{t}-{kind}", **fields)


def test_incident_failure_recovery_healthy() -> None:
    rows = [
        row(0, "FailureDetected", failure_type="health_check_timeout"),
        row(2, "FailureDetected", failure_type="health_check_timeout"),
        row(4, "HealthChanged", healthy=False),
        row(5, "RecoveryExecuted", strategy="remove_from_lb", success=True, duration_ms=5.0),
        row(6, "RecoveryExecuted", strategy="restart_container", success=True, duration_ms=900.0),
        row(10, "HealthChanged", healthy=True),
    ]
    (incident,) = fold_incidents(rows)
    assert incident.status == "recovered" and incident.time_to_recover_s == 10.0
    assert incident.failure_type == "health_check_timeout" and incident.failures == 2
    assert incident.recovered_by == "restart_container" and len(incident.recoveries) == 2


def test_transient_blip_is_not_an_incident_and_ongoing_is_listed() -> None:
    rows = [
        row(0, "FailureDetected", failure_type="health_check_failed"),  # never confirmed: a blip
        row(1000, "FailureDetected", "w2", failure_type="port_not_listening"),
        row(1002, "HealthChanged", "w2", healthy=False),
    ]
    (incident,) = fold_incidents(rows, confirm_seconds=600)
    assert incident.instance_id == "w2" and incident.status == "ongoing" and incident.time_to_recover_s is None


def test_recovery_before_the_threshold_closes_at_its_end() -> None:
    rows = [
        row(0, "FailureDetected", failure_type="container_stopped"),
        row(1, "RecoveryExecuted", strategy="restart_container", success=True, duration_ms=2000.0),
    ]
    (incident,) = fold_incidents(rows)
    assert incident.time_to_recover_s == 3.0 and incident.became_unhealthy is False


def test_time_to_recover_per_strategy() -> None:
    rows = []
    for k, (strategy, ttr) in enumerate(
        [("restart_container", 10), ("restart_container", 30), ("recreate_container", 50)]
    ):
        base = k * 1000
        rows += [
            row(base, "HealthChanged", f"w{k}", healthy=False),
            row(base + 1, "RecoveryExecuted", f"w{k}", strategy=strategy, success=True, duration_ms=1.0),
            row(base + ttr, "HealthChanged", f"w{k}", healthy=True),
        ]
    stats = {s.strategy: s for s in by_strategy(fold_incidents(rows))}
    assert stats["restart_container"].incidents == 2 and stats["restart_container"].avg_time_to_recover_s == 20.0
    assert stats["restart_container"].max_time_to_recover_s == 30.0
    assert stats["recreate_container"].avg_time_to_recover_s == 50.0


# -- the ClickHouse URL as logged ---------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("http://reporter:pw-9f2c@clickhouse:8123/autoserve", "http://reporter:***@clickhouse:8123/autoserve"),
        ("https://reader:p%40ss%3Aw0rd@ch.example:8443/autoserve?secure=1",
         "https://reader:***@ch.example:8443/autoserve?secure=1"),  # percent-encoded, as in a URL
        ("http://u:abc@h:8123/abc@x", "http://u:***@h:8123/abc@x"),  # the same text in the path stays
        ("http://secret:secret@h:8123", "http://secret:***@h:8123"),  # only the password part
        ("http://reporter@clickhouse:8123/autoserve", "http://reporter@clickhouse:8123/autoserve"),
        ("http://127.0.0.1:8123", "http://127.0.0.1:8123"),
        ("chdb:///var/lib/autoserve/clickhouse?database=autoserve", "chdb:///var/lib/autoserve/clickhouse?database=autoserve"),
        ("http://h:8123/autoserve?access_token=tok-9f2c&secure=1&x=",
         "http://h:8123/autoserve?access_token=***&secure=1&x=***"),  # a setting can carry a credential
        ("chdb:///d/clickhouse?database=autoserve&config-file=/etc/a/users.xml",
         "chdb:///d/clickhouse?database=autoserve&config-file=/etc/a/users.xml"),
    ],
)  # fmt: skip
def test_describe_hides_the_password_of_a_clickhouse_url(url: str, logged: str) -> None:
    from autoserve_reporter.adapters.clickhouse import describe

    assert describe(url) == logged


def test_a_separate_read_url_with_chdb_is_refused_with_the_reason() -> None:
    from autoserve_reporter.service import ReporterService, ReporterSettings

    settings = ReporterSettings("chdb:///d/clickhouse", clickhouse_read_url="http://reader:pw-4d1e@ch:8123/autoserve")
    with pytest.raises(ValueError, match="chDB is one engine per process") as refused:
        ReporterService("nats://127.0.0.1:4222", settings)
    assert "pw-4d1e" not in str(refused.value)  # the URL is named without its password
    same = ReporterService("nats://127.0.0.1:4222", ReporterSettings("chdb:///d/c", clickhouse_read_url="chdb:///d/c"))
    assert same.read_store is same.store
