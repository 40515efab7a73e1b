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
from typing import Any, Protocol, TypeVar

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from rich.console import Console, Group, RenderableType
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
from autoserve_runtime import cancel_all, connect, start_sequence
from autoserve_runtime.provisioning import ELECTION_ERRORS

from . import cluster_view, members_view
from .cluster_status import ClusterWatch, read_cluster, read_members

InstanceKey = tuple[str, str]
KINDS = (ProbeCompleted, HealthChanged, FailureDetected, RecoveryExecuted, BreakerStateChanged)
# Alerts are one subject per app, so the live view reads their recent history instead.
ALERT_HISTORY_SECONDS = 24 * 3600
MAX_ALERTS = 10_000
# On a cluster that lost a node, a request gets no answer until the stream's (or the meta
# group's) new leader is elected: a few seconds. Status waits that long, not forever.
FOLLOW_PATIENCE_SECONDS = 20.0


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
        self._subscriptions: list[JetStreamContext.PushSubscription] = []

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
            self._subscriptions.append(sub)
            with contextlib.suppress(Exception):
                info = await sub.consumer_info()
                if info.num_pending == 0 and not info.delivered.consumer_seq:
                    self._caught_up[subject] = True  # nothing stored for this kind

    async def close(self) -> None:
        """Stop following (ordered consumers: the server deletes them once idle)."""
        for sub in self._subscriptions:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subscriptions.clear()

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
            "last_probe": _fields(probe, _LAST_PROBE),
            "last_failure": _fields(failure, _LAST_FAILURE),
            "last_recovery": _fields(recovery, _LAST_RECOVERY),
            "alert": _fields(self.alert(key), _ALERT, since="timestamp"),
            "probes_seen": self.seen.get(key, 0),
        }
        if probe is not None:
            # Before these columns a row was the last probe's fields: they stay, flat.
            row = {**msgspec.to_builtins(probe), **row}
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
            table.add_row(
                *key,
                aged(self.health.get(key), now, _health_text, "[dim]unknown[/]", " {}"),
                aged(self.breakers.get(key), now, _breaker_text, "closed", " {}"),
                aged(self.latest.get(key), now, _probe_text),
                aged(self.failures.get(key), now, _failure_text),
                aged(self.recoveries.get(key), now, _recovery_text),
                aged(self.alert(key), now, _alert_text),
            )
        return table


class _Stamped(Protocol):
    @property
    def timestamp(self) -> float: ...


_E = TypeVar("_E", bound=_Stamped)


def aged(
    event: _E | None, now: float, text: Callable[[_E], str], missing: str = "[dim]-[/]", when: str = " · {} ago"
) -> str:
    """One cell of the table: what the latest event says, and how long ago it happened."""
    if event is None:
        return missing
    return text(event) + when.format(age(now - event.timestamp))


def _health_text(change: HealthChanged) -> str:
    return "[green]healthy[/]" if change.healthy else "[red]unhealthy[/]"


def _breaker_text(change: BreakerStateChanged) -> str:
    return _BREAKER_STYLE[change.state].format(change.state + (" (held)" if change.forced else ""))


def _probe_text(probe: ProbeCompleted) -> str:
    if probe.is_healthy:
        return f"[green]ok[/] {probe.status_code or probe.check_type} {probe.response_time_ms:.1f} ms"
    return f"[red]failed[/] {(probe.error or str(probe.status_code or ''))[:40]}"


def _failure_text(failure: FailureDetected) -> str:
    return f"{failure.failure_type} ({failure.severity})"


def _recovery_text(recovery: RecoveryExecuted) -> str:
    return f"{recovery.strategy} {'[green]ok[/]' if recovery.success else '[red]failed[/]'}"


def _alert_text(alert: AlertChanged) -> str:
    style = {"firing": "[red]{}[/]", "acknowledged": "[yellow]{}[/]"}.get(alert.status, "[green]{}[/]")
    return f"{style.format(alert.status)} {alert.failure_type}"


def alert_subject(app: str) -> str:
    """``AlertChanged`` of one app, or of every app with ``*``."""
    return ALERTS_WILDCARD if app == "*" else ALERTS_WILDCARD.replace("*", app)


LatestProbes = StatusView  # the name ``up`` knew it by

_BREAKER_STYLE = {"open": "[red]{}[/]", "half_open": "[yellow]{}[/]", "closed": "{}"}
# The fields of each last event in a ``--json`` row (documented in the README).
_LAST_PROBE = ("timestamp", "is_healthy", "check_type", "status_code", "response_time_ms", "error", "error_kind")
_LAST_FAILURE = ("timestamp", "failure_type", "severity", "message", "consecutive_count", "is_critical", "event_id")
_LAST_RECOVERY = ("timestamp", "strategy", "success", "failure_type", "duration_ms", "error", "event_id")
_ALERT = ("alert_id", "status", "failure_type", "severity", "since", "acknowledged_by")


def _fields(event: object | None, names: tuple[str, ...], **renamed: str) -> dict[str, Any] | None:
    """The ``names`` of ``event`` (``renamed`` maps a name to the attribute it shows); None without one."""
    if event is None:
        return None
    return {name: getattr(event, renamed.get(name, name)) for name in names}


async def show_status(nats_url: str, *, once: bool, as_json: bool, app: str | None = None) -> int:
    nc = await connect(nats_url, "autoserve-status", timeout=10)
    try:
        view = await following(nc.jetstream(), app)
        await view.settle()
        if as_json:
            print(view.as_json())
        elif once:
            console = Console()
            if not console.is_terminal:  # piped or logged: do not crop to 80 columns
                console = Console(width=240)
            console.print(view.table())
            if members := await read_members(nc.jetstream()):
                console.print(members_view.members_table(members, time.time()))
            cluster = await read_cluster(nc, nats_url)
            if cluster is not None:
                console.print(*cluster_view.tables(cluster))
        else:
            await live_status(view, ClusterWatch(nc, nats_url), "AutoServe Health", asyncio.Event())
    finally:
        await nc.close()
    return 0


async def following(js: JetStreamContext, app: str | None = None) -> StatusView:
    """A view following the streams; a request that failed for a leader election is
    tried again with a fresh view (nothing counted twice), for ``FOLLOW_PATIENCE_SECONDS``."""
    deadline = time.monotonic() + FOLLOW_PATIENCE_SECONDS
    while True:
        view = StatusView()
        try:
            await view.follow(js, app)
            return view
        except ELECTION_ERRORS:
            await view.close()
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def live_status(view: StatusView, cluster: ClusterWatch, title: str, stop: asyncio.Event) -> None:
    """The live view (``status`` and ``up``) until ``stop``: the instances ``view`` follows,
    and the cluster when there is one."""
    watching = asyncio.create_task(cluster.run(stop))

    def render() -> RenderableType:
        below = cluster_view.lines(cluster.view) + members_view.lines(len(cluster.members))
        parts: list[RenderableType] = [view.table(title, max_rows=max(5, rows_that_fit() - below))]
        if cluster.members:
            parts.append(members_view.members_table(cluster.members, time.time()))
        if cluster.view is not None:
            parts.extend(cluster_view.tables(cluster.view))
        return Group(*parts)

    try:
        await live_table(render, stop)
    finally:
        await cancel_all([watching])


def rows_that_fit() -> int:
    return max(5, shutil.get_terminal_size((120, 40)).lines - 8)


async def live_table(render: Callable[[], RenderableType], stop: asyncio.Event) -> None:
    """Refresh once a second until ``stop`` is set or Ctrl-C."""
    with Live(render(), refresh_per_second=2, screen=False) as live:
        try:
            while not stop.is_set():
                live.update(render())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.CancelledError:
            pass
