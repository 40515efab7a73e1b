"""The decide step: from one input to the actions the action runner runs.

For a ``FailureDetected``: the app's policy (its ladder ends where the instance's runtime
does), the pure core's ``decide``; if that plans anything, the instance's lease, caught up
with what other replicas did to that instance, ``decide`` again, then each planned action
(traffic first, then one remediation) through the runner. A remediation due later
(backoff, rate limit) is the delay the work feed gives the input back with.

For a ``HealthChanged``: back into the LB, the instance if it was ejected and, when the
change puts the app into panic mode, every ejected instance. As it is folded (every
replica, live only), the change may also announce that panic.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass

import structlog

from autoserve_config import AppSpec
from autoserve_events import APPS_BUCKET, Event, FailureDetected, HealthChanged, RecoveryStrategy

from .core import AppPolicy, Limits, RecoveryState, decide, panic_announcement, panic_restores, restore_plan
from .core.strategies import DEFAULT_STRATEGY_MAP, TRAFFIC
from .leases import InstanceLeases
from .ports import KeepAlive, RecoveryError, Runtimes, SpecOf
from .runner import ActionRunner
from .settings import policy_for

log = structlog.get_logger("autoserve.recovery")
S = RecoveryStrategy

BUSY_RETRY_SECONDS = 0.25  # another replica acts on the instance: look again shortly


@dataclass(eq=False)
class Decisions:
    state: RecoveryState
    spec_of: SpecOf
    runtimes: Runtimes
    leases: InstanceLeases
    runner: ActionRunner
    limits: Limits
    announce: Callable[[Event], None]  # published without waiting
    _: KW_ONLY
    balancing: bool  # a load balancer is configured: traffic steps and restores run

    async def __call__(self, event: Event, keep_alive: KeepAlive) -> float | None:
        """The work feed's handler: None when done, else when to look at the input again."""
        if isinstance(event, FailureDetected):
            return await self.on_failure(event, keep_alive)
        if isinstance(event, HealthChanged):
            return await self.on_health(event, keep_alive)
        return None

    async def on_failure(self, failure: FailureDetected, keep_alive: KeepAlive | None = None) -> float | None:
        if failure.details.get("panic") is not None:
            return None
        app, instance = failure.app_name, failure.instance_id
        spec = self.spec_of(app)
        if spec is None:
            await self._unknown_app(failure)
            return None
        policy = policy_for(spec)
        with contextlib.suppress(RecoveryError):  # the escalation ends where the instance's runtime does
            policy = policy.for_runtime(self.runtimes.runtime_for(app, instance, spec))
        # A container recovery created belongs to the slot it replaced, even before the
        # action that created it is recorded (a replacement that crashes while awaited).
        lineage = await self.runtimes.lineage(app, instance, spec)
        if lineage and lineage != instance:
            self.state.aliases.setdefault((app, instance), lineage)
        plan = decide(self.state, failure, policy, self.limits, time.time())
        if plan.empty:
            if plan.notes:
                log.debug("no action", app=app, instance=instance, notes=plan.notes)
            return None
        async with self.leases.hold(app, instance, failure.event_id) as held:
            if held is None:
                return BUSY_RETRY_SECONDS
            plan = decide(self.state, failure, policy, self.limits, time.time())  # on what was done meanwhile
            for note in plan.notes:
                log.debug("recovery bounded", app=app, instance=instance, note=note)
            async with self.leases.renewing(held, keep_alive):
                for strategy in plan.traffic if self.balancing else ():
                    await self.runner.act(failure, strategy, policy, spec)
                if plan.remediation is not None:
                    await self.runner.act(failure, plan.remediation, policy, spec)
        return max(0.05, plan.retry_at - time.time()) if plan.retry_at is not None else None

    async def on_health(self, event: HealthChanged, keep_alive: KeepAlive | None = None) -> float | None:
        spec = self.spec_of(event.app_name)
        if spec is None or not self.balancing:
            return None
        policy = policy_for(spec)
        targets = list(panic_restores(self.state, event, policy))
        if restore_plan(self.state, event) and event.instance_id not in targets:
            targets.insert(0, event.instance_id)

        def why(target: str) -> dict[str, object] | None:
            if target == event.instance_id and restore_plan(self.state, event):
                return {}
            return {"panic": True} if target in panic_restores(self.state, event, policy) else None

        for target in targets:
            if not await self.restore(event, spec, target, lambda t=target: why(t), keep_alive):
                return BUSY_RETRY_SECONDS  # the restores left are done on redelivery
        return None

    async def restore_left_out(self, cause: FailureDetected, spec: AppSpec, instance: str) -> bool:
        """A member a failed rolling restart left out of the LB, back in once it answers."""
        after = {"after": str(S.ROLLING_RESTART)}
        return await self.restore(
            cause, spec, instance, lambda: after if self.state.instance(cause.app_name, instance).ejected else None
        )

    async def restore(
        self,
        cause: FailureDetected | HealthChanged,
        spec: AppSpec,
        target: str,
        still: Callable[[], dict[str, object] | None],
        keep_alive: KeepAlive | None = None,
    ) -> bool:
        """``target`` back into the LB under its lease, if ``still`` wanted once caught up
        (it says with which details); False if another replica holds the lease."""
        async with self.leases.hold(cause.app_name, target, cause.event_id) as held:
            if held is None:
                return False
            if (extra := still()) is not None:
                async with self.leases.renewing(held, keep_alive):
                    await self.runner.act(cause, S.REMOVE_FROM_LB, policy_for(spec), spec, operation="restore",
                                           target=target, extra=extra)  # fmt: skip
        return True

    def announce_panic(self, event: HealthChanged) -> None:
        """The state fold's hook: a health change that puts the app into panic mode (or
        out of it) is announced; every replica sends the same id, JetStream keeps one."""
        spec = self.spec_of(event.app_name)
        if spec is None:
            return
        announcement = panic_announcement(self.state, event, policy_for(spec))
        if announcement is not None:
            self.state.panic_announced[event.app_name] = bool(announcement.details["panic"])
            log.warning("panic mode", app=event.app_name, **announcement.details)
            self.announce(announcement)

    async def _unknown_app(self, failure: FailureDetected) -> None:
        if self.state.handled(failure.event_id):
            return
        listed = DEFAULT_STRATEGY_MAP.get(failure.failure_type, (S.RESTART_CONTAINER,))
        strategy = next((s for s in listed if s not in TRAFFIC), listed[0])
        error = f"unknown app {failure.app_name!r}: not in the {APPS_BUCKET} bucket; nothing to act on"
        await self.runner.refuse(failure, strategy, AppPolicy(), error)
