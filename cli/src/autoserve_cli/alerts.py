"""``autoserve alerts list|ack|silence|silences``: alerts and silences, from the event log.

``list`` and ``silences`` fold the alerting events in AUTOSERVE_EVENTS (no service is
asked, so they work while the alerter is down). ``ack`` and ``silence`` publish an event
(``AlertAcknowledged``, ``SilenceCreated``) and return once JetStream stored it; the
alerter folds it in order with everything else, also after a restart.
"""

from __future__ import annotations

import contextlib
import getpass
import socket
import sys
import time
import uuid
from datetime import UTC, datetime

from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from autoserve_config import parse_duration
from autoserve_events import (
    ALERTING_WILDCARD,
    EVENTS_STREAM,
    AlertAcknowledged,
    AlertChanged,
    MalformedEvent,
    NotificationLogged,
    SilenceCreated,
    decode,
    derived_event_id,
    encode,
    headers_for,
    is_valid_name,
    subject_for,
)
from autoserve_runtime import connect, provision

EXIT_USAGE = 2


def _who() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # no user name in a bare container
        return "autoserve"


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def read_alerting(js: JetStreamContext, timeout: float = 10.0) -> list[object]:
    """Every stored alerting event, in stream order. Gives up after ``timeout`` seconds (or
    2 s without a message) and then says so on stderr: what it shows may be incomplete."""
    info = await js.stream_info(EVENTS_STREAM, subjects_filter=ALERTING_WILDCARD)
    if not info.state.subjects:
        return []
    sub = await js.subscribe(
        ALERTING_WILDCARD, stream=EVENTS_STREAM, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL,
        pending_msgs_limit=-1,
    )  # fmt: skip
    events: list[object] = []
    started = time.monotonic()
    complete = False
    try:
        while not complete and time.monotonic() - started < timeout:
            try:
                msg = await sub.next_msg(timeout=2.0)
            except TimeoutError:
                break
            with contextlib.suppress(MalformedEvent):
                events.append(decode(msg.data))
            complete = msg.metadata.num_pending == 0
    finally:
        await sub.unsubscribe()
    if not complete:
        print(f"autoserve alerts: warning: gave up reading the alerting events after "
              f"{time.monotonic() - started:.1f}s with {len(events)} read; what follows may be incomplete",
              file=sys.stderr)  # fmt: skip
    return events


def fold_alerts(events: list[object]) -> tuple[dict[str, AlertChanged], dict[str, str], dict[str, SilenceCreated]]:
    """(last state of each alert, why an alert is held back, silences)."""
    alerts: dict[str, AlertChanged] = {}
    held: dict[str, str] = {}
    silences: dict[str, SilenceCreated] = {}
    for event in events:
        if isinstance(event, AlertChanged):
            alerts[event.alert_id] = event
        elif isinstance(event, NotificationLogged):
            held.update(event.suppressed)
            for alert_id in event.firing:
                held.pop(alert_id, None)
        elif isinstance(event, SilenceCreated):
            silences[event.silence_id] = event
    return alerts, held, silences


async def list_alerts(nats_url: str, show_all: bool = False) -> int:
    nc = await connect(nats_url, "autoserve-alerts-cli", timeout=10)
    try:
        alerts, held, _ = fold_alerts(await read_alerting(nc.jetstream()))
    finally:
        await nc.close()
    shown = [a for a in alerts.values() if show_all or a.status != "resolved"]
    if not shown:
        print("no alerts" if show_all else "no active alerts (--all shows resolved ones)")
        return 0
    print(f"{'ID':<13} {'STATUS':<13} {'SINCE':<21} {'APP/INSTANCE':<28} {'FAILURE':<26} {'SEVERITY':<9} NOTE")
    for a in sorted(shown, key=lambda a: a.starts_at):
        note = (a.acknowledged_by and f"acked by {a.acknowledged_by}") or held.get(a.alert_id, "")
        where = f"{a.app_name}/{a.instance_id}"
        print(f"{a.alert_id:<13} {a.status:<13} {_when(a.starts_at):<21} {where:<28} {a.failure_type:<26} "
              f"{a.severity:<9} {note}")  # fmt: skip
    return 0


async def ack(nats_url: str, alert_id: str, by: str | None, comment: str = "") -> int:
    nc = await connect(nats_url, "autoserve-alerts-cli", timeout=10)
    try:
        js = nc.jetstream()
        alerts, _, _ = fold_alerts(await read_alerting(js))
        matches = [a for a in alerts.values() if a.alert_id.startswith(alert_id)] if alert_id else []
        if len(matches) != 1:
            problem = "no alert" if not matches else f"{len(matches)} alerts"
            print(
                f"autoserve alerts ack: {problem} with id {alert_id!r} (see `autoserve alerts list`)", file=sys.stderr
            )
            return EXIT_USAGE
        alert = matches[0]
        if alert.status != "firing":
            print(f"autoserve alerts ack: alert {alert.alert_id} is {alert.status}, not firing", file=sys.stderr)
            return 1
        event = AlertAcknowledged(alert_id=alert.alert_id, app_name=alert.app_name, instance_id=alert.instance_id,
                                  acknowledged_by=by or _who(), timestamp=time.time(), comment=comment)  # fmt: skip
        await js.publish(subject_for(event), encode(event), headers=headers_for(event), timeout=10)
    finally:
        await nc.close()
    print(f"acknowledged {alert.alert_id} ({alert.app_name}/{alert.instance_id} {alert.failure_type}) "
          f"as {event.acknowledged_by}; recorded as event {event.event_id}")  # fmt: skip
    return 0


async def silence(nats_url: str, app: str, duration: str, reason: str, instance: str = "", by: str | None = None,
                  maintenance: bool = False) -> int:  # fmt: skip
    for what, value in (("--app", app), ("--instance", instance or "x")):
        if not is_valid_name(value):
            print(f"autoserve alerts silence: {what} {value!r} is not a name of [A-Za-z0-9_-]", file=sys.stderr)
            return EXIT_USAGE
    try:
        seconds = parse_duration(duration)
    except ValueError as exc:
        print(f"autoserve alerts silence: --for {exc}", file=sys.stderr)
        return EXIT_USAGE
    if seconds <= 0 or not reason.strip():
        print("autoserve alerts silence: --for must be more than 0 and --reason must say why", file=sys.stderr)
        return EXIT_USAGE
    now = time.time()
    silence_id = uuid.uuid4().hex[:16]
    event = SilenceCreated(event_id=derived_event_id("silence", silence_id), silence_id=silence_id, app_name=app,
                           instance_id=instance, starts_at=now, ends_at=now + seconds, created_by=by or _who(),
                           reason=reason, timestamp=now, maintenance=maintenance)  # fmt: skip
    nc = await connect(nats_url, "autoserve-alerts-cli", timeout=10)
    try:
        js = nc.jetstream()
        await provision(js)
        await js.publish(subject_for(event), encode(event), headers=headers_for(event), timeout=10)
    finally:
        await nc.close()
    target = f"{app}/{instance}" if instance else app
    print(f"silenced {target} until {_when(event.ends_at)} (silence {silence_id}); recorded as event {event.event_id}")
    return 0


async def list_silences(nats_url: str) -> int:
    nc = await connect(nats_url, "autoserve-alerts-cli", timeout=10)
    try:
        _, _, silences = fold_alerts(await read_alerting(nc.jetstream()))
    finally:
        await nc.close()
    now = time.time()
    current = [s for s in silences.values() if s.ends_at > now]
    if not current:
        print("no active or pending silences")
        return 0
    print(f"{'ID':<17} {'TARGET':<24} {'FROM':<21} {'UNTIL':<21} {'BY':<28} REASON")
    for s in sorted(current, key=lambda s: s.starts_at):
        target = f"{s.app_name}/{s.instance_id}" if s.instance_id else s.app_name
        kind = " [maintenance]" if s.maintenance else ""
        print(f"{s.silence_id:<17} {target:<24} {_when(s.starts_at):<21} {_when(s.ends_at):<21} {s.created_by:<28} "
              f"{s.reason}{kind}")  # fmt: skip
    return 0
