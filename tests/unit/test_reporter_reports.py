"""Reports computed by real ClickHouse (chDB, in-process) on generated data with known
answers. The oracle is the seed's ``generate_health_report`` run over the same metric rows."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoserve_events import (
    ErrorKind,
    ProbeCompleted,
    RecoveryStrategy,
)
from autoserve_reporter.adapters.batcher import BatchWriter
from autoserve_reporter.adapters.clickhouse import Store
from autoserve_reporter.adapters.migrations import apply_retention, migrate
from autoserve_reporter.adapters.queries import Reports
from autoserve_reporter.core.report import NO_DATA, seed_p95
from autoserve_reporter.core.rows import (
    EVENT_COLUMNS,
    EVENTS_TABLE,
    METRIC_COLUMNS,
    METRICS_TABLE,
    event_row,
    metric_rows,
)

from ..incidents import incident_events

NOW = 1_800_000_000.0
_apps = itertools.count()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One chDB engine for the module (one path per process at a time), closed at the end."""
    path: Path = tmp_path_factory.mktemp("chdb") / "clickhouse"
    s = Store(f"chdb://{path}")
    asyncio.run(migrate(s))
    yield s
    asyncio.run(s.close())


async def write(store: Store, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
    writer = BatchWriter(store, table, columns, max_rows=5000, max_delay=0.05).start()
    futures = [writer.add(rows[i : i + 7]) for i in range(0, len(rows), 7)]
    await asyncio.wait_for(asyncio.gather(*futures), 30)
    await writer.close()


async def store_probes(store: Store, probes: list[ProbeCompleted]) -> list[tuple]:
    rows = [r for p in probes for r in metric_rows(p)]
    await write(store, METRICS_TABLE, METRIC_COLUMNS, rows)
    return rows


def seed_report(rows: list[tuple]) -> dict:
    """The seed's generate_health_report, verbatim in its arithmetic, over the metric rows."""
    health_metrics = [dict(zip(METRIC_COLUMNS, r, strict=True)) for r in rows]
    status_metrics = [m for m in health_metrics if m["metric_type"] == "health_check_status"]
    total_checks = len(status_metrics)
    healthy_checks = len([m for m in status_metrics if m["value"] == 1.0])
    response_time_metrics = [m for m in health_metrics if m["metric_type"] == "health_check_response_time"]
    avg = sum(m["value"] for m in response_time_metrics) / len(response_time_metrics)
    p95 = sorted([m["value"] for m in response_time_metrics])[int(len(response_time_metrics) * 0.95)]
    error_counts: dict[str, int] = {}
    for metric in (m for m in health_metrics if m["metric_type"] == "health_check_errors"):
        error_counts[metric["error_type"]] = error_counts.get(metric["error_type"], 0) + 1
    return {
        "uptime_percent": healthy_checks / total_checks * 100,
        "total_health_checks": total_checks,
        "successful_checks": healthy_checks,
        "failed_checks": total_checks - healthy_checks,
        "avg_response_time_ms": avg,
        "p95_response_time_ms": p95,
        "error_breakdown": error_counts,
    }


def probe(app: str, instance: str, t: float, rt: float, healthy: bool = True, **kw: object) -> ProbeCompleted:
    return ProbeCompleted(instance_id=instance, app_name=app, check_type="http", is_healthy=healthy,
                          response_time_ms=rt, timestamp=t, **kw)  # fmt: skip


def generated(app: str) -> list[ProbeCompleted]:
    """Two instances over the last hour, with failures of known kinds, and old probes."""
    rnd = random.Random(7)
    probes = [probe(app, "a1", NOW - 3000 + i, float(i + 1)) for i in range(100)]  # 1..100 ms, healthy
    for i in range(60):
        if i < 10:
            fail = {"error": "Connection refused", "error_kind": ErrorKind.CONNECTION_REFUSED}
        elif i < 15:
            fail = {"error": "Request timeout", "status_code": None}
        elif i < 17:
            fail = {
                "error": "Unexpected status code: 503",
                "status_code": 503,
                "error_kind": ErrorKind.UNEXPECTED_STATUS,
            }
        else:
            fail = {}
        probes.append(probe(app, "a2", NOW - 2000 + i, round(rnd.uniform(5, 500), 3), healthy=not fail, **fail))
    return probes


async def test_report_matches_the_seeds_formula(store: Store) -> None:
    app = f"app{next(_apps)}"
    probes = generated(app)
    old = [probe(app, "a1", NOW - 30 * 3600, 9999.0, healthy=False, error="timeout")]  # outside 24 h
    rows = await store_probes(store, probes)
    await store_probes(store, old)
    report = await Reports(store).health_report(app, 24, NOW)
    expected = seed_report(rows)
    assert report.status == "ok"
    assert report.total_health_checks == expected["total_health_checks"] == 160
    assert report.successful_checks == 143 and report.failed_checks == 17
    assert report.uptime_percent == pytest.approx(expected["uptime_percent"])
    assert report.avg_response_time_ms == pytest.approx(expected["avg_response_time_ms"])
    assert report.p95_response_time_ms == expected["p95_response_time_ms"]
    assert report.error_breakdown == expected["error_breakdown"] == {"connection": 10, "timeout": 5, "http": 2}
    # the last 48 hours include the old probe
    wider = await Reports(store).health_report(app, 48, NOW)
    assert wider.total_health_checks == 161 and wider.error_breakdown["timeout"] == 6


async def test_per_instance_reports(store: Store) -> None:
    app = f"app{next(_apps)}"
    probes = generated(app)
    await store_probes(store, probes)
    report = await Reports(store).health_report(app, 24, NOW)
    a1, a2 = report.instances
    assert (a1.instance_id, a1.total_health_checks, a1.uptime_percent) == ("a1", 100, 100.0)
    assert a1.avg_response_time_ms == pytest.approx(50.5) and a1.p95_response_time_ms == 96.0
    expected = seed_report([r for p in probes if p.instance_id == "a2" for r in metric_rows(p)])
    assert a2.failed_checks == 17 and a2.p95_response_time_ms == expected["p95_response_time_ms"]
    assert a2.error_breakdown == {"connection": 10, "timeout": 5, "http": 2} and a1.error_breakdown == {}


async def test_no_data_says_no_data(store: Store) -> None:
    app = f"app{next(_apps)}"
    await store_probes(store, [probe(app, "a1", NOW - 10 * 3600, 5.0)])
    report = await Reports(store).health_report(app, 1, NOW)
    assert report.status == NO_DATA and report.uptime_percent is None and report.p95_response_time_ms is None
    assert report.instances == [] and report.total_health_checks == 0
    assert await Reports(store).has_data(app) and not await Reports(store).has_data("never-seen")


async def test_stored_twice_counts_once(store: Store) -> None:
    """A replay, a redelivery after a crash, or a retried insert stores rows again."""
    app = f"app{next(_apps)}"
    probes = generated(app)
    await store_probes(store, probes)
    before = await Reports(store).health_report(app, 24, NOW)
    await store_probes(store, probes[::-1])  # in another order, in other batches
    await store_probes(store, probes[:50])
    after = await Reports(store).health_report(app, 24, NOW)
    assert (await store.query(f"SELECT count() FROM {METRICS_TABLE} WHERE app_name = {{a:String}}", {"a": app}))[0][
        0
    ] > 2 * before.total_health_checks  # the duplicates really are stored...
    after.generated_at = before.generated_at
    assert after == before  # ...and change nothing


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.floats(min_value=0, max_value=100_000, allow_nan=False).map(lambda v: round(v, 3)), min_size=1, max_size=400
    )
)
def test_sql_p95_is_the_seeds_nearest_rank(store: Store, values: list[float]) -> None:
    app = f"prop{next(_apps)}"
    probes = [probe(app, f"i{k % 3}", NOW - 100 + k * 0.01, v) for k, v in enumerate(values)]

    async def run() -> tuple:
        await store_probes(store, probes)
        return await Reports(store).health_report(app, 1, NOW)

    report = asyncio.run(run())
    assert report.p95_response_time_ms == seed_p95(values)
    assert report.avg_response_time_ms == pytest.approx(sum(values) / len(values), rel=1e-9, abs=1e-9)
    for instance in report.instances:
        mine = [v for k, v in enumerate(values) if f"i{k % 3}" == instance.instance_id]
        assert instance.p95_response_time_ms == seed_p95(mine)


async def test_timeline_buckets(store: Store) -> None:
    app = f"app{next(_apps)}"
    start = NOW - 3600  # NOW is a multiple of 600
    probes = [probe(app, "a1", start + 10 + i, 5.0, healthy=i % 4 != 0) for i in range(100)]  # first bucket
    probes += [probe(app, "a1", start + 1800 + i, 7.0) for i in range(10)]
    await store_probes(store, probes)
    result = await Reports(store).timeline(app, 1, NOW, 600)
    assert [b.start for b in result.buckets] == [start + 600 * k for k in range(6)]
    assert result.buckets[0].total_health_checks == 100 and result.buckets[0].uptime_percent == 75.0
    assert result.buckets[3].total_health_checks == 10 and result.buckets[3].avg_response_time_ms == 7.0
    assert [b.status for b in result.buckets] == ["ok", NO_DATA, NO_DATA, "ok", NO_DATA, NO_DATA]


async def test_incidents_with_known_recovery_times(store: Store) -> None:
    app = f"app{next(_apps)}"
    t = NOW - 3000

    events = (
        incident_events(app, "a1", t, 12.0, RecoveryStrategy.RESTART_CONTAINER)
        + incident_events(app, "a2", t + 100, 20.0, RecoveryStrategy.RESTART_CONTAINER)
        + incident_events(app, "a1", t + 500, 45.0, RecoveryStrategy.RECREATE_CONTAINER)
    )
    rows = [event_row(e) for e in events]
    await write(store, EVENTS_TABLE, EVENT_COLUMNS, rows)
    await write(store, EVENTS_TABLE, EVENT_COLUMNS, rows[::-1])  # replayed: no change
    result = await Reports(store).incidents(app, 24, NOW)
    assert [(i.instance_id, i.time_to_recover_s, i.recovered_by) for i in result.incidents] == [
        ("a1", 12.0, "restart_container"),
        ("a2", 20.0, "restart_container"),
        ("a1", 45.0, "recreate_container"),
    ]
    stats = {s.strategy: (s.incidents, s.avg_time_to_recover_s) for s in result.by_strategy}
    assert stats == {"restart_container": (2, 16.0), "recreate_container": (1, 45.0)}


async def test_migrations_are_idempotent_and_retention_configurable(store: Store) -> None:
    assert await migrate(store) == []  # already applied
    await apply_retention(store, metrics_days=7, events_days=120)
    engines = dict(await store.query("SELECT name, engine_full FROM system.tables WHERE database = currentDatabase()"))
    assert "toIntervalDay(7)" in engines[METRICS_TABLE] and "toIntervalDay(120)" in engines[EVENTS_TABLE]
    assert "ReplacingMergeTree" in engines[METRICS_TABLE]
    await apply_retention(store, metrics_days=30, events_days=90)


# -- where a batch closes ---------------------------------------------------------------


def _probe_rows(app: str, n: int) -> list[tuple]:
    return [r for i in range(n) for r in metric_rows(ProbeCompleted(
        instance_id="i-1", app_name=app, check_type="http", is_healthy=True, response_time_ms=1.0, timestamp=NOW + i,
    ))][:n]  # fmt: skip


async def test_a_batch_closes_when_it_is_full_without_waiting_for_its_time(store: Store) -> None:
    writer = BatchWriter(store, METRICS_TABLE, METRIC_COLUMNS, max_rows=3, max_delay=3600).start()
    rows = _probe_rows(f"full-{next(_apps)}", 4)
    try:
        full = writer.add(rows[:3])
        assert await asyncio.wait_for(full, 30) is True  # an hour's time limit did not hold it
        left = writer.add(rows[3:])
        assert left is not full and not left.done()
        assert (writer.stats.batches_stored, writer.stats.rows_stored, writer.stats.buffered_rows) == (1, 3, 1)
        assert await writer.flush(30)
        assert (writer.stats.batches_stored, writer.stats.rows_stored) == (2, 4)
    finally:
        await writer.close()


async def test_rows_added_within_the_time_limit_go_in_one_batch(store: Store) -> None:
    writer = BatchWriter(store, METRICS_TABLE, METRIC_COLUMNS, max_rows=10_000, max_delay=0.3).start()
    rows = _probe_rows(f"timed-{next(_apps)}", 5)
    try:
        futures = [writer.add([row]) for row in rows]
        assert len({id(f) for f in futures}) == 1  # one open batch, closed by its time limit
        await asyncio.wait_for(futures[0], 30)
        assert (writer.stats.batches_stored, writer.stats.rows_stored) == (1, 5)
    finally:
        await writer.close()
