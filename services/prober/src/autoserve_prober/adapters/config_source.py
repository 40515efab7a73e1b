"""Follows the ``autoserve-apps`` KV bucket: the latest valid spec of every app.

A value that does not validate is logged with its problems and ignored: the app keeps its
last good spec, so a bad write never stops probing.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from autoserve_config import AppSpec, ConfigError, decode_app_spec

log = structlog.get_logger("autoserve.prober.config")

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
