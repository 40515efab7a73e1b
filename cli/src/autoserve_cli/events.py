"""``autoserve events [-f] [--type T] [--app A] [--instance I] [--since 10m] [--json]``:
read, or follow, the event log.

One ordered consumer per stream, filtered on the server by subject (type, app and instance
are subject tokens), so ``--app web --type ProbeCompleted`` reads only web's probes, not
the whole probe stream. Without ``-f`` it stops once it has read what was stored when it
started; with ``-f`` it goes on until Ctrl-C. Lines are in stream order; when both streams
are read, each stream's history is merged by event time.

Alerting events have a single name token in their subject (the app, or the receiver for
``NotificationLogged``), so for them ``--app`` filters on the server where the subject
carries the app, and the rest of ``--app``/``--instance`` is checked here.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from autoserve_config import parse_duration
from autoserve_events import (
    EVENT_TYPES,
    EVENTS_STREAM,
    PROBES_STREAM,
    AlertAcknowledged,
    AlertChanged,
    BreakerStateChanged,
    BreakerTrialAdmitted,
    ContainerObserved,
    FailureDetected,
    HealthChanged,
    MalformedEvent,
    NotificationLogged,
    ProbeCompleted,
    RecoveryExecuted,
    SilenceCreated,
    decode,
    is_valid_name,
    wildcard,
)
from autoserve_runtime import connect, subscribe_from

DEAD_LETTER = "DeadLetter"  # not an event type: a message parked by a service, with its reason
ALIASES = {
    "health": "HealthChanged",
    "failure": "FailureDetected",
    "recovery": "RecoveryExecuted",
    "breaker": "BreakerStateChanged",
    "trial": "BreakerTrialAdmitted",
    "probe": "ProbeCompleted",
    "container": "ContainerObserved",
    "alert": "AlertChanged",
    "ack": "AlertAcknowledged",
    "silence": "SilenceCreated",
    "nflog": "NotificationLogged",
    "deadletter": DEAD_LETTER,
}
# Alerting subjects: one name token, the app's ("{app}"), or the receiver's for the log.
ALERTING_SUBJECTS = {
    "AlertChanged": "autoserve.event.alert.{app}",
    "AlertAcknowledged": "autoserve.event.alert.ack.{app}",
    "SilenceCreated": "autoserve.event.alert.silence.{app}",
    "NotificationLogged": "autoserve.event.alert.nflog.*",
}
# The audit trail: what ``autoserve events`` shows without ``--type``.
DEFAULT_TYPES = ("HealthChanged", "FailureDetected", "RecoveryExecuted", "BreakerStateChanged", "BreakerTrialAdmitted")


class UsageError(ValueError):
    pass


def parse_types(values: Iterable[str] | None) -> tuple[str, ...]:
    """``--type`` values (repeatable, comma-separated, any case, or an alias) -> type names."""
    names: list[str] = []
    known = {name.lower(): name for name in [*EVENT_TYPES, DEAD_LETTER]} | ALIASES
    for value in values or ():
        for part in filter(None, (p.strip() for p in value.split(","))):
            name = known.get(part.lower())
            if name is None:
                choices = ", ".join([*EVENT_TYPES, DEAD_LETTER])
                raise UsageError(f"--type: unknown event type {part!r}; one of {choices} (or {', '.join(ALIASES)})")
            if name not in names:
                names.append(name)
    return tuple(names) or DEFAULT_TYPES


def parse_since(text: str | None, now: float) -> float | None:
    """``--since`` in the config's duration syntax (``90s``, ``10m``, ``1h30m``; a bare
    number is seconds) -> the epoch time to start at."""
    if text is None:
        return None
    try:
        return now - parse_duration(text)
    except ValueError:
        raise UsageError(f"--since: expected a duration such as 30s, 10m, 2h or 1d, got {text!r}") from None


def _token(value: str | None, what: str) -> str:
    if value is None:
        return "*"
    if not is_valid_name(value):
        raise UsageError(f"--{what}: {value!r} is not a valid name ([A-Za-z0-9_-])")
    return value


def filters(types: Iterable[str], app: str | None, instance: str | None) -> dict[str, list[str]]:
    """Stream name -> the filter subjects that select exactly the asked-for events."""
    a, i = _token(app, "app"), _token(instance, "instance")
    by_stream: dict[str, list[str]] = {}
    for name in types:
        if name == DEAD_LETTER:
            stream, subject = EVENTS_STREAM, "autoserve.deadletter.>"
        elif name in ALERTING_SUBJECTS:
            stream, subject = EVENTS_STREAM, ALERTING_SUBJECTS[name].format(app=a)
        else:
            kind = EVENT_TYPES[name]
            stream = PROBES_STREAM if kind in (ProbeCompleted, ContainerObserved) else EVENTS_STREAM
            subject = wildcard(kind, a, i)
        subjects = by_stream.setdefault(stream, [])
        if subject not in subjects:
            subjects.append(subject)
    return by_stream


def wanted(event: Any, app: str | None, instance: str | None) -> bool:
    """What the subject filter could not check: ``--app``/``--instance`` against the event's
    fields (alerting events). A silence without an instance covers every instance."""
    if app is not None and getattr(event, "app_name", app) != app:
        return False
    if instance is None:
        return True
    found = getattr(event, "instance_id", instance)
    return found == instance or (isinstance(event, SilenceCreated) and found == "")


# -- rendering: pure, one line per event ------------------------------------------------------


def when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}ms"


def describe(event: Any) -> str:
    """What happened, in a few words and the fields an operator looks for first."""
    if isinstance(event, HealthChanged):
        was = {None: "unknown", True: "healthy", False: "unhealthy"}[event.previous]
        now = "healthy" if event.healthy else "unhealthy"
        return f"{now} (was {was}) after {event.consecutive} consecutive: {event.reason}"
    if isinstance(event, FailureDetected):
        critical = " CRITICAL" if event.is_critical else ""
        return (f"{event.failure_type} severity={event.severity} consecutive={event.consecutive_count} "
                f"total={event.total_count}{critical}: {event.message}")  # fmt: skip
    if isinstance(event, RecoveryExecuted):
        outcome = "succeeded" if event.success else "failed"
        cause = f" for {event.failure_type}" if event.failure_type else ""
        error = f": {event.error}" if event.error else ""
        return f"{event.strategy} {outcome} in {_ms(event.duration_ms)}{cause}{error}"
    if isinstance(event, BreakerStateChanged):
        held = " (held)" if event.forced else ""
        return (f"{event.previous_state or 'none'} -> {event.state}{held}: {event.reason} "
                f"failures={event.consecutive_failures} successes={event.consecutive_successes}")  # fmt: skip
    if isinstance(event, BreakerTrialAdmitted):
        return f"trial {event.trial} admitted (generation {event.generation})"
    if isinstance(event, ProbeCompleted):
        if event.is_healthy:
            return f"{event.check_type} ok {event.status_code or ''} {_ms(event.response_time_ms)}".replace("  ", " ")
        return f"{event.check_type} failed {_ms(event.response_time_ms)}: {event.error or event.status_code}"
    if isinstance(event, ContainerObserved):
        parts = [event.event, f"container={event.container_id[:12]}"]
        for name in ("exit_code", "cpu_percent", "memory_percent", "restart_count"):
            value = getattr(event, name)
            if value is not None:
                parts.append(f"{name}={value:.1f}" if isinstance(value, float) else f"{name}={value}")
        return " ".join(parts)
    if isinstance(event, AlertChanged):
        return (f"{event.status} (was {event.previous_status or 'none'}) {event.failure_type} "
                f"severity={event.severity} alert={event.alert_id}: {event.reason}")  # fmt: skip
    if isinstance(event, AlertAcknowledged):
        return f"alert {event.alert_id} acknowledged by {event.acknowledged_by}" + (
            f": {event.comment}" if event.comment else ""
        )
    if isinstance(event, SilenceCreated):
        kind = f"maintenance window {event.window}" if event.maintenance else "silence"
        return (f"{kind} {event.silence_id} from {when(event.starts_at)} until {when(event.ends_at)} "
                f"by {event.created_by}: {event.reason}")  # fmt: skip
    if isinstance(event, NotificationLogged):
        if event.outcome == "suppressed":
            held = "; ".join(f"{alert_id} {why}" for alert_id, why in sorted(event.suppressed.items()))
            return f"suppressed for {event.receiver} tier={event.tier}: {held}"
        error = f": {event.error}" if event.error else ""
        return (f"{event.outcome} to {event.receiver} tier={event.tier} seq={event.seq} firing={len(event.firing)} "
                f"resolved={len(event.resolved)} attempts={event.attempts}{error}")  # fmt: skip
    return msgspec.json.encode(event).decode()


def event_time(event: Any) -> float:
    timestamp = getattr(event, "timestamp", None)
    return float(event.emitted_at if timestamp is None else timestamp)


def render(event: Any) -> str:
    """``2026-05-01T12:00:03.123Z  FailureDetected      web/w-1  health_check_failed ...``"""
    app = event.app_name or "*"  # a notification log entry of a group that spans apps
    where = f"{app}/{event.instance_id}" if event.instance_id else app  # alerting events may name no instance
    return f"{when(event_time(event))}  {type(event).__name__:<20} {where}  {describe(event)}"


@dataclass(frozen=True)
class DeadLetterRecord:
    """A dead letter as ``events`` shows it: the service, the reason, the original subject."""

    service: str
    reason: str
    subject: str
    stream_seq: str
    emitted_at: float
    data: str

    def line(self) -> str:
        return f"{when(self.emitted_at)}  {DEAD_LETTER:<20} {self.service}  {self.reason} (from {self.subject} #{self.stream_seq})"

    def as_json(self) -> bytes:
        return msgspec.json.encode({"type": DEAD_LETTER, **self.__dict__})


def dead_letter(msg: Msg) -> DeadLetterRecord:
    headers = msg.headers or {}
    stored = msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else time.time()
    return DeadLetterRecord(
        service=msg.subject.rsplit(".", 1)[-1],
        reason=headers.get("Autoserve-Reason", ""),
        subject=headers.get("Autoserve-Subject", ""),
        stream_seq=headers.get("Autoserve-Stream-Seq", ""),
        emitted_at=stored,
        data=msg.data[:2000].decode("utf-8", "replace"),
    )


# -- reading ----------------------------------------------------------------------------------


@dataclass(order=True)
class Line:
    at: float
    text: str


def to_line(
    msg: Msg, as_json: bool, warn: Callable[[str], None], keep: Callable[[Any], bool] | None = None
) -> Line | None:
    if msg.subject.startswith("autoserve.deadletter."):
        record = dead_letter(msg)
        return Line(record.emitted_at, record.as_json().decode() if as_json else record.line())
    try:
        event = decode(msg.data)
    except MalformedEvent as exc:
        warn(f"{msg.subject} #{msg.metadata.sequence.stream}: not an event ({exc})")
        return None
    if keep is not None and not keep(event):
        return None
    return Line(event_time(event), msgspec.json.encode(event).decode() if as_json else render(event))


async def _subscribe(
    js: JetStreamContext, stream: str, subjects: list[str], since: float | None, cb: Callable[[Msg], Any]
) -> Any:
    return await subscribe_from(js, stream, subjects, cb, since=since)


async def read_events(
    js: JetStreamContext,
    streams: dict[str, list[str]],
    *,
    since: float | None,
    follow: bool,
    as_json: bool,
    emit: Callable[[str], None],
    warn: Callable[[str], None],
    stop: asyncio.Event,
    caught_up_timeout: float = 30.0,
    keep: Callable[[Any], bool] | None = None,
) -> None:
    """History first (per stream in order, streams merged by event time), then, with
    ``follow``, every new event as it arrives until ``stop``."""
    history: dict[str, list[Line]] = {name: [] for name in streams}
    caught_up = {name: asyncio.Event() for name in streams}
    live = False
    subs = []

    def handler(stream: str) -> Callable[[Msg], Any]:
        async def on_message(msg: Msg) -> None:
            line = to_line(msg, as_json, warn, keep)
            if live:
                if line is not None:
                    emit(line.text)
                return
            if not caught_up[stream].is_set():
                if line is not None:
                    history[stream].append(line)
                if msg.metadata.num_pending == 0:
                    caught_up[stream].set()
            elif follow and line is not None:  # arrived between catching up and going live
                history[stream].append(line)

        return on_message

    try:
        for stream, subjects in streams.items():
            sub = await _subscribe(js, stream, subjects, since, handler(stream))
            subs.append(sub)
            info = await sub.consumer_info()
            if info.num_pending == 0 and not info.delivered.consumer_seq:
                caught_up[stream].set()  # nothing stored that matches
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in caught_up.values())), caught_up_timeout)
        for line in heapq.merge(*history.values()) if len(history) > 1 else next(iter(history.values()), []):
            emit(line.text)
        live = True
        if follow:
            await stop.wait()
    finally:
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def show_events(
    nats_url: str,
    *,
    follow: bool,
    types: Iterable[str] | None,
    app: str | None,
    instance: str | None,
    since: str | None,
    as_json: bool,
) -> int:
    try:
        streams = filters(parse_types(types), app, instance)
        start = parse_since(since, time.time())
    except UsageError as exc:
        print(f"autoserve events: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def emit(text: str) -> None:
        try:
            sys.stdout.write(text + "\n")
            if follow:
                sys.stdout.flush()
        except BrokenPipeError:  # `| head`: stop quietly
            stop.set()

    def warn(text: str) -> None:
        print(f"autoserve events: {text}", file=sys.stderr)

    nc = await connect(nats_url, "autoserve-events", timeout=10)
    try:
        await read_events(
            nc.jetstream(), streams, since=start, follow=follow, as_json=as_json, emit=emit, warn=warn, stop=stop,
            keep=lambda event: wanted(event, app, instance),
        )  # fmt: skip
    except TimeoutError:
        print("autoserve events: the stream did not deliver what it holds within 30s", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.flush()
        await nc.close()
    return 0
