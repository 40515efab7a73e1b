"""``autoserve status``: every instance with its last probe, from the probe stream.

The last ``ProbeCompleted`` per subject comes from an ordered consumer with
``DeliverPolicy.LAST_PER_SUBJECT``: one message per instance, however long the stream.
Health as the detector decides it, breaker state and failures join this view as those
services land.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from rich.console import Console
from rich.live import Live
from rich.table import Table

from autoserve_events import BreakerStateChanged, MalformedEvent, ProbeCompleted, decode, wildcard
from autoserve_runtime import connect

InstanceKey = tuple[str, str]


class LatestProbes:
    """The last probe of every instance, kept up to date from the stream."""

    def __init__(self) -> None:
        self.latest: dict[InstanceKey, ProbeCompleted] = {}
        self.seen: dict[InstanceKey, int] = {}
        self.breakers: dict[InstanceKey, BreakerStateChanged] = {}  # the last transition of each
        self.last_message_at = 0.0

    async def follow(self, js: JetStreamContext) -> None:
        async def on_message(msg: Msg) -> None:
            self.last_message_at = time.monotonic()
            try:
                event = decode(msg.data)
            except MalformedEvent:
                return
            if isinstance(event, ProbeCompleted):
                key = (event.app_name, event.instance_id)
                self.latest[key] = event
                self.seen[key] = self.seen.get(key, 0) + 1
            elif isinstance(event, BreakerStateChanged):
                self.breakers[(event.app_name, event.instance_id)] = event

        for kind in (ProbeCompleted, BreakerStateChanged):
            await js.subscribe(
                wildcard(kind),
                cb=on_message,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            )

    def _breaker_cell(self, key: InstanceKey) -> str:
        change = self.breakers.get(key)
        return _BREAKER_STYLE[change.state if change else "closed"].format(self.breaker(key))

    def breaker(self, key: InstanceKey) -> str:
        """The breaker's state; an instance without a transition yet is closed."""
        change = self.breakers.get(key)
        if change is None:
            return "closed"
        return f"{change.state} (held)" if change.forced else change.state

    async def settle(self, quiet: float = 0.3, deadline: float = 5.0) -> None:
        """Wait until the initial backlog has arrived (no message for ``quiet`` seconds)."""
        start = time.monotonic()
        self.last_message_at = start
        while time.monotonic() - start < deadline and time.monotonic() - self.last_message_at < quiet:
            await asyncio.sleep(0.05)

    def table(self, title: str = "AutoServe Health") -> Table:
        now = time.time()
        table = Table(title=title, caption=f"{len(self.latest)} instances · last probe per instance")
        for column in ("app", "instance", "check", "last probe", "time", "result", "age", "seen", "breaker"):
            table.add_column(column, justify="right" if column in ("time", "age", "seen") else "left")
        for key in sorted(self.latest):
            probe = self.latest[key]
            ok = "[green]ok[/]" if probe.is_healthy else "[red]failed[/]"
            result = str(probe.status_code or "") if probe.is_healthy else (probe.error or "")
            table.add_row(
                probe.app_name,
                probe.instance_id,
                probe.check_type,
                ok,
                f"{probe.response_time_ms:.1f} ms",
                result[:60],
                f"{max(0.0, now - probe.timestamp):.0f}s",
                str(self.seen[key]),
                self._breaker_cell(key),
            )
        for key in sorted(set(self.breakers) - set(self.latest)):  # reported on, never probed
            table.add_row(*key, "-", "-", "", "", "", "", self._breaker_cell(key))
        return table

    def as_json(self) -> str:
        rows = [{**msgspec.to_builtins(p), "breaker": self.breaker(k)} for k, p in sorted(self.latest.items())]
        return json.dumps(rows, indent=2)


_BREAKER_STYLE = {"open": "[red]{}[/]", "half_open": "[yellow]{}[/]", "closed": "{}"}


async def show_status(nats_url: str, *, once: bool, as_json: bool) -> int:
    nc = await connect(nats_url, "autoserve-status", timeout=10)
    try:
        view = LatestProbes()
        await view.follow(nc.jetstream())
        await view.settle()
        if as_json:
            print(view.as_json())
        elif once:
            Console().print(view.table())
        else:
            await live_table(view.table, asyncio.Event())
    finally:
        await nc.close()
    return 0


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
