"""``autoserve run reporter``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from autoserve_runtime import serve

from .adapters.api import DEFAULT_LISTEN
from .adapters.clickhouse import default_url
from .service import ReporterService, ReporterSettings


def _days(name: str, value: object) -> int:
    try:
        days = int(str(value))
    except ValueError:
        days = 0
    if days < 1:
        raise SystemExit(f"autoserve run reporter: {name}: must be a whole number of days >= 1, got {value!r}")
    return days


def settings_from(args: argparse.Namespace) -> ReporterSettings:
    """Flags first, then the environment, then defaults (``up`` passes AUTOSERVE_DATA_DIR)."""
    env = os.environ.get
    data_dir = Path(getattr(args, "data_dir", None) or env("AUTOSERVE_DATA_DIR") or ".autoserve")
    return ReporterSettings(
        clickhouse_url=getattr(args, "clickhouse_url", None)
        or env("AUTOSERVE_CLICKHOUSE_URL")
        or default_url(data_dir),
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
