"""The reporter's settings, and the durable consumers they name."""

from __future__ import annotations

from dataclasses import dataclass

from autoserve_events import durables
from autoserve_runtime import ConsumerSpec

from .adapters.api import DEFAULT_LISTEN


@dataclass(frozen=True)
class ReporterSettings:
    clickhouse_url: str
    # Reports read through this URL when given (a SELECT-only user); batches are written
    # through clickhouse_url. With chDB both are the one engine of this process.
    clickhouse_read_url: str | None = None
    # Off in a least-privilege deployment: `autoserve migrate` creates the tables, and the
    # reporter only checks them (see adapters/migrations.py).
    migrate: bool = True
    listen: str = DEFAULT_LISTEN
    metrics_retention_days: int = 30
    events_retention_days: int = 90
    batch_rows: int = 10_000
    batch_seconds: float = 1.0
    # The memory bound while ClickHouse is away: JetStream delivers at most this many
    # unacknowledged messages per consumer, so the reporter stops pulling, never drops.
    max_ack_pending: int = 50_000
    durable_prefix: str = "autoserve-reporter"  # durables.REPORTER_*


def consumer_specs(settings: ReporterSettings) -> tuple[ConsumerSpec, ConsumerSpec]:
    prefix, most = settings.durable_prefix, settings.max_ack_pending
    return (
        ConsumerSpec.of(durables.REPORTER_PROBES, f"{prefix}-probes", max_ack_pending=most),
        ConsumerSpec.of(durables.REPORTER_EVENTS, f"{prefix}-events", max_ack_pending=most),
    )
