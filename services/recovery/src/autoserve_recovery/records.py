"""The record step: every action tried becomes a ``RecoveryExecuted`` stored in JetStream
before its input is acknowledged, and is folded here at once (the state feed brings it
again; the fold drops an id it has seen). Also where the last record of an instance is
found: a replica that takes an instance's lease catches up with it first."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from autoserve_events import EVENTS_STREAM, Event, RecoveryExecuted, subject

from .core import RecoveryState
from .ports import RecoveryError, WorkCounts

Submit = Callable[..., "asyncio.Future[bool] | None"]  # EventPublisher.submit, counted by type


@dataclass(eq=False)
class StreamRecords:
    js: JetStreamContext
    submit: Submit
    state: RecoveryState
    counts: WorkCounts
    executed: list[RecoveryExecuted] = field(init=False, default_factory=list)  # what this replica did (tests, logs)

    async def publish(self, event: Event) -> None:
        self.counts.stats.outputs += 1
        stored = await self.submit(event, track=True)  # type: ignore[misc]
        if not stored:
            raise RecoveryError(f"could not store {type(event).__name__} {event.event_id}")

    def announce(self, event: Event) -> None:
        """Published without waiting (a panic announcement: every replica sends the same id)."""
        self.submit(event)

    async def record(self, event: RecoveryExecuted) -> None:
        await self.publish(event)
        self.state.apply(event)
        self.executed.append(event)

    async def last_seq(self, app_name: str, *instance_ids: str) -> int:
        seqs = [0]
        for instance_id in dict.fromkeys(instance_ids):
            with contextlib.suppress(NotFoundError):
                last = await self.js.get_last_msg(EVENTS_STREAM, subject(RecoveryExecuted, app_name, instance_id))
                seqs.append(last.seq)
        return max(seqs)
