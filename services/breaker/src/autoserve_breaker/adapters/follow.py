"""Follows every breaker event in AUTOSERVE_EVENTS: the replay on start-up, then live.

An ordered consumer with ``DeliverPolicy.LAST_PER_SUBJECT`` delivers the last event of each
subject first, in stream order: each breaker's last ``BreakerStateChanged`` (a full state:
state, generation, hold, ``retry_at``) and its last ``BreakerTrialAdmitted`` (trials of the
current half-open). That is the whole fold, however long the history, then every new event.
Each is handed on with its stream sequence: a transition names its predecessor's when it is
published (``outbox.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from autoserve_events import (
    BREAKER_EVENTS_WILDCARD,
    EVENTS_STREAM,
    BreakerStateChanged,
    BreakerTrialAdmitted,
    MalformedEvent,
    decode,
)
from autoserve_runtime.feed import position

log = structlog.get_logger("autoserve.breaker.follow")

OnEvent = Callable[[BreakerStateChanged | BreakerTrialAdmitted, int], bool]


class BreakerEventFollower:
    def __init__(self, js: JetStreamContext, on_event: OnEvent) -> None:
        self._js = js
        self._on_event = on_event
        self.received = 0
        self.applied = 0
        self._sub: JetStreamContext.PushSubscription | None = None

    async def start(self, timeout: float = 60.0) -> int:
        """Subscribe and return once the stored history is folded (bounded by ``timeout``)."""
        info = await self._js.stream_info(EVENTS_STREAM, subjects_filter=BREAKER_EVENTS_WILDCARD)
        expected = len(info.state.subjects or {})
        self._sub = await self._js.subscribe(
            BREAKER_EVENTS_WILDCARD,
            stream=EVENTS_STREAM,
            cb=self._on_message,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            pending_msgs_limit=-1,
        )
        deadline = time.monotonic() + timeout
        while self.received < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"breaker history: {self.received} of {expected} subjects in {timeout:g}s")
            await asyncio.sleep(0.01)
        return expected

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_message(self, msg: Msg) -> None:
        self.received += 1
        try:
            event = decode(msg.data)
        except MalformedEvent as exc:
            log.warning("undecodable breaker event skipped", subject=msg.subject, error=str(exc))
            return
        if isinstance(event, BreakerStateChanged | BreakerTrialAdmitted) and self._on_event(event, position(msg)[0]):
            self.applied += 1
