"""Following the configuration in KV: every app's latest valid spec, and the settings.

A value that does not validate is logged with its problems and ignored: the app keeps its
last good spec, so a bad write never stops a service.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import structlog
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from autoserve_config import AppSpec, ConfigError, DetectorConfig, decode_app_spec, parse_config

log = structlog.get_logger("autoserve.config")

# (apps, when the change was written or None for the initial load)
OnApps = Callable[[dict[str, AppSpec], float | None], None]


async def follow_apps(kv: KeyValue, on_change: OnApps) -> None:
    apps: dict[str, AppSpec] = {}
    synced = False
    watcher = await kv.watchall()
    async for entry in watcher:
        if entry is None:  # end of the current values: apply them all at once
            synced = True
            on_change(dict(apps), None)
            continue
        if entry.operation in (KV_DEL, KV_PURGE):
            if apps.pop(entry.key, None) is None:
                continue
            log.info("app removed", app=entry.key)
        else:
            try:
                apps[entry.key] = decode_app_spec(entry.key, entry.value or b"")
            except ConfigError as exc:
                log.error("invalid app spec ignored; keeping the last good one", app=entry.key, problems=exc.problems)
                continue
            log.info("app spec loaded", app=entry.key, revision=entry.revision)
        if synced:
            on_change(dict(apps), entry.created.timestamp() if entry.created else None)


OnDetectorSettings = Callable[[DetectorConfig], None]


async def follow_detector_settings(kv: KeyValue, on_change: OnDetectorSettings) -> None:
    """The ``detector`` key of the settings bucket; defaults until one is written."""
    watcher = await kv.watch("detector")
    on_change(DetectorConfig())
    async for entry in watcher:
        if entry is None:
            continue
        if entry.operation in (KV_DEL, KV_PURGE):
            on_change(DetectorConfig())
            continue
        try:
            raw = msgspec.json.decode(entry.value or b"")
            on_change(parse_config({"detector": raw}).detector)
        except (msgspec.DecodeError, ConfigError) as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            log.error("invalid detector settings ignored; keeping the last good ones", problems=problems)
