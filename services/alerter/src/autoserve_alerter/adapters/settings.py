"""Following the ``alerting`` key of the settings bucket (``autoserve apply`` writes it)."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import structlog
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from autoserve_config import AlertingConfig, ConfigError, parse_config

log = structlog.get_logger("autoserve.alerter.settings")

SETTINGS_KEY = "alerting"


def decode_alerting(data: bytes) -> AlertingConfig:
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise ConfigError([f"alerting: not valid JSON: {exc}"]) from None
    return parse_config({"alerting": raw}).alerting


async def follow_alerting_settings(kv: KeyValue, on_change: Callable[[AlertingConfig], None]) -> None:
    """Defaults until a value is written; a bad value is logged and the last good one kept."""
    watcher = await kv.watch(SETTINGS_KEY)
    seeded = False
    async for entry in watcher:
        if entry is None:
            if not seeded:
                seeded = True
                on_change(AlertingConfig())
            continue
        seeded = True
        if entry.operation in (KV_DEL, KV_PURGE):
            on_change(AlertingConfig())
            continue
        try:
            on_change(decode_alerting(entry.value or b""))
        except ConfigError as exc:
            log.error("invalid alerting settings ignored; keeping the last good ones", problems=exc.problems)
