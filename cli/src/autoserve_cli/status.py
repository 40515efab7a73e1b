"""``autoserve status``: every instance with its health, breaker, last probe, last failure
and last recovery, from the streams.

The last event of each kind per instance comes from one ordered consumer per kind with
``DeliverPolicy.LAST_PER_SUBJECT``: subjects end in ``<app>.<instance>``, so that is one
message per instance and kind however long the streams are (10,000 instances: five passes
of 10,000 messages, not 50,000 ``get_last_msg`` requests), and the same consumers then
deliver what happens next, which keeps the live view current.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from rich.console import Console
from rich.live import Live
from rich.table import Table

from autoserve_events import (
    ALERTS_WILDCARD,
    EVENTS_STREAM,
    AlertChanged,
    BreakerStateChanged,
    FailureDetected,
    HealthChanged,
    MalformedEvent,
    ProbeCompleted,
    RecoveryExecuted,
    decode,
    wildcard,
)
from autoserve_runtime import connect, start_sequence

InstanceKey = tuple[str, str]
KINDS = (ProbeCompleted, HealthChanged, FailureDetected, RecoveryExecuted, BreakerStateChanged)
# Alerts are one subject per app, so the live view reads their recent history instead.
ALERT_HISTORY_SECONDS = 24 * 3600
MAX_ALERTS = 10_000


def age(seconds: float) -> str:
    """4s, 3m, 2h, 5d: how long ago, in the largest whole unit."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


class StatusView:
    """The last event of each kind per instance: a fold over the streams (``apply``)."""

    def __init__(self) -> None:
        self.latest: dict[InstanceKey, ProbeCompleted] = {}  # the last probe
        self.seen: dict[InstanceKey, int] = {}
        self.health: dict[InstanceKey, HealthChanged] = {}
        self.failures: dict[InstanceKey, FailureDetected] = {}
        self.recoveries: dict[InstanceKey, RecoveryExecuted] = {}
        self.breakers: dict[InstanceKey, BreakerStateChanged] = {}  # the last transition of each
        self.alerts: dict[str, AlertChanged] = {}  # alert_id -> its latest transition
        self.last_message_at = 0.0
        self._caught_up: dict[str, bool] = {}

    # -- the fold ---------------------------------------------------------------------------

    def apply(self, event: object) -> None:
        if isinstance(event, ProbeCompleted):
            key = (event.app_name, event.instance_id)
            self.latest[key] = event
            self.seen[key] = self.seen.get(key, 0) + 1
        elif isinstance(event, HealthChanged):
            self._keep_newest(self.health, event)
        elif isinstance(event, FailureDetected):
            self._keep_newest(self.failures, event)
        elif isinstance(event, RecoveryExecuted):
            self._keep_newest(self.recoveries, event)
        elif isinstance(event, BreakerStateChanged):
            self.breakers[(event.app_name, event.instance_id)] = event
        elif isinstance(event, AlertChanged):
            current = self.alerts.get(event.alert_id)
            if current is None or event.timestamp >= current.timestamp:
                self.alerts[event.alert_id] = event
            if len(self.alerts) > MAX_ALERTS:  # a live view left open for weeks: forget old resolved ones
                cutoff = event.timestamp - ALERT_HISTORY_SECONDS
                self.alerts = {k: a for k, a in self.alerts.items() if a.status != "resolved" or a.timestamp > cutoff}

    @staticmethod
    def _keep_newest(table: dict[InstanceKey, Any], event: Any) -> None:
        key = (event.app_name, event.instance_id)
        current = table.get(key)
        if current is None or event.timestamp >= current.timestamp:
            table[key] = event

    # -- reading the streams ---------------------------------------------------------------

    async def follow(self, js: JetStreamContext, app: str | None = None) -> None:
        # From a sequence, never a start time: nats-py re-creates an ordered consumer after a
        # server restart, and one started from a time is then refused (autoserve_runtime.feed).
        since = await start_sequence(js, EVENTS_STREAM, time.time() - ALERT_HISTORY_SECONDS)
        subscriptions = [
            (wildcard(kind, app or "*"), {"deliver_policy": DeliverPolicy.LAST_PER_SUBJECT}) for kind in KINDS
        ]
        subscriptions.append((alert_subject(app or "*"), {"config": ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=since)}))  # fmt: skip
        for subject, delivery in subscriptions:

            async def on_message(msg: Msg, subject: str = subject) -> None:
                self.last_message_at = time.monotonic()
                with contextlib.suppress(Exception):
                    if msg.metadata.num_pending == 0:
                        self._caught_up[subject] = True
                try:
                    event = decode(msg.data)
                except MalformedEvent:
                    return
                self.apply(event)

            self._caught_up.setdefault(subject, False)
            sub = await js.subscribe(subject, cb=on_message, ordered_consumer=True, **delivery)
            with contextlib.suppress(Exception):
                info = await sub.consumer_info()
                if info.num_pending == 0 and not info.delivered.consumer_seq:
                    self._caught_up[subject] = True  # nothing stored for this kind

    async def settle(self, quiet: float = 2.0, deadline: float = 10.0) -> None:
        """Wait until every kind's stored last messages have arrived (or, should the server
        not say, nothing arrived for ``quiet`` seconds), at most ``deadline`` seconds."""
        start = time.monotonic()
        self.last_message_at = start
        while time.monotonic() - start < deadline:
            if self._caught_up and all(self._caught_up.values()):
                return
            if time.monotonic() - self.last_message_at > quiet:
                return
            await asyncio.sleep(0.02)

    # -- what an operator sees -------------------------------------------------------------

    def keys(self) -> list[InstanceKey]:
        return sorted(
            set(self.latest)
            | set(self.health)
            | set(self.failures)
            | set(self.recoveries)
            | set(self.breakers)
            | {(a.app_name, a.instance_id) for a in self.alerts.values()}
        )

    def alert(self, key: InstanceKey) -> AlertChanged | None:
        """The instance's alert an operator cares about: the newest still open, else the newest."""
        mine = [a for a in self.alerts.values() if (a.app_name, a.instance_id) == key]
        open_ = [a for a in mine if a.status != "resolved"]
        return max(open_ or mine, key=lambda a: a.timestamp, default=None)

    def breaker(self, key: InstanceKey) -> str:
        """The breaker's state; an instance without a transition yet is closed."""
        change = self.breakers.get(key)
        return change.state if change is not None else "closed"

    def health_of(self, key: InstanceKey) -> str:
        change = self.health.get(key)
        if change is None:
            return "unknown"
        return "healthy" if change.healthy else "unhealthy"

    def row(self, key: InstanceKey) -> dict[str, Any]:
        """One instance for ``--json``; the keys are documented in the README and stable."""
        probe, health = self.latest.get(key), self.health.get(key)
        failure, recovery, breaker = self.failures.get(key), self.recoveries.get(key), self.breakers.get(key)
        row: dict[str, Any] = {
            "app_name": key[0],
            "instance_id": key[1],
            "health": self.health_of(key),
            "health_since": health.timestamp if health else None,
            "health_reason": health.reason if health else None,
            "breaker": self.breaker(key),
            "breaker_forced": bool(breaker and breaker.forced),
            "breaker_since": breaker.timestamp if breaker else None,
            "last_probe": None,
            "last_failure": None,
            "last_recovery": None,
            "alert": None,
            "probes_seen": self.seen.get(key, 0),
        }
        if probe is not None:
            row["last_probe"] = {
                "timestamp": probe.timestamp,
                "is_healthy": probe.is_healthy,
                "check_type": probe.check_type,
                "status_code": probe.status_code,
                "response_time_ms": probe.response_time_ms,
                "error": probe.error,
                "error_kind": probe.error_kind,
            }
            # Before these columns a row was the last probe's fields: they stay, flat.
            row = {**msgspec.to_builtins(probe), **row}
        if failure is not None:
            row["last_failure"] = {
                "timestamp": failure.timestamp,
                "failure_type": failure.failure_type,
                "severity": failure.severity,
                "message": failure.message,
                "consecutive_count": failure.consecutive_count,
                "is_critical": failure.is_critical,
                "event_id": failure.event_id,
            }
        if recovery is not None:
            row["last_recovery"] = {
                "timestamp": recovery.timestamp,
                "strategy": recovery.strategy,
                "success": recovery.success,
                "failure_type": recovery.failure_type,
                "duration_ms": recovery.duration_ms,
                "error": recovery.error,
                "event_id": recovery.event_id,
            }
        if (alert := self.alert(key)) is not None:
            row["alert"] = {
                "alert_id": alert.alert_id,
                "status": alert.status,
                "failure_type": alert.failure_type,
                "severity": alert.severity,
                "since": alert.timestamp,
                "acknowledged_by": alert.acknowledged_by,
            }
        return row

    def as_json(self) -> str:
        return json.dumps([msgspec.to_builtins(self.row(key)) for key in self.keys()], indent=2)

    def _troubled(self, key: InstanceKey) -> bool:
        probe = self.latest.get(key)
        return (
            self.health_of(key) == "unhealthy" or self.breaker(key) != "closed" or bool(probe and not probe.is_healthy)
        )

    def table(self, title: str = "AutoServe Health", max_rows: int | None = None) -> Table:
        """All instances by name; with ``max_rows`` (the live view), troubled ones first."""
        now = time.time()
        keys = self.keys()
        if max_rows is not None and len(keys) > max_rows:
            keys = sorted(keys, key=lambda k: (not self._troubled(k), k))[:max_rows]
        healthy = sum(1 for k in self.keys() if self.health_of(k) == "healthy")
        unhealthy = sum(1 for k in self.keys() if self.health_of(k) == "unhealthy")
        opened = sum(1 for k in self.breakers if self.breaker(k) != "closed")
        firing = sum(1 for a in self.alerts.values() if a.status == "firing")
        shown = "" if len(keys) == len(self.keys()) else f" · {len(keys)} shown, troubled first"
        caption = (f"{len(self.keys())} instances · {healthy} healthy · {unhealthy} unhealthy · "
                   f"{opened} breakers not closed · {firing} alerts firing{shown}")  # fmt: skip
        table = Table(title=title, caption=caption)
        columns = ("app", "instance", "health", "breaker", "last probe", "last failure", "last recovery", "alert")
        for column in columns:
            table.add_column(column)
        for key in keys:
            table.add_row(*key, self._health_cell(key, now), self._breaker_cell(key, now), self._probe_cell(key, now),
                          self._failure_cell(key, now), self._recovery_cell(key, now),
                          self._alert_cell(key, now))  # fmt: skip
        return table

    def _health_cell(self, key: InstanceKey, now: float) -> str:
        change = self.health.get(key)
        if change is None:
            return "[dim]unknown[/]"
        word = "[green]healthy[/]" if change.healthy else "[red]unhealthy[/]"
        return f"{word} {age(now - change.timestamp)}"

    def _breaker_cell(self, key: InstanceKey, now: float) -> str:
        change = self.breakers.get(key)
        if change is None:
            return "closed"
        text = _BREAKER_STYLE[change.state].format(change.state + (" (held)" if change.forced else ""))
        return f"{text} {age(now - change.timestamp)}"

    def _probe_cell(self, key: InstanceKey, now: float) -> str:
        probe = self.latest.get(key)
        if probe is None:
            return "[dim]-[/]"
        if probe.is_healthy:
            result = f"[green]ok[/] {probe.status_code or probe.check_type} {probe.response_time_ms:.1f} ms"
        else:
            result = f"[red]failed[/] {(probe.error or str(probe.status_code or ''))[:40]}"
        return f"{result} · {age(now - probe.timestamp)} ago"

    def _failure_cell(self, key: InstanceKey, now: float) -> str:
        failure = self.failures.get(key)
        if failure is None:
            return "[dim]-[/]"
        return f"{failure.failure_type} ({failure.severity}) · {age(now - failure.timestamp)} ago"

    def _recovery_cell(self, key: InstanceKey, now: float) -> str:
        recovery = self.recoveries.get(key)
        if recovery is None:
            return "[dim]-[/]"
        outcome = "[green]ok[/]" if recovery.success else "[red]failed[/]"
        return f"{recovery.strategy} {outcome} · {age(now - recovery.timestamp)} ago"

    def _alert_cell(self, key: InstanceKey, now: float) -> str:
        alert = self.alert(key)
        if alert is None:
            return "[dim]-[/]"
        style = {"firing": "[red]{}[/]", "acknowledged": "[yellow]{}[/]"}.get(alert.status, "[green]{}[/]")
        return f"{style.format(alert.status)} {alert.failure_type} · {age(now - alert.timestamp)} ago"


def alert_subject(app: str) -> str:
    """``AlertChanged`` of one app, or of every app with ``*``."""
    return ALERTS_WILDCARD if app == "*" else ALERTS_WILDCARD.replace("*", app)


LatestProbes = StatusView  # the name ``up`` knew it by

_BREAKER_STYLE = {"open": "[red]{}[/]", "half_open": "[yellow]{}[/]", "closed": "{}"}


async def show_status(nats_url: str, *, once: bool, as_json: bool, app: str | None = None) -> int:
    nc = await connect(nats_url, "autoserve-status", timeout=10)
    try:
        view = StatusView()
        await view.follow(nc.jetstream(), app)
        await view.settle()
        if as_json:
            print(view.as_json())
        elif once:
            console = Console()
            if not console.is_terminal:  # piped or logged: do not crop to 80 columns
                console = Console(width=240)
            console.print(view.table())
        else:
            await live_table(lambda: view.table(max_rows=rows_that_fit()), asyncio.Event())
    finally:
        await nc.close()
    return 0


def rows_that_fit() -> int:
    return max(5, shutil.get_terminal_size((120, 40)).lines - 8)


async def live_table(render: Callable[[], Table], stop: asyncio.Event) -> None:
    """Refresh once a second until ``stop`` is set or Ctrl-C."""
    with Live(render(), refresh_per_second=2, screen=False) as live:
        try:
            while not stop.is_set():
                live.update(render())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.CancelledError:
            pass
