"""The decide step and the action runner (claims, execute, took-effect, record), with
in-memory fakes of the claims, the runtime, the load balancer and the record step. Each
test is a sequence of inputs and what was recorded for each: at most once per failure and
action, whatever is delivered twice, fails, hangs, or was begun by a replica that died."""

from __future__ import annotations

import asyncio
import time

import pytest

from autoserve_events import Event, FailureDetected, FailureType, HealthChanged
from autoserve_recovery.core import Limits
from autoserve_recovery.decisions import BUSY_RETRY_SECONDS, Decisions
from autoserve_recovery.ports import ClaimHeld, Outcome, RecoveryError
from autoserve_recovery.runner import ActionRunner

from .recovery_fakes import REPLICA, FakeParts, failure, health

F = FailureType
OK = True


class Box(FakeParts):
    """The decide step and the runner over fakes, for one app ``web``."""

    def __init__(self, *instances: str, lb: bool = True, lease_seconds: float = 15.0, **recovery: object) -> None:
        super().__init__(*instances, lb=lb, lease_seconds=lease_seconds, **recovery)
        self.runner = ActionRunner(self.state, self.claims, self.runtimes, self.lb, self.fold, self.records, REPLICA)
        self.decisions = Decisions(self.state, self.apps.get, self.runtimes, self.leases, self.runner, Limits(),
                                   self.records.announce, balancing=lb)  # fmt: skip
        self.kept_alive = 0

    def fold_in(self, *events: Event) -> None:
        """What the state feed brings: folded, and a health change told to the decide step."""
        for event in events:
            self.state.apply(event)
            if isinstance(event, HealthChanged):
                self.decisions.announce_panic(event)

    async def keep_alive(self) -> None:
        self.kept_alive += 1

    async def handle(self, event: FailureDetected | HealthChanged) -> float | None:
        """As the work feed hands an input over: None is acknowledged, else its delay."""
        return await self.decisions(event, self.keep_alive)


def all_healthy(*instances: str) -> list[HealthChanged]:
    return [health(i, True, at=time.time() - 60) for i in instances]


async def test_a_failure_is_acted_on_once_and_recorded() -> None:
    box = Box("web-1", "web-2")
    stopped = failure("web-1", F.CONTAINER_STOPPED)
    assert await box.handle(stopped) is None
    assert await box.handle(stopped) is None  # delivered again: recorded already, nothing done
    assert box.records.done() == [("restart_container", "web-1", OK)]
    assert box.runtime.calls == [("restart", "web-1")]
    (event,) = box.records.executed
    assert (event.failure_event_id, event.details["replica"], event.details["restart"]) == (
        stopped.event_id, REPLICA, "web-1")  # fmt: skip
    assert box.claims.finished(f"f.{stopped.event_id}.restart_container")
    assert box.claims.finished("i.web.web-1")


async def test_a_probe_failure_ejects_then_remediates_and_a_return_to_health_restores() -> None:
    box = Box("web-1", "web-2", "web-3")
    box.fold_in(*all_healthy("web-1", "web-2", "web-3"))
    failed = failure("web-1", F.HEALTH_CHECK_FAILED)
    box.fold_in(health("web-1", False))
    assert await box.handle(failed) is None
    assert box.records.done() == [("remove_from_lb", "web-1", OK), ("restart_container", "web-1", OK)]
    assert box.lb.down == {"web-1"}
    back = health("web-1", True)
    box.fold_in(back)
    assert await box.handle(back) is None
    assert box.records.done()[-1] == ("restore", "web-1", OK)
    assert box.records.executed[-1].failure_event_id == back.event_id
    assert box.lb.down == set()
    assert await box.handle(back) is None  # again: restored already
    assert len(box.records.executed) == 3


async def test_without_a_load_balancer_only_the_remediation_runs() -> None:
    box = Box("web-1", "web-2", lb=False)
    box.fold_in(*all_healthy("web-1", "web-2"))
    await box.handle(failure("web-1", F.HEALTH_CHECK_FAILED))
    assert box.records.done() == [("restart_container", "web-1", OK)]
    back = health("web-1", True)
    box.fold_in(back)
    assert await box.handle(back) is None and len(box.records.executed) == 1


@pytest.mark.parametrize(
    ("error", "delay", "recorded"),
    [
        (RecoveryError("no such container: web-1"), 0, "no such container: web-1"),
        (OSError("socket gone"), 0, "OSError: socket gone"),
        (None, 5.0, "restart_container did not finish within action_timeout_seconds (0.1s)"),
    ],
)
async def test_a_failed_or_hung_action_is_recorded_as_failed(
    error: Exception | None, delay: float, recorded: str
) -> None:
    box = Box("web-1", action_timeout_seconds=0.1)
    if error is not None:
        box.runtime.errors["web-1"] = error
    box.runtime.delays["web-1"] = delay
    stopped = failure("web-1")
    assert await box.handle(stopped) is None
    (event,) = box.records.executed
    assert (event.success, event.error) == (False, recorded)
    assert box.claims.finished(f"f.{stopped.event_id}.restart_container")  # tried: never again


async def test_an_action_a_crashed_replica_began_is_recorded_not_repeated() -> None:
    """The claim names the action and when it began; the runtime says it happened."""
    box = Box("web-1")
    stopped = failure("web-1")
    box.claims.hold(f"f.{stopped.event_id}.restart_container", "r0", action="restart_container", since=1.0,
                    expired=True)  # fmt: skip
    box.runtime.done_before = Outcome({"effective_at": 2.0})
    await box.handle(stopped)
    assert box.runtime.calls == [("took_effect", "web-1")]  # asked, not restarted again
    (event,) = box.records.executed
    assert event.success and event.details | {"replica": REPLICA} == event.details
    assert (event.details["already_done"], event.details["taken_over_from"]) == (True, "r0")


async def test_an_action_a_crashed_replica_claimed_but_never_did_is_done() -> None:
    box = Box("web-1")
    stopped = failure("web-1")
    box.claims.hold(f"f.{stopped.event_id}.restart_container", "r0", action="restart_container", expired=True)
    await box.handle(stopped)
    assert box.runtime.calls == [("took_effect", "web-1"), ("restart", "web-1")]
    assert "already_done" not in box.records.executed[0].details


async def test_an_action_claim_another_replica_still_holds_gives_the_input_back() -> None:
    """Its owner lost the instance lease but not yet the action claim: not dropped (the work
    feed gives the input back until the claim runs out), and our instance lease is let go."""
    box = Box("web-1")
    stopped = failure("web-1")
    box.claims.hold(f"f.{stopped.event_id}.restart_container", "r2", action="restart_container")
    with pytest.raises(ClaimHeld):
        await box.handle(stopped)
    assert box.records.executed == [] and box.runtime.calls == []
    assert box.claims.finished("i.web.web-1")


async def test_an_instance_another_replica_leases_is_looked_at_again_shortly() -> None:
    box = Box("web-1")
    box.claims.hold("i.web.web-1", "r2")
    assert await box.handle(failure("web-1")) == BUSY_RETRY_SECONDS
    assert box.records.executed == [] and box.runtime.calls == []


async def test_backoff_defers_the_next_remediation_to_when_it_is_due() -> None:
    box = Box("web-1")
    assert await box.handle(failure("web-1")) is None
    delay = await box.handle(failure("web-1"))  # died again right after its restart
    assert delay is not None and 9.0 < delay <= 10.0  # backoff_initial_seconds
    assert len(box.records.executed) == 1


async def test_an_unknown_app_is_answered_once_with_a_failed_record() -> None:
    box = Box("web-1")
    lost = failure("api-1", app="api")
    assert await box.handle(lost) is None
    assert await box.handle(lost) is None
    (event,) = box.records.executed
    assert not event.success and event.error.startswith("unknown app 'api'")
    assert box.runtime.calls == []


async def test_an_instance_without_a_runtime_is_recorded_as_failed() -> None:
    box = Box("web-1")
    box.runner.runtimes.runtime = None  # type: ignore[attr-defined]
    await box.handle(failure("web-1"))
    assert box.records.executed[0].error == "instance 'web-1' of 'web' has no runtime"


async def test_a_membership_change_has_the_load_balancer_follow_the_members() -> None:
    box = Box("web-1", strategies={"container_stopped": ["scale_out"]}, escalate=False)
    await box.handle(failure("web-1"))
    assert box.records.done() == [("scale_out", "web-1", OK)]
    assert box.lb.log == [(None, False)]  # rewritten from the members, no mark changed
    assert box.lb.members == ["web-1"]


async def test_a_drain_marks_down_waits_then_stops_before_the_restart() -> None:
    box = Box("web-1", "web-2", "web-3", drain_seconds=0,
              strategies={"health_check_failed": ["drain_instance", "restart_container"]})  # fmt: skip
    box.fold_in(*all_healthy("web-1", "web-2", "web-3"))
    await box.handle(failure("web-1", F.HEALTH_CHECK_FAILED))
    assert box.records.done() == [("drain_instance", "web-1", OK), ("restart_container", "web-1", OK)]
    assert box.runtime.calls == [("stop", "web-1"), ("restart", "web-1")]


async def test_panic_is_announced_once_and_the_ejected_go_back_in() -> None:
    box = Box("web-1", "web-2", "web-3", "web-4")
    box.fold_in(*all_healthy("web-1", "web-2", "web-3", "web-4"), health("web-1", False))
    await box.handle(failure("web-1", F.HEALTH_CHECK_FAILED))
    assert box.lb.down == {"web-1"}
    box.fold_in(health("web-2", False))
    assert box.records.announced == []  # 2 of 4 unhealthy: not over 50 %
    tipping = health("web-3", False)
    box.fold_in(tipping)
    (announcement,) = box.records.announced
    assert announcement.details["panic"] is True and announcement.cause_event_id == tipping.event_id
    assert await box.handle(tipping) is None
    assert box.records.done()[-1] == ("restore", "web-1", OK)
    assert box.records.executed[-1].details["panic"] is True and box.lb.down == set()
    box.fold_in(health("web-4", False))  # still in panic: not announced again
    assert len(box.records.announced) == 1


async def test_the_lease_and_the_input_are_kept_alive_while_an_action_runs() -> None:
    box = Box("web-1", lease_seconds=0.03)
    box.runtime.delays["web-1"] = 0.1
    await box.handle(failure("web-1"))
    assert ("renew", "i.web.web-1") in box.claims.log
    assert box.kept_alive >= 2


async def test_an_action_whose_record_is_not_stored_stays_claimed_for_a_successor() -> None:
    """No record, no finished claim: whoever gets the input again asks the runtime first."""
    box = Box("web-1")
    box.records.failing = True
    stopped = failure("web-1")
    with pytest.raises(RecoveryError, match="could not store RecoveryExecuted"):
        await box.handle(stopped)
    assert not box.claims.finished(f"f.{stopped.event_id}.restart_container")
    assert box.claims.finished("i.web.web-1")


async def test_one_instance_at_a_time_within_a_replica() -> None:
    """Two failures of one instance handled at once: the second waits for the first's lease
    and then decides again on what the first did (its failure is older than that restart),
    instead of restarting it twice."""
    box = Box("web-1")
    box.runtime.delays["web-1"] = 0.05
    first, second = failure("web-1"), failure("web-1")
    delays = await asyncio.gather(box.handle(first), box.handle(second))
    assert box.runtime.calls == [("restart", "web-1")]
    assert delays == [None, None] and len(box.records.executed) == 1
