"""Readiness (``/readyz``): every check passes.

NATS connected (``connect`` reports each client), the service's own ``ready`` event set (it
is set after replay and after its consumers are bound), every watched consumer bound, each
check the service added, and not draining (SIGTERM turns readiness off at once, before the
drain). Liveness (``/healthz``) is only the event loop answering, so it needs nothing here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .watched import WATCHED, bound, live


@dataclass
class _State:
    service: str = ""
    stopping: bool = False
    ready: list[asyncio.Event] = field(default_factory=list)
    checks: dict[str, Callable[[], bool]] = field(default_factory=dict)
    reasons: dict[str, Callable[[], str | None]] = field(default_factory=dict)


STATE = _State()


def begin(service: str, ready: asyncio.Event | None) -> None:
    """``serve()`` calls this before the service runs."""
    STATE.service = service
    STATE.stopping = False
    if ready is not None and ready not in STATE.ready:
        STATE.ready.append(ready)


def mark_stopping() -> None:
    """SIGTERM: not ready from now on, so traffic and new work go elsewhere while it drains."""
    STATE.stopping = True


def add_check(name: str, check: Callable[[], bool], reason: Callable[[], str | None] | None = None) -> None:
    """A readiness condition of the service's own (``/readyz`` lists it by name, and while it
    fails, what ``reason`` says under ``reasons``)."""
    STATE.checks[name] = check
    if reason is not None:
        STATE.reasons[name] = reason


def remove_check(name: str) -> None:
    STATE.checks.pop(name, None)
    STATE.reasons.pop(name, None)


def reasons(checks: Mapping[str, bool]) -> dict[str, str]:
    """Why each failing check fails, where the check can say."""
    said = {}
    for name, ok in checks.items():
        explain = STATE.reasons.get(name)
        if not ok and explain is not None:
            with contextlib.suppress(Exception):
                if text := explain():
                    said[name] = text
    return said


def readiness() -> dict[str, bool]:
    """Every check by name; ready when all are true."""
    checks: dict[str, bool] = {"draining": not STATE.stopping}
    clients = [nc for nc in list(WATCHED.nats.values()) if not nc.is_closed]
    if clients:
        checks["nats connected"] = all(nc.is_connected for nc in clients)
    else:  # no connection watched (yet): a service past its start-up has one, one before has not
        checks["nats connected"] = bool(STATE.ready) and all(event.is_set() for event in STATE.ready)
    for index, event in enumerate(STATE.ready):
        checks["service ready" if index == 0 else f"service ready {index}"] = event.is_set()
    for _, consumer in live(WATCHED.consumers):
        checks[f"consumer {consumer._spec.durable} bound"] = bound(consumer)
    for name, check in list(STATE.checks.items()):
        try:
            checks[name] = bool(check())
        except Exception:  # a broken check reads as not ready, never as a 500
            checks[name] = False
    return checks
