"""One worker per target, as kubelet's prober manager keeps one per probe key.

``apply`` reconciles the running workers with the desired targets: new targets get a
worker, removed ones are stopped, changed ones are restarted with the new spec (keeping
their phase, since the phase comes from the key).

A probe round waits for the publisher's room before it starts: while JetStream stores
nothing (a cluster without a stream leader, NATS away) the prober stops probing rather
than pile up results (the publisher never drops one). The rounds that waited, and for how
long, are counted; slots that passed meanwhile are counted as missed, never fired as a
burst. The publisher logs each stall once.

With ``owns``, a worker asks before each probe whether its target is still this member's:
a member resumed after its lease lapsed skips the slot instead of probing beside its
successor, until the change that stops the worker arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from autoserve_events import ProbeCompleted
from autoserve_probes import Target, TargetKey

from .core.schedule import after_takeover, aligned_due, catch_up_due, next_due, on_tick
from .core.targets import TargetChanges, diff, target_name

log = structlog.get_logger("autoserve.prober")

ProbeFn = Callable[[Target, float | None], Awaitable[ProbeCompleted]]
PublishFn = Callable[[ProbeCompleted], None]


class Room(Protocol):
    """The publisher's backpressure (``EventPublisher``)."""

    @property
    def full(self) -> bool: ...

    async def room(self) -> None:
        """Return once the publisher takes more input."""


@dataclass(slots=True)
class WorkerStats:
    probes: int = 0
    missed_slots: int = 0
    room_waits: int = 0  # probe rounds that waited for the publisher's room
    room_wait_seconds: float = 0.0
    not_owned: int = 0  # slots skipped: the target was not this member's when it was due


class ProbeWorkers:
    def __init__(
        self,
        probe: ProbeFn,
        publish: PublishFn,
        *,
        max_in_flight: int = 256,
        room: Room | None = None,
        owns: Callable[[TargetKey], bool] | None = None,
    ) -> None:
        self._probe = probe
        self._owns = owns
        self._room = room
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._publish = publish
        self._targets: dict[TargetKey, Target] = {}
        self._tasks: dict[TargetKey, asyncio.Task[None]] = {}
        self._closed = False
        self.stats = WorkerStats()

    @property
    def targets(self) -> Mapping[TargetKey, Target]:
        return self._targets

    def apply(
        self,
        desired: Mapping[TargetKey, Target],
        appeared_at: Mapping[TargetKey, float] | None = None,
        since: Mapping[TargetKey, float] | None = None,
    ) -> TargetChanges:
        """Start, stop and restart workers. ``appeared_at`` gives, for new targets, the
        wall time their instance appeared, from which ``initial_delay_seconds`` counts;
        ``since``, for targets taken over from another member, the wall time from which
        their slots were nobody's: a slot missed since then is caught up at once."""
        if self._closed:  # stopping: a late ownership change starts nothing
            desired = {}
        changes = diff(self._targets, desired)
        for key in changes.removed:
            self._stop(key)
            del self._targets[key]
        for target in changes.changed:
            self._stop(target.key)
            self._start(target, None)
        for target in changes.added:
            self._start(target, (appeared_at or {}).get(target.key), (since or {}).get(target.key))
        if changes:
            log.info(
                "targets changed",
                added=len(changes.added),
                removed=len(changes.removed),
                changed=len(changes.changed),
                taken_over=sum(t.key in (since or {}) for t in changes.added),
                total=len(self._targets),
            )
        return changes

    async def stop_all(self) -> None:
        self._closed = True
        tasks = list(self._tasks.values())
        for key in list(self._tasks):
            self._stop(key)
        self._targets.clear()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _start(self, target: Target, appeared_at: float | None, since: float | None = None) -> None:
        self._targets[target.key] = target
        work = self._run(target, appeared_at, since)
        self._tasks[target.key] = asyncio.create_task(work, name=f"probe:{target.key}")

    def _stop(self, key: TargetKey) -> None:
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()

    async def _run(self, target: Target, appeared_at: float | None, since: float | None) -> None:
        loop = asyncio.get_running_loop()
        check, period, name = target.check, target.check.period_seconds, target_name(target.key)
        # Scheduling runs on the monotonic clock; the phase grid and events on the wall clock.
        wall_minus_mono = time.time() - loop.time()
        delay = 0.0
        if appeared_at is not None:
            delay = max(0.0, appeared_at + check.initial_delay_seconds - time.time())
        if since is None:
            first = aligned_due(time.time(), delay, period, name)
        else:  # taken over: catch up a slot that nobody probed
            first = catch_up_due(time.time(), since, period, name)
        due = on_tick(first - wall_minus_mono)
        while True:
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if self._room is not None and self._room.full:
                await self._wait_for_room(self._room, loop)
            if self._owns is None or self._owns(target.key):
                await self._probe_once(target, due + wall_minus_mono)
            else:  # not ours now (resumed past our lease; the change that stops us is on its way)
                self.stats.not_owned += 1
            if since is not None:  # the first probe of a takeover: back on the grid
                since, missed = None, 0
                due = after_takeover(first, period, name) - wall_minus_mono
            else:
                due, missed = next_due(due, period, loop.time())
            due = on_tick(due)
            self.stats.missed_slots += missed

    async def _probe_once(self, target: Target, scheduled_at: float) -> None:
        try:
            # An overloaded prober waits here, before the attempt and its timeout start:
            # it then reports lateness and skipped slots, not false timeouts.
            async with self._in_flight:
                result = await self._probe(target, scheduled_at)
        except Exception:  # a bug in a probe must not end its worker
            log.exception("probe crashed", app=target.app_name, instance=target.instance_id)
        else:
            self._publish(result)
            self.stats.probes += 1

    async def _wait_for_room(self, room: Room, loop: asyncio.AbstractEventLoop) -> None:
        started = loop.time()
        await room.room()
        self.stats.room_waits += 1
        self.stats.room_wait_seconds += loop.time() - started
