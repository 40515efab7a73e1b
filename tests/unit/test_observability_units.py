"""The pure parts of health/metrics and of the status and events views."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from autoserve_cli.events import (
    DEFAULT_TYPES,
    UsageError,
    describe,
    filters,
    parse_since,
    parse_types,
    render,
)
from autoserve_cli.status import StatusView, age
from autoserve_events import (
    BreakerStateChanged,
    FailureDetected,
    FailureType,
    HealthChanged,
    ProbeCompleted,
    RecoveryExecuted,
    RecoveryStrategy,
)
from autoserve_runtime import observability
from autoserve_runtime.observability import Endpoint, Tally, dead_letter_reason, endpoint_for, instrument


def test_each_service_has_its_own_port_and_env_and_flags_override() -> None:
    ports = {name: endpoint_for(name, {}).port for name in ("prober", "detector", "breaker", "recovery", "reporter")}
    assert len(set(ports.values())) == len(ports)  # `up` runs them side by side
    assert endpoint_for("prober-3", {}) == Endpoint("127.0.0.1", ports["prober"])  # shards share the default
    assert endpoint_for("something-else", {}).port == 0  # unknown: off
    env = {"AUTOSERVE_METRICS_PORT": "9999", "AUTOSERVE_METRICS_HOST": "0.0.0.0"}
    assert endpoint_for("detector", env) == Endpoint("0.0.0.0", 9999)
    with pytest.raises(ValueError, match=r"AUTOSERVE_METRICS_PORT: expected a port number .* got 'x'"):
        endpoint_for("detector", {"AUTOSERVE_METRICS_PORT": "x"})
    with pytest.raises(ValueError, match="between 0 and 65535, got 70000"):
        endpoint_for("detector", {"AUTOSERVE_METRICS_PORT": "70000"})


def test_tally_exports_counters_by_label() -> None:
    tally = Tally("autoserve_test_things", "things", ("service", "type"))
    counts = tally.child("svc")
    counts[ProbeCompleted] = 3
    tally.add("svc", "other", n=2)
    text = "\n".join(
        f"{s.name} {sorted(s.labels.items())} {s.value}"
        for family in [tally.family()]
        for s in family.samples
        if s.name.endswith("_total")
    )
    assert "autoserve_test_things_total [('service', 'svc'), ('type', 'ProbeCompleted')] 3" in text
    assert "autoserve_test_things_total [('service', 'svc'), ('type', 'other')] 2" in text


def test_instrument_counts_inputs_and_outputs_and_samples_latency() -> None:
    failure = FailureDetected(failure_type=FailureType.HEALTH_CHECK_FAILED, instance_id="i", app_name="a",
                              severity="high", message="m", timestamp=1.0)  # fmt: skip
    fold = instrument("unit-test", lambda event: [failure])
    probe = ProbeCompleted(instance_id="i", app_name="a", check_type="tcp", is_healthy=True, response_time_ms=1.0,
                           timestamp=1.0)  # fmt: skip
    for _ in range(130):
        assert fold(probe) == [failure]
    assert observability.EVENTS_IN.child("unit-test")[ProbeCompleted] == 130
    assert observability.EVENTS_OUT.child("unit-test")[FailureDetected] == 130
    families = {f.name: f for f in text_string_to_metric_families(observability.metrics_text().decode())}
    count = [s.value for s in families["autoserve_handler_seconds"].samples
             if s.name.endswith("_count") and s.labels == {"service": "unit-test"}]  # fmt: skip
    assert count == [2]  # calls 64 and 128


def test_scrape_time_series_with_labels_and_a_reader_that_fails() -> None:
    rows = {("health_metrics",): 3, ("events",): 1}
    observability.add_counter("unit_rows_stored", "rows", lambda: rows, ("table",))
    observability.add_gauge("unit_level", "a level", lambda: 2.5)
    observability.add_gauge("unit_broken", "raises", lambda: 1 / 0)
    try:
        rows[("events",)] = 4  # read at scrape time, not when registered
        page = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(observability.metrics_text().decode())
            for s in family.samples
        }
    finally:
        for name in ("autoserve_unit_level", "autoserve_unit_broken"):
            observability.SCRAPED.gauges.pop(name)
        observability.SCRAPED.counters.pop("autoserve_unit_rows_stored")
    assert page[("autoserve_unit_rows_stored_total", (("table", "health_metrics"),))] == 3
    assert page[("autoserve_unit_rows_stored_total", (("table", "events"),))] == 4
    assert page[("autoserve_unit_level", ())] == 2.5
    assert not [key for key in page if key[0] == "autoserve_unit_broken"]  # no sample, and no error


def test_a_family_can_be_named_as_another_exporter_names_it() -> None:
    """blackbox_exporter's ``probe_success{app,instance}``: no ``autoserve_`` prefix."""
    observability.add_gauge("probe_success", "1 when the probe passed", lambda: {("web", "w-1"): 1},
                            ("app", "instance"), prefixed=False)  # fmt: skip
    observability.add_counter("unit_probes_seen", "probes", lambda: 7, prefixed=False)
    try:
        page = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(observability.metrics_text().decode())
            for s in family.samples
        }
    finally:
        observability.SCRAPED.gauges.pop("probe_success")
        observability.SCRAPED.counters.pop("unit_probes_seen")
    assert page[("probe_success", (("app", "web"), ("instance", "w-1")))] == 1
    assert page[("unit_probes_seen_total", ())] == 7
    assert not [key for key in page if key[0].startswith(("autoserve_probe_success", "autoserve_unit_probes"))]


def test_dead_letter_reasons_are_a_bounded_set() -> None:
    assert dead_letter_reason("oversized: 70000 bytes > 65536") == "oversized"
    assert dead_letter_reason("handler error: KeyError: 'x'") == "handler_error"
    assert dead_letter_reason("unknown event type 'ProbeExploded'") == "malformed"


def test_readiness_turns_off_when_draining() -> None:
    assert observability.readiness()["draining"] is True
    observability.mark_stopping()
    try:
        assert observability.readiness()["draining"] is False
    finally:
        observability.STATE.stopping = False


# -- events -----------------------------------------------------------------------------------


def test_types_accept_names_aliases_and_commas() -> None:
    assert parse_types(None) == DEFAULT_TYPES
    assert parse_types(["failure,HealthChanged", "probe", "FAILURE"]) == (
        "FailureDetected",
        "HealthChanged",
        "ProbeCompleted",
    )
    with pytest.raises(UsageError, match="--type: unknown event type 'nope'"):
        parse_types(["nope"])


def test_since_is_a_duration_back_from_now() -> None:
    now = 1_000_000.0
    assert parse_since(None, now) is None
    assert [parse_since(t, now) for t in ("30", "30s", "10m", "2h", "1d", "1.5h")] == [
        now - 30, now - 30, now - 600, now - 7200, now - 86400, now - 5400,
    ]  # fmt: skip
    with pytest.raises(UsageError, match="--since: expected a duration such as 30s, 10m, 2h or 1d, got 'soon'"):
        parse_since("soon", now)


def test_filters_select_by_subject_on_the_server() -> None:
    assert filters(["FailureDetected", "ProbeCompleted", "DeadLetter"], "web", None) == {
        "AUTOSERVE_EVENTS": ["autoserve.event.failure.web.*", "autoserve.deadletter.>"],
        "AUTOSERVE_PROBES": ["autoserve.probe.completed.web.*"],
    }
    with pytest.raises(UsageError, match=r"--app: 'a\.b' is not a valid name"):
        filters(["FailureDetected"], "a.b", None)


def test_one_readable_line_per_event() -> None:
    recovery = RecoveryExecuted(strategy=RecoveryStrategy.REMOVE_FROM_LB, failure_type=None, instance_id="w-1",
                                app_name="web", success=False, timestamp=0.0, duration_ms=3.0, error="nginx down")  # fmt: skip
    assert render(recovery) == (
        "1970-01-01T00:00:00.000Z  RecoveryExecuted     web/w-1  remove_from_lb failed in 3.0ms: nginx down"
    )
    breaker = BreakerStateChanged(app_name="web", instance_id="w-1", state="half_open", previous_state="open",
                                  consecutive_failures=0, consecutive_successes=0, reason="timeout elapsed",
                                  timestamp=1.0, forced=True)  # fmt: skip
    assert describe(breaker) == "open -> half_open (held): timeout elapsed failures=0 successes=0"


# -- status -----------------------------------------------------------------------------------


def test_status_keeps_the_newest_of_each_kind() -> None:
    view = StatusView()
    newer = HealthChanged(instance_id="w-1", app_name="web", healthy=False, previous=True, consecutive=3,
                          reason="r", timestamp=20.0)  # fmt: skip
    older = HealthChanged(instance_id="w-1", app_name="web", healthy=True, previous=None, consecutive=1,
                          reason="r", timestamp=10.0)  # fmt: skip
    view.apply(newer)
    view.apply(older)  # arrives late (another stream's order): does not win
    row = view.row(("web", "w-1"))
    assert (row["health"], row["health_since"], row["breaker"], row["last_probe"]) == (
        "unhealthy",
        20.0,
        "closed",
        None,
    )
    assert view.keys() == [("web", "w-1")]


def test_age_uses_the_largest_whole_unit() -> None:
    assert [age(s) for s in (0, 59, 60, 3599, 3600, 86400 * 3, -5)] == ["0s", "59s", "1m", "59m", "1h", "3d", "0s"]


def test_live_view_shows_troubled_instances_first_when_they_do_not_fit() -> None:
    view = StatusView()
    now = time.time()
    for i in range(10):
        view.apply(ProbeCompleted(instance_id=f"i-{i}", app_name="a", check_type="http", is_healthy=i != 7,
                                  response_time_ms=1.0, timestamp=now))  # fmt: skip
    table = view.table(max_rows=3)
    assert table.row_count == 3
    assert next(iter(table.columns[1].cells)) == "i-7"
