"""The reporter's composition root: ClickHouse (migrated), two durable consumers (probes,
and the audit trail), one batch writer per table, and the report API.

Every event lands in ClickHouse: ``ProbeCompleted`` as the seed's metric rows, everything
else as a row of ``events``. A message is acknowledged only after its rows are stored
(the consumer waits on the batch's future), so a crash or an outage repeats work and never
loses it; the tables' ReplacingMergeTree key makes the repeat harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from autoserve_config import AppSpec
from autoserve_events import APPS_BUCKET, AnyEvent, ProbeCompleted, durables
from autoserve_runtime import (
    ConsumerSpec,
    EventConsumer,
    EventPublisher,
    add_counter,
    add_gauge,
    cancel_all,
    close_nats,
    connect,
    follow_apps,
    provision,
)

from .adapters.api import DEFAULT_LISTEN, build_app, parse_listen
from .adapters.batcher import BatchWriter
from .adapters.clickhouse import Store, describe
from .adapters.migrations import SchemaNotReady, check_schema, prepare
from .adapters.queries import Reports
from .core.rows import EVENT_COLUMNS, EVENTS_TABLE, METRIC_COLUMNS, METRICS_TABLE, event_row, metric_rows

log = structlog.get_logger("autoserve.reporter")

SERVICE = "reporter"


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


class ReporterService:
    def __init__(self, nats_url: str, settings: ReporterSettings) -> None:
        self.nats_url = nats_url
        self.settings = settings
        self.host, self.port = parse_listen(settings.listen)
        self.store = Store(settings.clickhouse_url)
        self.read_store = self.store
        read_url = settings.clickhouse_read_url
        if read_url and read_url != settings.clickhouse_url:
            if "chdb" in (urlsplit(read_url).scheme, urlsplit(settings.clickhouse_url).scheme):
                raise ValueError(
                    f"clickhouse read url {describe(read_url)!r}: chDB is one engine per process, "
                    "so a separate read URL needs ClickHouse servers (http or https) for both"
                )
            self.read_store = Store(read_url)
        self.reports = Reports(self.read_store)
        self.metrics: BatchWriter | None = None
        self.events: BatchWriter | None = None
        self.consumers: list[EventConsumer] = []
        self.ready = asyncio.Event()
        self._configured: set[str] = set()

    # -- what the API asks ---------------------------------------------------------------

    async def known_app(self, app: str) -> bool:
        return app in self._configured or await self.reports.has_data(app)

    async def apps(self) -> list[str]:
        return sorted(set(await self.reports.apps()) | self._configured)

    def is_ready(self) -> bool:
        return self.ready.is_set()

    def status(self) -> dict[str, Any]:
        writers = {w.table: asdict(w.stats) for w in (self.metrics, self.events) if w is not None}
        consumers = {c._spec.durable: vars(c.stats) for c in self.consumers}
        return {"clickhouse": describe(self.settings.clickhouse_url), "writers": writers, "consumers": consumers}

    # -- the fold: rows for ClickHouse; the futures tell the consumer when to ack ---------

    def process(self, event: AnyEvent) -> Sequence[asyncio.Future[bool]]:
        assert self.metrics is not None and self.events is not None
        if isinstance(event, ProbeCompleted):
            return [self.metrics.add(metric_rows(event))]
        return [self.events.add([event_row(event)])]

    def _export_writer_stats(self) -> None:
        """``/metrics`` reads the batch writers' stats at scrape time, by table (nothing
        is counted twice on the path of a row)."""

        def by_table(attr: str) -> Callable[[], dict[tuple[str, ...], int]]:
            writers = (self.metrics, self.events)
            return lambda: {(w.table,): getattr(w.stats, attr) for w in writers if w is not None}

        labels = ("table",)
        add_counter("reporter_rows_stored", "Rows ClickHouse stored, by table", by_table("rows_stored"), labels)
        add_counter("reporter_batches_stored", "Batches ClickHouse stored", by_table("batches_stored"), labels)
        add_counter(
            "reporter_insert_failures", "Inserts that failed (each retried)", by_table("insert_failures"), labels
        )
        add_gauge("reporter_buffered_rows", "Rows waiting to be stored", by_table("buffered_rows"), labels)

    def _on_apps(self, apps: dict[str, AppSpec], _written_at: float | None) -> None:
        self._configured = set(apps)

    # -- lifecycle -------------------------------------------------------------------------

    async def _prepare_schema(self) -> list[int]:
        s = self.settings
        if s.migrate:
            return await prepare(self.store, s.metrics_retention_days, s.events_retention_days)
        try:
            await check_schema(self.store)
        except SchemaNotReady as exc:
            log.error("reporter cannot start", reason=str(exc))
            raise SystemExit(f"autoserve run reporter: {exc}") from None
        return []

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        started = time.monotonic()
        applied = await self._prepare_schema()
        nc = await connect(self.nats_url, "autoserve-reporter")
        js = nc.jetstream()
        await provision(js)
        watcher = asyncio.create_task(follow_apps(await js.key_value(APPS_BUCKET), self._on_apps))
        publisher = EventPublisher(js).start()  # dead letters only
        batch = {"max_rows": s.batch_rows, "max_delay": s.batch_seconds}
        self.metrics = BatchWriter(self.store, METRICS_TABLE, METRIC_COLUMNS, **batch).start()
        self.events = BatchWriter(self.store, EVENTS_TABLE, EVENT_COLUMNS, **batch).start()
        self._export_writer_stats()
        # Everything on the bus, refused inputs too: the audit trail (autoserve_runtime.admission).
        self.consumers = [EventConsumer(js, publisher, spec, SERVICE, self.process) for spec in consumer_specs(s)]
        runner = web.AppRunner(build_app(self), access_log=None)
        try:
            await runner.setup()
            await web.TCPSite(runner, self.host, self.port).start()
            for consumer in self.consumers:
                await consumer.start()
            self.ready.set()
            log.info("reporter started", nats=self.nats_url, clickhouse=describe(s.clickhouse_url),
                     api=f"http://{self.host}:{self.port}", migrations_applied=applied,
                     seconds=round(time.monotonic() - started, 3))  # fmt: skip
            await stop.wait()
        finally:
            log.info("reporter stopping")
            for consumer in self.consumers:
                await consumer.stop(timeout=s.batch_seconds + 5.0)
            for writer in (self.metrics, self.events):
                await writer.close()
            with contextlib.suppress(Exception):
                await runner.cleanup()
            await publisher.close()
            await cancel_all([watcher])
            await close_nats(nc)
            for store in {self.store, self.read_store}:
                await store.close()
            log.info("reporter stopped", **self.status())
