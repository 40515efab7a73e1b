"""The rolling restart: every instance of the app, one at a time, the failing one first.

Each member: out of the LB (unless an ejection of its own has it out: its restore puts it
back), restarted, answering the app's health check again, back into the LB, then the next.
Each member other than the failing one is restarted under its own instance lease and
recorded (a ``RecoveryExecuted`` with ``details.member_of``) before the lease is released,
so its death during the restart is known as ours and not acted on again. One rolling
restart per app at a time.

A member that fails stops the roll there. If the roll took it out of the LB it stays out,
recorded as an ejection, and a watcher puts it back once it answers (while the detector
still calls it healthy, no ``HealthChanged`` would).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import KW_ONLY, dataclass, field

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_after_delay

from autoserve_config import AppSpec
from autoserve_events import FailureDetected, RecoveryStrategy
from autoserve_runtime import cancel_all

from .core import RecoveryState, left_out, rolling_member
from .leases import InstanceLeases, LeaseBusy
from .ports import (
    HealthCheck,
    LoadBalancer,
    Member,
    Outcome,
    Records,
    RecoveryError,
    Restore,
    Runtime,
    Runtimes,
    SpecOf,
)

log = structlog.get_logger("autoserve.recovery.rolling")

MIN_PACE_SECONDS = 0.5  # a left-out member is checked at the prober's pace, not faster


def time_left(deadline: float, now: float, timeout: float, member: str, restarted: list[str]) -> float:
    """What a rolling restart has left for ``member``. None left is a timeout that says
    so, instead of a step given no time failing with a misleading error of its own."""
    left = deadline - now
    if left <= 0:
        raise RecoveryError(
            f"rolling_restart: action_timeout_seconds ({timeout:g}s) ran out before {member} was restarted; "
            f"stopped there (restarted: {', '.join(restarted) or 'none'})"
        )
    return left


@dataclass
class RollingRun:
    """One rolling restart under way."""

    cause: FailureDetected
    runtime: Runtime
    spec: AppSpec
    members: dict[str, Member]
    deadline: float  # time.monotonic()
    timeout: float
    restarted: list[str] = field(default_factory=list)

    @property
    def app(self) -> str:
        return self.cause.app_name

    def left(self, member: str) -> float:
        return time_left(self.deadline, time.monotonic(), self.timeout, member, self.restarted)

    def stopped_there(self) -> str:
        return f"stopped there (restarted: {', '.join(self.restarted) or 'none'})"


@dataclass(eq=False)
class RollingRestart:
    state: RecoveryState
    runtimes: Runtimes
    lb: LoadBalancer | None
    health: HealthCheck
    leases: InstanceLeases
    records: Records
    restore: Restore
    spec_of: SpecOf
    _: KW_ONLY
    replica: str
    watch_seconds: float  # how long a left-out member is watched for
    # One rolling restart per app at a time.
    _running: dict[str, asyncio.Lock] = field(init=False, default_factory=lambda: defaultdict(asyncio.Lock))
    _watchers: set[asyncio.Task[None]] = field(init=False, default_factory=set)  # left-out members waiting to answer

    async def close(self) -> None:
        await cancel_all(list(self._watchers))

    async def __call__(self, cause: FailureDetected, runtime: Runtime, spec: AppSpec, timeout: float) -> Outcome:
        app = cause.app_name
        if self._running[app].locked():
            raise RecoveryError(f"rolling_restart: a rolling restart of {app} is already running")
        async with self._running[app]:
            # A little before the runner's own limit: a member that does not come back is
            # recorded (and left out of the LB) by us, not cut off by that cancellation.
            deadline = time.monotonic() + timeout - min(1.0, timeout / 10)
            members = {m.instance_id: m for m in await self.runtimes.members(app, spec)}
            roll = RollingRun(cause, runtime, spec, members, deadline, timeout)
            own: dict[str, object] = {}
            for member in sorted(await runtime.instances(app), key=lambda i: i != cause.instance_id):
                if self.state.is_done(cause.event_id, RecoveryStrategy.ROLLING_RESTART, member):
                    roll.restarted.append(member)  # recorded before a takeover
                    continue
                if member == cause.instance_id:  # its own lease is held already
                    own = await self._roll_one(roll, member)
                else:
                    async with self._member_lease(roll, member):
                        await self._roll_one(roll, member)
                roll.restarted.append(member)
            return Outcome({**own, "restarted": roll.restarted})

    @contextlib.asynccontextmanager
    async def _member_lease(self, roll: RollingRun, member: str) -> AsyncIterator[None]:
        """Another instance's lease, waited for (its own action may be running) within
        what is left of the roll's time."""
        busy = f"until action_timeout_seconds ({roll.timeout:g}s) ran out"
        try:
            async with self.leases.waited(roll.app, member, roll.cause.event_id, roll.left(member)):
                yield
        except LeaseBusy as exc:
            why = "was leased by another replica" if exc.by_replica else "stayed busy with another action"
            raise RecoveryError(f"rolling_restart: {member} {why} {busy}") from None

    async def _roll_one(self, roll: RollingRun, member: str) -> dict[str, object]:
        """One member. Taken out of the LB unless an ejection of its own has it out (that
        one is undone by its own restore); put back once it answers. One that fails is
        recorded, and stays out only as a recorded ejection."""
        app, timeout = roll.app, roll.timeout
        started, t0 = time.time(), time.monotonic()
        # Down in nginx without a recorded ejection is a rolling restart's mark (one that a
        # crashed replica left): ours to put back, as much as a server that is up.
        ours = self.lb is not None and self.lb.manages(app) and not self.state.instance(app, member).ejected
        marked: dict[str, object] = {}
        done: Outcome | None = None
        ran_out = f"rolling_restart: action_timeout_seconds ({timeout:g}s) ran out while restarting {member}"
        left = roll.left(member)  # (its lease took time)
        try:
            if ours:
                marked = await self._set_down(roll, member, True)
            try:
                done = await roll.runtime.restart(app, member, left)
            except Exception as exc:
                if time.monotonic() < roll.deadline:
                    raise
                raise RecoveryError(f"{ran_out} ({str(exc) or type(exc).__name__}); {roll.stopped_there()}") from None
            if time.monotonic() >= roll.deadline:  # restarted, but no time is left to see it answer
                raise RecoveryError(f"{ran_out} (before its health check); {roll.stopped_there()}")
            if member in roll.members:
                error = await self.health.answers(app, roll.members[member], roll.spec, roll.deadline)
                if error is not None:
                    raise RecoveryError(
                        f"rolling_restart: {member} does not answer its health check within action_timeout_seconds "
                        f"({timeout:g}s): {error}; {roll.stopped_there()}"
                    )
            if ours:  # a failed reload here leaves it out, recorded: the watcher tries again
                await self._set_down(roll, member, False)
        except Exception as exc:
            # Shielded: a cancellation now (the runner's timeout) must not cut the record
            # of a member left out of the LB, or nothing would ever put it back.
            await asyncio.shield(self._member_failed(roll, member, ours, marked, started, t0, done, str(exc)))
            raise
        if member != roll.cause.instance_id:
            event = rolling_member(roll.cause, member, started_at=started, duration_ms=(time.monotonic() - t0) * 1000,
                                   details={"replica": self.replica, **done.details})  # fmt: skip
            await self.records.record(event)
        return done.details

    async def _set_down(self, roll: RollingRun, member: str, down: bool) -> dict[str, object]:
        assert self.lb is not None  # only a member the roll marks ("ours") gets here
        return await self.lb.set_down(roll.app, list(roll.members.values()), member, down)

    async def _member_failed(
        self,
        roll: RollingRun,
        member: str,
        ours: bool,
        marked: dict[str, object],
        started: float,
        t0: float,
        done: Outcome | None,
        error: str,
    ) -> None:
        """A member that failed: recorded like one that succeeded (its death during the
        restart was ours), and, if we took it out of the LB, left out as a recorded
        ejection, so the normal restore puts it back when it is healthy (``restore_plan``
        on ``HealthChanged``), or, while the detector still calls it healthy (then no such
        change will come), a watcher when it answers. Never raises: the member's own error
        is what the rolling restart reports."""
        app, cause = roll.app, roll.cause
        try:
            if member != cause.instance_id:
                details = {"replica": self.replica, **(done.details if done else {})}
                await self.records.record(rolling_member(cause, member, started_at=started, details=details,
                                                          duration_ms=(time.monotonic() - t0) * 1000, error=error))  # fmt: skip
            if not ours or not marked:
                return
            details = {"replica": self.replica, **marked}
            await self.records.record(left_out(cause, member, at=time.time(), details=details, reason=error))
        except Exception as exc:  # not recorded: put it back rather than lose it out of the LB
            log.warning("rolling restart member not recorded", app=app, member=member, error=str(exc))
            if ours and marked and not self.state.instance(app, member).ejected:
                with contextlib.suppress(Exception):
                    await self._set_down(roll, member, False)
            return
        log.warning("rolling restart member left out of the LB until it answers", app=app, member=member)
        if member in roll.members and self.state.health.get(app, {}).get(member) is not False:
            task = asyncio.create_task(self._watch_left_out(cause, roll.members[member]))
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)

    async def _watch_left_out(self, cause: FailureDetected, member: Member) -> None:
        """Back into the LB once it answers its health check, for a left-out member the
        detector does not call unhealthy (no ``HealthChanged(healthy)`` will come for it).
        Ends when it is back, when the detector calls it unhealthy (its recovery restores
        it then), when something else restored it, or after ``watch_seconds``."""
        app = cause.app_name

        def pace(_: RetryCallState) -> float:
            spec = self.spec_of(app)
            return max(MIN_PACE_SECONDS, spec.health_check.period_seconds if spec else 0.0)

        retrying = AsyncRetrying(
            stop=stop_after_delay(self.watch_seconds),
            wait=pace,
            retry=retry_if_result(lambda finished: not finished),
            retry_error_callback=lambda _: None,  # watched long enough: its HealthChanged restores it
        )
        await retrying(self._look_at_left_out, cause, member)

    async def _look_at_left_out(self, cause: FailureDetected, member: Member) -> bool:
        """One look at a left-out member: True when there is no more to watch."""
        app, instance = cause.app_name, member.instance_id
        spec = self.spec_of(app)
        if spec is None or not self.state.instance(app, instance).ejected:
            return True
        if self.state.health.get(app, {}).get(instance) is False:
            return True
        try:
            return await self.health.check(app, member, spec) is None and await self.restore(cause, spec, instance)
        except Exception as exc:  # NATS away, say: look again next period
            log.warning("left-out member not restored yet", app=app, member=instance, error=str(exc))
            return False
