"""``autoserve run reporter`` and ``autoserve migrate``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from clickhouse_connect.driver.exceptions import ClickHouseError

from autoserve_config import parse_switch
from autoserve_runtime import serve

from .adapters.api import DEFAULT_LISTEN
from .adapters.clickhouse import Store, default_url, describe
from .adapters.migrations import prepare
from .service import ReporterService, ReporterSettings


def _days(name: str, value: object) -> int:
    try:
        days = int(str(value))
    except ValueError:
        days = 0
    if days < 1:
        raise ValueError(f"{name}: must be a whole number of days >= 1, got {value!r}")
    return days


def settings_from(args: argparse.Namespace) -> ReporterSettings:
    """Flags first, then the environment, then defaults (``up`` passes AUTOSERVE_DATA_DIR).
    A bad value raises ValueError naming the setting."""
    env = os.environ.get
    data_dir = Path(getattr(args, "data_dir", None) or env("AUTOSERVE_DATA_DIR") or ".autoserve")
    return ReporterSettings(
        clickhouse_url=getattr(args, "clickhouse_url", None)
        or env("AUTOSERVE_CLICKHOUSE_URL")
        or default_url(data_dir),
        clickhouse_read_url=getattr(args, "clickhouse_read_url", None) or env("AUTOSERVE_CLICKHOUSE_READ_URL"),
        migrate=parse_switch("AUTOSERVE_REPORTER_MIGRATE", env("AUTOSERVE_REPORTER_MIGRATE") or "") is not False,
        listen=getattr(args, "listen", None) or env("AUTOSERVE_REPORTER_LISTEN") or DEFAULT_LISTEN,
        metrics_retention_days=_days(
            "metrics retention",
            getattr(args, "metrics_retention_days", None) or env("AUTOSERVE_METRICS_RETENTION_DAYS") or 30,
        ),
        events_retention_days=_days(
            "events retention",
            getattr(args, "events_retention_days", None) or env("AUTOSERVE_EVENTS_RETENTION_DAYS") or 90,
        ),
    )


def run_service(args: argparse.Namespace) -> int:
    try:
        service = ReporterService(args.nats_url, settings_from(args))
    except ValueError as exc:  # a bad URL or listen address: say which, do not start
        raise SystemExit(f"autoserve run reporter: {exc}") from None
    return serve("reporter", service.run)


def run_migrations(args: argparse.Namespace) -> int:
    """Create or upgrade the tables and set their retention, then exit: the one step that
    needs CREATE TABLE and ALTER TTL, so the reporter itself can run with INSERT only."""
    try:
        settings = settings_from(args)
    except ValueError as exc:
        print(f"autoserve migrate: {exc}", file=sys.stderr)
        return 2

    async def main() -> list[int]:
        store = Store(settings.clickhouse_url)
        try:
            return await prepare(store, settings.metrics_retention_days, settings.events_retention_days)
        finally:
            await store.close()

    where = describe(settings.clickhouse_url)
    try:
        applied = asyncio.run(main())
    except ClickHouseError as exc:  # refused, unreachable, or not allowed: say so, change nothing more
        print(f"autoserve migrate: {where}: {exc}", file=sys.stderr)
        return 1
    print(f"{where}: migrations applied: {applied}" if applied else f"{where}: schema up to date")
    return 0
