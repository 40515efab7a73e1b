"""The reporter's composition root: ClickHouse (migrated), two durable consumers (probes,
and the audit trail), one batch writer per table, and the report API.

Every event lands in ClickHouse: ``ProbeCompleted`` as the seed's metric rows, everything
else as a row of ``events``. A message is acknowledged only after its rows are stored
(the consumer waits on the batch's future), so a crash or an outage repeats work and never
loses it; the tables' ReplacingMergeTree key makes the repeat harmless.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from autoserve_config import AppSpec
from autoserve_events import APPS_BUCKET, AnyEvent, ProbeCompleted
from autoserve_runtime import add_counter, add_gauge, follow_apps
from autoserve_runtime.host import Consume, Host, HostedService, Plan, Watch

from .adapters.api import build_app, parse_listen
from .adapters.batcher import BatchWriter
from .adapters.clickhouse import Store, describe
from .adapters.migrations import SchemaNotReady, check_schema, prepare
from .adapters.queries import Reports
from .core.rows import EVENT_COLUMNS, EVENTS_TABLE, METRIC_COLUMNS, METRICS_TABLE, event_row, metric_rows
from .settings import ReporterSettings, consumer_specs

log = structlog.get_logger("autoserve.reporter")

SERVICE = "reporter"


class ReporterService(HostedService):
    name = SERVICE

    def __init__(self, nats_url: str, settings: ReporterSettings) -> None:
        super().__init__(nats_url)
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

    # -- on the service host -----------------------------------------------------------------

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

    async def open(self, host: Host) -> None:
        s = self.settings
        for store in {self.store, self.read_store}:
            host.closing(store.close)
        applied = await self._prepare_schema()
        batch = {"max_rows": s.batch_rows, "max_delay": s.batch_seconds}
        self.metrics = BatchWriter(self.store, METRICS_TABLE, METRIC_COLUMNS, **batch).start()
        self.events = BatchWriter(self.store, EVENTS_TABLE, EVENT_COLUMNS, **batch).start()
        for writer in (self.events, self.metrics):
            host.closing(writer.close)
        self._export_writer_stats()
        runner = web.AppRunner(build_app(self), access_log=None)
        host.closing(runner.cleanup)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port).start()
        log.info("report API listening", api=f"http://{self.host}:{self.port}", migrations_applied=applied,
                 clickhouse=describe(s.clickhouse_url))  # fmt: skip

    def plan(self) -> Plan:
        # Everything on the bus, refused inputs too: the audit trail (autoserve_runtime.admission).
        # The publisher carries dead letters only.
        drain = self.settings.batch_seconds + 5.0
        return Plan(
            watches=[Watch(APPS_BUCKET, follow_apps, self._on_apps, required=False)],
            consumes=[Consume(spec, self.process, stop_timeout=drain) for spec in consumer_specs(self.settings)],
        )

    def stopped(self) -> dict[str, Any]:
        return self.status()
