"""The reporter's composition root: ClickHouse (migrated), two durable consumers (probes,
and the audit trail), one batch writer per table, and the report API.

Every event lands in ClickHouse: ``ProbeCompleted`` as the seed's metric rows, everything
else as a row of ``events``. A message is acknowledged only after its rows are stored
(the consumer waits on the batch's future), so a crash or an outage repeats work and never
loses it; the tables' ReplacingMergeTree key makes the repeat harmless.

Replicas are active/standby (``adapters/active.py``): only the member holding
``lease.reporter`` opens the store, the API and the consumers; a standby is a running
member that is not ready (``/readyz`` says why) and takes over when the lease lapses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import Any, TypeVar
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from clickhouse_connect.driver.exceptions import OperationalError, ProgrammingError

from autoserve_config import AppSpec
from autoserve_events import APPS_BUCKET, AnyEvent, ProbeCompleted
from autoserve_runtime import EventConsumer, add_counter, add_gauge, follow_apps
from autoserve_runtime.host import CLOSE_SECONDS, Host, HostedService, Plan, Watch
from autoserve_runtime.membership import Lease
from autoserve_runtime.observability import add_check, remove_check

from .adapters.active import ActiveStandby
from .adapters.api import build_app, parse_listen
from .adapters.batcher import BatchWriter
from .adapters.clickhouse import Store, describe
from .adapters.migrations import SchemaNotReady, check_schema, prepare
from .adapters.queries import Reports
from .core.rows import EVENT_COLUMNS, EVENTS_TABLE, METRIC_COLUMNS, METRICS_TABLE, event_row, metric_rows
from .settings import ReporterSettings, consumer_specs

log = structlog.get_logger("autoserve.reporter")

SERVICE = "reporter"
RETRY_SECONDS = 0.5
T = TypeVar("T")


class ReporterService(HostedService):
    name = SERVICE

    def __init__(self, nats_url: str, settings: ReporterSettings) -> None:
        super().__init__(nats_url)
        self.settings = settings
        self.host, self.port = parse_listen(settings.listen)
        read_url = settings.clickhouse_read_url
        schemes = (urlsplit(read_url or "").scheme, urlsplit(settings.clickhouse_url).scheme)
        if read_url and read_url != settings.clickhouse_url and "chdb" in schemes:
            raise ValueError(
                f"clickhouse read url {describe(read_url)!r}: chDB is one engine per process, "
                "so a separate read URL needs ClickHouse servers (http or https) for both"
            )
        self._open_stores()  # lazily: the engine starts at the first query, once active
        self.metrics: BatchWriter | None = None
        self.events: BatchWriter | None = None
        self._configured: set[str] = set()
        self.keeper: ActiveStandby | None = None
        self._runner: web.AppRunner | None = None
        self._ready_check = f"{SERVICE} active (holds lease.{SERVICE})"

    def _open_stores(self) -> None:
        """Stores for one active term (a Store is closed at the end of its term)."""
        s = self.settings
        self.store = Store(s.clickhouse_url)
        read_url = s.clickhouse_read_url
        self.read_store = Store(read_url) if read_url and read_url != s.clickhouse_url else self.store
        self.reports = Reports(self.read_store)

    # -- what the API asks ---------------------------------------------------------------

    async def known_app(self, app: str) -> bool:
        return app in self._configured or await self.reports.has_data(app)

    async def apps(self) -> list[str]:
        return sorted(set(await self.reports.apps()) | self._configured)

    @property
    def active(self) -> bool:
        return self.keeper is not None and self.keeper.active

    def is_ready(self) -> bool:
        return self.ready.is_set() and self.active

    def owns_what(self) -> str:
        return "active" if self.active else "standby"

    def status(self) -> dict[str, Any]:
        writers = {w.table: asdict(w.stats) for w in (self.metrics, self.events) if w is not None}
        consumers = {c._spec.durable: vars(c.stats) for c in self.consumers}
        return {"clickhouse": describe(self.settings.clickhouse_url), "writers": writers, "consumers": consumers}

    # -- the fold: rows for ClickHouse; the futures tell the consumer when to ack ---------

    def process(self, event: AnyEvent) -> Sequence[asyncio.Future[bool]]:
        assert self.metrics is not None and self.events is not None and self.keeper is not None
        if not self.keeper.held:
            # Resumed past the lease's TTL: the input may be a successor's now. Never
            # acknowledged here (the future never resolves); the term ends at once.
            return [asyncio.get_running_loop().create_future()]
        if isinstance(event, ProbeCompleted):
            return [self.metrics.add(metric_rows(event))]
        return [self.events.add([event_row(event)])]

    def _export_writer_stats(self) -> None:
        """``/metrics`` reads the batch writers' stats at scrape time, by table (nothing
        is counted twice on the path of a row)."""

        def by_table(attr: str) -> Callable[[], dict[tuple[str, ...], int]]:
            # The writers of the current term, read at each scrape (a term makes new ones).
            return lambda: {(w.table,): getattr(w.stats, attr) for w in (self.metrics, self.events) if w is not None}

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
        """Wait as a standby until this member holds the lease and its term is open."""
        assert self.membership is not None and host.nc is not None
        self._host = host
        self._export_writer_stats()
        membership = self.membership
        lease = Lease(host.js, SERVICE, membership.member, membership.ttl, lambda: membership.alone)
        self.keeper = keeper = ActiveStandby(lease, self._activate, self._deactivate).start()
        drain = self.settings.batch_seconds + 5.0
        host.closing(keeper.stop, timeout=2 * drain + CLOSE_SECONDS)  # the drain, then the lease goes
        add_check(self._ready_check, lambda: self.active, self._why_not_active)
        add_gauge("reporter_active", "1 while this member holds lease.reporter and ingests; 0 on a standby",
                  lambda: int(self.active))  # fmt: skip
        add_counter("reporter_terms", "Times this member took lease.reporter and became active", lambda: keeper.terms)
        add_counter("reporter_fenced", "Active terms that ended because the lease lapsed (a pause or a cut past "
                    "its TTL): ingestion stopped at once", lambda: keeper.fenced)  # fmt: skip
        host.closing(self._unchecked)
        await asyncio.shield(keeper.first)

    def _why_not_active(self) -> str:
        return (f"standby: another member holds lease.{SERVICE}; this one opens the store and "
                f"consumes when that lease lapses (within {self.membership.ttl if self.membership else 0:g}s "
                "of its holder's death)")  # fmt: skip

    async def _unchecked(self) -> None:
        remove_check(self._ready_check)

    async def _activate(self) -> None:
        """One term: the store (waiting for a previous holder's lock on a chDB path), the
        schema, the writers, the API, then the consumers."""
        s, host = self.settings, self._host
        if self.keeper is not None and self.keeper.terms > 1:
            self._open_stores()  # the last term closed its own
        applied = await self._retrying("open the store", self._prepare_schema)
        batch = {"max_rows": s.batch_rows, "max_delay": s.batch_seconds}
        self.metrics = BatchWriter(self.store, METRICS_TABLE, METRIC_COLUMNS, **batch).start()
        self.events = BatchWriter(self.store, EVENTS_TABLE, EVENT_COLUMNS, **batch).start()
        self._runner = runner = web.AppRunner(build_app(self), access_log=None)
        await runner.setup()
        await self._retrying("listen", lambda: web.TCPSite(runner, self.host, self.port).start())
        log.info("report API listening", api=f"http://{self.host}:{self.port}", migrations_applied=applied,
                 clickhouse=describe(s.clickhouse_url))  # fmt: skip
        assert host.service.publisher is not None
        consumers = [EventConsumer(host.js, host.service.publisher, spec, SERVICE, self.process)
                     for spec in consumer_specs(s)]  # fmt: skip
        self.consumers = consumers
        for consumer in consumers:
            await consumer.start()

    async def _deactivate(self, drain: bool) -> None:
        """End the term: consumers first (draining: each taken row is stored and acked;
        fenced: at once, what is stored is acked and the rest comes back to the successor),
        then the writers, the API and the store, whose chDB lock the successor waits for."""
        stop = self.settings.batch_seconds + 5.0 if drain else 0.0
        for consumer in self.consumers:
            await _quietly(consumer.stop(timeout=stop))
        for writer in (self.events, self.metrics):
            if writer is not None:
                await _quietly(writer.close(timeout=5.0 if drain else 0.0))
        if self._runner is not None:
            await _quietly(self._runner.cleanup())
            self._runner = None
        for store in {self.store, self.read_store}:
            await _quietly(store.close())

    async def _retrying(self, what: str, step: Callable[[], Awaitable[T]]) -> T:
        """``step`` until it succeeds: the previous active member may still hold the chDB
        lock or the API port for a moment (a SIGKILL frees both at once, a pause does not)."""
        while True:
            try:
                return await step()
            except (OSError, OperationalError, ProgrammingError) as exc:
                if isinstance(exc, ProgrammingError) and "chdb engine" not in str(exc):
                    raise  # a refusal, not a lock: retrying would not help
                log.info(f"cannot {what} yet; retrying", error=str(exc)[:200])
                await asyncio.sleep(RETRY_SECONDS)

    def plan(self) -> Plan:
        # Only the apps: the consumers belong to the active term (``_activate``).
        return Plan(watches=[Watch(APPS_BUCKET, follow_apps, self._on_apps, required=False)])

    def stopped(self) -> dict[str, Any]:
        keeper = self.keeper
        terms = {"terms": keeper.terms, "fenced": keeper.fenced} if keeper is not None else {}
        return {**self.status(), **terms}


async def _quietly(step: Awaitable[object], timeout: float = 30.0) -> None:
    """One part failing to close, or hanging on a NATS that is away, must not keep the others
    (or the lease) held."""
    try:
        await asyncio.wait_for(step, timeout)
    except TimeoutError:
        log.warning("closing a part of the term timed out; closing the rest", seconds=timeout)
    except Exception:
        log.exception("closing a part of the term failed; closing the rest")
