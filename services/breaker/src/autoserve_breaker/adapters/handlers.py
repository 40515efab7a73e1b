"""The breaker's NATS handlers: outcome reports in, ``allow`` and override requests answered.

None of them waits on I/O before answering: ``allow`` is a dict lookup in the core, the
reply is one of a dozen pre-encoded byte strings, and the events a decision causes are
handed to the outbox (``outbox.py``), which sends them without blocking.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from autoserve_events import (
    BREAKER_REPORT_PREFIX,
    AllowReply,
    BreakerStateChanged,
    MalformedMessage,
    OverrideReply,
    deadletter,
    decode_allow_request,
    decode_override_request,
    decode_report,
    encode_message,
    is_valid_name,
)
from autoserve_runtime import EventPublisher
from autoserve_runtime.observability import dead_lettered

from ..core.breakers import Breakers
from .outbox import Outbox

log = structlog.get_logger("autoserve.breaker")

SERVICE = "breaker"
MAX_SUBJECT_CACHE = 100_000
_REPORT_TOKENS = BREAKER_REPORT_PREFIX.count(".") + 1

# Every reply ``allow`` can give, encoded once.
_REPLIES: dict[tuple[bool, str, bool], bytes] = {
    (allow, state, known): encode_message(AllowReply(allow=allow, state=state, known=known))
    for allow in (True, False)
    for state in ("closed", "open", "half_open")
    for known in (True, False)
}


@dataclass
class HandlerStats:
    reports: int = 0
    allows: int = 0
    overrides: int = 0
    rejected: int = 0  # malformed requests answered with an error
    dead_lettered: int = 0  # malformed reports
    transitions: int = 0


class Handlers:
    def __init__(
        self,
        nc: Client,
        core: Breakers,
        publisher: EventPublisher,
        outbox: Outbox,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._nc = nc
        self._core = core
        self._publisher = publisher  # dead letters
        self._outbox = outbox  # breaker events, chained per breaker
        self._clock = clock
        self._deadletter = deadletter(SERVICE)
        self._keys: dict[str, tuple[str, str] | str] = {}  # report subject -> key, or why it is bad
        self.stats = HandlerStats()

    # -- reports: fire-and-forget, so bad ones are dead-lettered, not answered ----------

    async def on_report(self, msg: Msg) -> None:
        self.stats.reports += 1
        key = self._keys.get(msg.subject) or self._parse_subject(msg.subject)
        if isinstance(key, str):
            self._dead_letter(msg, key)
            return
        try:
            report = decode_report(msg.data)
        except MalformedMessage as exc:
            self._dead_letter(msg, str(exc))
            return
        self.publish(self._core.record(key[0], key[1], report.success, report.duration_ms, self._clock()))

    def publish(self, changes: list[BreakerStateChanged]) -> None:
        for change in changes:
            self.stats.transitions += 1
            self._outbox.submit(change)

    def _parse_subject(self, subject: str) -> tuple[str, str] | str:
        tokens = subject.split(".")
        if len(tokens) != _REPORT_TOKENS + 2:
            result: tuple[str, str] | str = f"subject {subject!r}: expected {BREAKER_REPORT_PREFIX}.<app>.<instance>"
        elif not is_valid_name(tokens[-2]):
            result = f"app_name {tokens[-2]!r} (from the subject) is not a name of [A-Za-z0-9_-]"
        elif not is_valid_name(tokens[-1]):
            result = f"instance_id {tokens[-1]!r} (from the subject) is not a name of [A-Za-z0-9_-]"
        else:
            result = (tokens[-2], tokens[-1])
        if len(self._keys) >= MAX_SUBJECT_CACHE:  # bounded whatever subjects arrive
            self._keys.clear()
        self._keys[subject] = result
        return result

    def _dead_letter(self, msg: Msg, reason: str) -> None:
        self.stats.dead_lettered += 1
        dead_lettered(SERVICE, reason)  # autoserve_dead_letters_total, as EventConsumer's are
        if self.stats.dead_lettered % 1000 == 1:
            log.warning("malformed report dead-lettered", subject=msg.subject, reason=reason[:200])
        headers = {"Autoserve-Reason": reason[:1000], "Autoserve-Subject": msg.subject[:256]}
        self._publisher.submit_raw(self._deadletter, msg.data[:4096], headers)

    # -- allow: answered from memory ----------------------------------------------------

    async def on_allow(self, msg: Msg) -> None:
        self.stats.allows += 1
        if not msg.reply:
            return  # nobody to answer
        try:
            request = decode_allow_request(msg.data)
        except MalformedMessage as exc:
            self.stats.rejected += 1
            reply = AllowReply(allow=False, state="error", known=False, error=str(exc))
            await self._nc.publish(msg.reply, encode_message(reply))
            return
        decision, events = self._core.allow(request.app_name, request.instance_id, self._clock())
        await self._nc.publish(msg.reply, _REPLIES[(decision.allow, decision.state, decision.known)])
        for event in events:
            self._outbox.submit(event)  # type: ignore[arg-type]

    # -- manual override: the owner answers once the transition is stored ---------------

    async def on_override(self, msg: Msg) -> None:
        try:
            request = decode_override_request(msg.data)
        except MalformedMessage as exc:
            self.stats.rejected += 1
            if msg.reply:
                await self._nc.publish(msg.reply, encode_message(OverrideReply(ok=False, error=str(exc))))
            return
        if not self._core.decides_overrides((request.app_name, request.instance_id)):
            return  # the owning member answers
        self.stats.overrides += 1
        changes = self._core.override(
            request.app_name, request.instance_id, request.action, self._clock(), request.requested_by, uuid.uuid4().hex
        )
        stored = [self._outbox.submit(change) for change in changes]
        done, pending = await asyncio.wait(stored, timeout=5.0)
        ok = not pending and all(f.result() for f in done)
        error = None if ok else "the transition was applied but JetStream did not confirm storing it in 5 s"
        log.info("manual override", app=request.app_name, instance=request.instance_id, action=request.action)
        if msg.reply:
            change = changes[-1]
            reply = OverrideReply(
                ok=ok, state=change.state, forced=change.forced, event_id=change.event_id, error=error
            )
            await self._nc.publish(msg.reply, encode_message(reply))

    # -- the timer (autoserve_runtime.timer) ----------------------------------------------

    def tick(self, now: float) -> float | None:
        """Open breakers half-open after ``recovery_timeout`` with no request needed; returns
        the next time one is due."""
        self.publish(self._core.tick(now))
        return self._core.next_due()
