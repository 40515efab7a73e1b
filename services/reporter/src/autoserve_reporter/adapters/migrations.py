"""Versioned, idempotent schema migrations.

Each migration runs once and is recorded in ``autoserve_schema_migrations``; every
statement is also idempotent (``IF NOT EXISTS``), so a crash between running one and
recording it is harmless. Retention is not a migration: ``apply_retention`` sets the TTL to
the configured number of days at every start, without rewriting existing parts.

Dedupe: both tables are ReplacingMergeTree whose sorting key ends in ``event_id``, so a
replayed or redelivered event (identical key) collapses to one row; reports read with
``FINAL``. Insert dedup tokens would only drop a whole identical batch, and a replay never
cuts batches at the same places.

Least privilege: migrations need CREATE TABLE and ALTER TTL, the reporter's batches only
INSERT. A deployment runs ``autoserve migrate`` as a schema user and the reporter with
``AUTOSERVE_REPORTER_MIGRATE=false``, which only checks that the tables it writes exist with
the columns it writes (``system.columns`` shows them to a user with INSERT on the table).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from ..core.rows import EVENT_COLUMNS, EVENTS_TABLE, METRIC_COLUMNS, METRICS_TABLE
from .clickhouse import Store

log = structlog.get_logger("autoserve.reporter.migrations")

MIGRATIONS_TABLE = "autoserve_schema_migrations"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "health_metrics: the seed's metric rows",
        (
            # Ordered for the reports: one app, one metric type, then time, so a report
            # reads one contiguous range; and since batches arrive in time order, parts
            # rarely overlap inside it, which keeps FINAL (the dedupe) nearly free.
            f"""
            CREATE TABLE IF NOT EXISTS {METRICS_TABLE} (
                app_name LowCardinality(String),
                metric_type LowCardinality(String),
                instance_id LowCardinality(String),
                timestamp DateTime64(3, 'UTC'),
                event_id String,
                value Float64,
                unit LowCardinality(String),
                check_type LowCardinality(String),
                success LowCardinality(String),
                error_type LowCardinality(String),
                status_code LowCardinality(String),
                inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)
            )
            ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMMDD(timestamp)
            ORDER BY (app_name, metric_type, timestamp, instance_id, event_id)
            TTL toDateTime(timestamp) + INTERVAL 30 DAY
            SETTINGS ttl_only_drop_parts = 1
            """,
        ),
    ),
    Migration(
        2,
        "events: the audit trail",
        (
            f"""
            CREATE TABLE IF NOT EXISTS {EVENTS_TABLE} (
                app_name LowCardinality(String),
                type LowCardinality(String),
                instance_id LowCardinality(String),
                timestamp DateTime64(3, 'UTC'),
                event_id String,
                emitted_at DateTime64(3, 'UTC'),
                schema_version UInt16,
                failure_type LowCardinality(String),
                severity LowCardinality(String),
                strategy LowCardinality(String),
                success Nullable(Bool),
                healthy Nullable(Bool),
                state LowCardinality(String),
                previous_state LowCardinality(String),
                duration_ms Nullable(Float64),
                message String,
                cause_event_id String,
                payload String CODEC(ZSTD(3)),
                inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)
            )
            ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(timestamp)
            ORDER BY (app_name, instance_id, timestamp, type, event_id)
            TTL toDateTime(timestamp) + INTERVAL 90 DAY
            """,
        ),
    ),
)


async def migrate(store: Store) -> list[int]:
    """Apply every migration not yet recorded; return the versions applied now."""
    await store.command(
        f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version UInt32, name String, "
        "applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = {row[0] for row in await store.query(f"SELECT version FROM {MIGRATIONS_TABLE} FINAL")}
    applied = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        for statement in migration.statements:
            await store.command(statement)
        await store.command(
            f"INSERT INTO {MIGRATIONS_TABLE} (version, name) VALUES ({{v:UInt32}}, {{n:String}})",
            {"v": migration.version, "n": migration.name},
        )
        log.info("migration applied", version=migration.version, name=migration.name)
        applied.append(migration.version)
    return applied


async def prepare(store: Store, metrics_days: int, events_days: int) -> list[int]:
    """What whoever owns the schema does (the reporter at start, or ``autoserve migrate``):
    apply the migrations, then the configured retention; return the versions applied now."""
    applied = await migrate(store)
    await apply_retention(store, metrics_days, events_days)
    return applied


class SchemaNotReady(RuntimeError):
    """The tables the reporter writes are missing or older than this code."""


async def check_schema(store: Store) -> None:
    for table, columns in ((METRICS_TABLE, METRIC_COLUMNS), (EVENTS_TABLE, EVENT_COLUMNS)):
        rows = await store.query(
            "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String}", {"t": table}
        )
        missing = sorted(set(columns) - {row[0] for row in rows})
        if missing:
            what = "does not exist" if not rows else f"lacks columns {missing}"
            raise SchemaNotReady(
                f"ClickHouse table {table} {what} (or this user may not insert into it): run `autoserve migrate` "
                "as a user with CREATE TABLE and ALTER TTL, or start the reporter with AUTOSERVE_REPORTER_MIGRATE=true"
            )


async def apply_retention(store: Store, metrics_days: int, events_days: int) -> None:
    """Set each table's TTL to the configured days; existing parts are not rewritten
    (``materialize_ttl_after_modify = 0``): the new TTL applies as parts merge or drop."""
    for table, days in ((METRICS_TABLE, metrics_days), (EVENTS_TABLE, events_days)):
        rows = await store.query(
            "SELECT engine_full FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
            {"t": table},
        )
        if rows and f"toIntervalDay({days})" not in rows[0][0]:
            await store.command(
                f"ALTER TABLE {table} MODIFY TTL toDateTime(timestamp) + INTERVAL {int(days)} DAY "
                "SETTINGS materialize_ttl_after_modify = 0"
            )
            log.info("retention changed", table=table, days=days)
