"""Following the ``alerting`` key of the settings bucket (``autoserve apply`` writes it).

The runtime's settings follower: a refused value falls back to the newest valid revision
(in memory, else in the key's history), and the alerter's first settings are the stored
ones, read before it starts (its watch is required), or the defaults when there are none."""

from __future__ import annotations

from collections.abc import Callable

from nats.js.kv import KeyValue

from autoserve_config import AlertingConfig
from autoserve_runtime import follow_setting

SETTINGS_KEY = "alerting"


async def follow_alerting_settings(kv: KeyValue, on_change: Callable[[AlertingConfig], None]) -> None:
    await follow_setting(kv, SETTINGS_KEY, AlertingConfig, on_change)
