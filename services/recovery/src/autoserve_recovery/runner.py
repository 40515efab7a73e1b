"""The action runner: one action, at most once, recorded whatever happens.

``act`` takes the action's own claim ``f.<cause event_id>.<action>`` before anything is
done (the claim names the action and when it began); a replica that takes an expired claim
over first asks the runtime whether the action already happened (its owner died after
acting, before recording) and records it if so, instead of doing it again. Then it runs
the action within ``action_timeout_seconds`` (the runtime, the LB, or the rolling
restart), has the LB follow a membership change, and records a ``RecoveryExecuted``,
success or failure, before the claim is marked done.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from autoserve_config import AppSpec
from autoserve_events import FailureDetected, HealthChanged, RecoveryExecuted, RecoveryStrategy

from .core import AppPolicy, RecoveryState, record
from .core.strategies import TRAFFIC
from .ports import ClaimStore, Fold, HeldClaim, LoadBalancer, Outcome, Records, RecoveryError, Roll, Runtimes

log = structlog.get_logger("autoserve.recovery")
S = RecoveryStrategy
Cause = FailureDetected | HealthChanged
MEMBERSHIP = (S.RECREATE_CONTAINER, S.REPLACE_INSTANCE, S.SCALE_OUT)  # the LB's members change


def claim_key(cause: Cause, operation: str, target: str) -> str:
    """An action on another instance than the cause's (a panic restore) adds that instance."""
    return f"f.{cause.event_id}.{operation}" + (f".{target}" if target != cause.instance_id else "")


@dataclass(eq=False)
class ActionRunner:
    state: RecoveryState
    claims: ClaimStore
    runtimes: Runtimes
    lb: LoadBalancer | None
    fold: Fold
    records: Records
    replica: str
    rolling: Roll | None = None  # set by the composition root: the rolling restart acts through this runner

    async def act(
        self,
        cause: Cause,
        strategy: RecoveryStrategy,
        policy: AppPolicy,
        spec: AppSpec,
        operation: str | None = None,
        target: str | None = None,
        extra: dict[str, object] | None = None,
    ) -> RecoveryExecuted | None:
        """None when the action was done already (recorded, or its claim finished)."""
        op = operation or str(strategy)
        target = target or cause.instance_id
        if self.state.is_done(cause.event_id, op, target):
            return None
        key = claim_key(cause, op, target)
        claim = await self.claims.claim_action(key, cause.event_id, op)
        if claim is None:
            return None  # done
        started, t0 = time.time(), time.monotonic()
        details: dict[str, object] = {"replica": self.replica, **(extra or {})}
        error = None
        try:
            outcome = await self._took_effect(cause, strategy, spec, op, key, claim[1])
            if outcome is None:
                timeout = policy.recovery.action_timeout_seconds
                outcome = await asyncio.wait_for(self._execute(cause, strategy, policy, spec, op, target), timeout)
            if strategy in MEMBERSHIP:
                await self._sync_lb(cause.app_name, spec)
            details |= outcome.details
        except RecoveryError as exc:
            error = str(exc)
        except TimeoutError:
            error = f"{op} did not finish within action_timeout_seconds ({policy.recovery.action_timeout_seconds:g}s)"
        except Exception as exc:  # an adapter's surprise is a failed action, not a dead service
            error = f"{type(exc).__name__}: {exc}"
        event = record(self.state, policy, cause, strategy, success=error is None, started_at=started,
                       duration_ms=(time.monotonic() - t0) * 1000, error=error, details=details,
                       operation=operation, instance_id=target)  # fmt: skip
        await self.records.record(event)
        await self.claims.finish(key, cause.event_id)
        log.info("recovery executed", app=cause.app_name, instance=event.instance_id, strategy=op,
                 success=event.success, ms=event.duration_ms, error=error)  # fmt: skip
        return event

    async def refuse(self, failure: FailureDetected, strategy: RecoveryStrategy, policy: AppPolicy, error: str) -> None:
        """An action that cannot be tried (its app is unknown): recorded as failed, once."""
        key = claim_key(failure, str(strategy), failure.instance_id)
        if await self.claims.claim_action(key, failure.event_id, str(strategy)) is None:
            return  # a copy of this failure was answered
        event = record(self.state, policy, failure, strategy, success=False, started_at=time.time(),
                       duration_ms=0.0, error=error)  # fmt: skip
        log.warning("recovery failed", app=failure.app_name, instance=failure.instance_id, error=error)
        await self.records.record(event)
        await self.claims.finish(key, failure.event_id)

    async def _took_effect(
        self, cause: Cause, strategy: RecoveryStrategy, spec: AppSpec, op: str, key: str, held: HeldClaim | None
    ) -> Outcome | None:
        """A claim taken over from a replica that began this very action: what it did, if
        the runtime shows it happened; None to do it (again)."""
        if held is None or held.action != op or strategy in TRAFFIC:
            return None
        app, instance = cause.app_name, cause.instance_id
        lineage = self.state.instance(app, instance).lineage
        try:
            runtime = self.runtimes.runtime_for(app, instance, spec)
            outcome = await runtime.took_effect(app, instance, lineage, str(strategy), held.since, cause.event_id)
        except Exception as exc:  # cannot tell: the action runs (again)
            log.warning("could not check a taken-over action", strategy=str(strategy), error=str(exc))
            return None
        if outcome is not None:
            log.warning("action already done by a crashed replica; recorded, not repeated", key=key,
                        crashed=held.owner, since=held.since)  # fmt: skip
            outcome.details |= {"taken_over_from": held.owner, "already_done": True}
        return outcome

    async def _sync_lb(self, app_name: str, spec: AppSpec) -> None:
        """The upstream follows the members: a recreated, replacing or added container in,
        a removed one out (marks of the others kept)."""
        if self.lb is None or not self.lb.manages(app_name):
            return
        try:
            await self.lb.set_down(app_name, await self.runtimes.members(app_name, spec), None, False)
        except RecoveryError as exc:
            log.warning("upstream not updated after a membership change", app=app_name, error=str(exc))

    async def _execute(
        self, cause: Cause, strategy: RecoveryStrategy, policy: AppPolicy, spec: AppSpec, op: str, instance: str
    ) -> Outcome:
        app = cause.app_name
        timeout = policy.recovery.action_timeout_seconds
        if strategy in TRAFFIC:
            if self.lb is None:
                raise RecoveryError("no load balancer configured (AUTOSERVE_NGINX_UPSTREAM_DIR)")
            members = await self.runtimes.members(app, spec)
            details = await self.lb.set_down(app, members, instance, op != "restore")
            if strategy is S.DRAIN_INSTANCE:
                await asyncio.sleep(policy.recovery.drain_seconds)  # in-flight requests finish
                stopped = await self.runtimes.runtime_for(app, instance, spec).stop(app, instance, timeout)
                details |= stopped.details
            return Outcome(details)
        runtime = self.runtimes.runtime_for(app, instance, spec)
        if strategy is S.RESTART_CONTAINER:
            return await runtime.restart(app, instance, timeout)
        if strategy is S.RECREATE_CONTAINER:
            return await runtime.recreate(app, instance, timeout)
        if strategy is S.REPLACE_INSTANCE:
            return await runtime.replace(app, instance, timeout, self.fold.await_healthy, cause.event_id)
        if strategy is S.SCALE_OUT:
            return await runtime.scale_out(app, instance, policy.max_replicas, timeout, cause.event_id)
        if strategy is S.ROLLING_RESTART and isinstance(cause, FailureDetected) and self.rolling is not None:
            return await self.rolling(cause, runtime, spec, timeout)
        raise RecoveryError(f"strategy {strategy} is not implemented by the recovery service")
