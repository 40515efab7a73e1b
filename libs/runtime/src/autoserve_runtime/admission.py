"""Which inputs may become state: one rule for every producer.

Anyone with publish rights can put a probe result (or a container observation, or a
heartbeat) on the bus. One for an app that is not configured, or for an instance that is
neither listed for its app nor discoverable by its Docker labels, would become a phantom
instance with a firing alert. So it is refused, whoever produced it: the consumer
dead-letters it with this reason (counted as ``unconfigured``). Inputs for configured
instances are welcome from any producer.

Pure: the apps in, a reason out. Replay applies the same rule, so replayed state is live state.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from autoserve_config import AppSpec

# The prober names a discovered container by its short id (the prober's core/targets.py, short_id).
CONTAINER_ID = re.compile(r"[0-9a-f]{12}")
UNCONFIGURED = "unconfigured"

Admit = Callable[[Any], str | None]  # why an input is refused, or None to take it


@dataclass(frozen=True)
class Known:
    """What an app admits: its listed instance ids, and discovered containers if it discovers."""

    instances: frozenset[str]
    discovers: bool


def known(apps: Mapping[str, AppSpec]) -> dict[str, Known]:
    return {
        name: Known(frozenset(instance.id for instance in spec.instances), spec.docker is not None)
        for name, spec in apps.items()
    }


def refusal(apps: Mapping[str, Known], app_name: str, instance_id: str) -> str | None:
    """Why an input for ``app_name``/``instance_id`` may not become state, or None."""
    app = apps.get(app_name)
    if app is None:
        return f"{UNCONFIGURED}: app {app_name!r} is not configured"
    if instance_id in app.instances or (app.discovers and CONTAINER_ID.fullmatch(instance_id)):
        return None
    return f"{UNCONFIGURED}: instance {instance_id!r} is neither listed nor discovered for app {app_name!r}"


class Admission:
    """``refusal`` over the apps a service follows (its ``follow_apps`` callback calls
    ``update``); events that name no instance pass."""

    def __init__(self) -> None:
        self._apps: dict[str, Known] = {}

    def update(self, apps: Mapping[str, AppSpec]) -> None:
        self._apps = known(apps)

    def __call__(self, event: Any) -> str | None:
        instance_id = getattr(event, "instance_id", None)
        if instance_id is None:
            return None
        return refusal(self._apps, event.app_name, instance_id)
