"""The rolling restart with in-memory fakes of the runtime, the load balancer, the app's
health check, the claims and the record step: the order it goes in, what it records, where
it stops, and what it leaves out of the LB (and puts back) when a member does not answer.
The real-engine version is tests/integration/test_recovery_rolling.py."""

from __future__ import annotations

import asyncio

import pytest

from autoserve_config import AppSpec
from autoserve_events import FailureDetected, FailureType, RecoveryStrategy
from autoserve_recovery.core import rolling_member
from autoserve_recovery.ports import Outcome, RecoveryError
from autoserve_recovery.rolling import RollingRestart

from ..support.waiting import wait_for
from .recovery_fakes import REPLICA, FakeHealth, FakeParts, failure, health

S = RecoveryStrategy
MEMBERS = ("web-1", "web-2", "web-3")


class RollBox(FakeParts):
    def __init__(self, *instances: str, lb: bool = True) -> None:
        super().__init__(*instances, lb=lb)
        self.health = FakeHealth()
        self.restored: list[str] = []
        self.rolling = RollingRestart(self.state, self.runtimes, self.lb, self.health, self.leases, self.records,
                                      self.restore, self.apps.get, replica=REPLICA, watch_seconds=5.0)  # fmt: skip

    async def restore(self, cause: FailureDetected, app: AppSpec, instance: str) -> bool:
        """The decide step's restore, as the rolling restart's watcher calls it."""
        self.restored.append(instance)
        return True

    async def roll(self, cause: FailureDetected, timeout: float = 5.0) -> Outcome:
        return await self.rolling(cause, self.runtime, self.apps["web"], timeout)

    def members_recorded(self) -> list[tuple[str, bool, str | None]]:
        return [(e.instance_id, e.success, e.details.get("member_of")) for e in self.records.executed
                if e.strategy is S.ROLLING_RESTART]  # fmt: skip


def loop_failure(instance: str = "web-2") -> FailureDetected:
    return failure(instance, FailureType.HEALTH_CHECK_FAILED)


async def test_every_member_one_at_a_time_the_failing_one_first() -> None:
    box = RollBox(*MEMBERS)
    outcome = await box.roll(loop_failure("web-2"))
    assert outcome.details["restarted"] == ["web-2", "web-1", "web-3"]
    assert box.runtime.calls == [("restart", "web-2"), ("restart", "web-1"), ("restart", "web-3")]
    # Each out of the LB, restarted, answering, back in, before the next one.
    assert box.lb.log == [("web-2", True), ("web-2", False), ("web-1", True), ("web-1", False),
                          ("web-3", True), ("web-3", False)]  # fmt: skip
    assert box.health.checked == ["web-2", "web-1", "web-3"]
    assert box.lb.down == set()
    # The others under their own lease, each recorded (as ours) before it is let go; the
    # failing one's own record is the runner's.
    assert box.members_recorded() == [("web-1", True, "web-2"), ("web-3", True, "web-2")]
    for member in ("web-1", "web-3"):
        assert box.claims.log.index(("acquire", f"i.web.{member}")) < box.claims.log.index(
            ("finish", f"i.web.{member}")
        )
    assert ("acquire", "i.web.web-2") not in box.claims.log  # the runner holds that one


async def test_a_member_that_does_not_answer_stops_the_roll_and_stays_out_until_it_does() -> None:
    box = RollBox(*MEMBERS)
    box.health.failing = {"web-1"}
    cause = loop_failure("web-2")
    with pytest.raises(RecoveryError) as raised:
        await box.roll(cause)
    assert str(raised.value) == (
        "rolling_restart: web-1 does not answer its health check within action_timeout_seconds (5s): "
        "Unexpected status code: 503; stopped there (restarted: web-2)"
    )
    assert ("restart", "web-3") not in box.runtime.calls
    assert box.members_recorded() == [("web-1", False, "web-2")]
    left = box.records.executed[-1]
    assert (left.strategy, left.instance_id, left.details["left_out_by"]) == (
        S.REMOVE_FROM_LB,
        "web-1",
        "rolling_restart",
    )
    assert box.lb.down == {"web-1"} and box.state.instance("web", "web-1").ejected
    # The detector still calls it healthy, so no HealthChanged will restore it: the watcher does.
    box.health.failing.clear()
    await wait_for(lambda: box.restored == ["web-1"])
    await box.rolling.close()


async def test_a_member_the_detector_calls_unhealthy_is_left_to_its_own_recovery() -> None:
    box = RollBox(*MEMBERS)
    box.state.apply(health("web-1", False))
    box.health.failing = {"web-1"}
    with pytest.raises(RecoveryError):
        await box.roll(loop_failure("web-2"))
    assert box.lb.down == {"web-1"}
    await asyncio.sleep(0.05)
    assert box.restored == [] and not box.rolling._watchers  # its HealthChanged(healthy) restores it


async def test_a_member_not_recorded_is_put_back_rather_than_lost_out_of_the_lb() -> None:
    box = RollBox(*MEMBERS)
    box.health.failing = {"web-1"}
    box.records.failing = True  # NATS away: neither the member nor its ejection is stored
    with pytest.raises(RecoveryError, match="does not answer"):
        await box.roll(loop_failure("web-2"))
    assert box.lb.down == set() and not box.state.instance("web", "web-1").ejected


@pytest.mark.parametrize(("freed_after", "restarted"), [(None, False), (0.1, True)])
async def test_a_member_another_replica_leases_is_waited_for_within_the_time_left(
    freed_after: float | None, restarted: bool
) -> None:
    box = RollBox(*MEMBERS)
    box.claims.hold("i.web.web-1", "r2")  # its own action runs there
    if freed_after is not None:
        asyncio.get_running_loop().call_later(freed_after, box.claims.leases.pop, "i.web.web-1")
    cause = loop_failure("web-2")
    if restarted:
        assert (await box.roll(cause, timeout=2.0)).details["restarted"] == ["web-2", "web-1", "web-3"]
        return
    with pytest.raises(RecoveryError) as raised:
        await box.roll(cause, timeout=0.5)
    assert str(raised.value) == (
        "rolling_restart: web-1 was leased by another replica until action_timeout_seconds (0.5s) ran out"
    )
    assert box.runtime.calls == [("restart", "web-2")]


async def test_running_out_of_time_while_restarting_a_member_says_so() -> None:
    box = RollBox(*MEMBERS)
    box.runtime.delays["web-1"] = 5.0
    with pytest.raises(RecoveryError) as raised:
        await box.roll(loop_failure("web-2"), timeout=0.5)
    assert str(raised.value) == (
        "rolling_restart: action_timeout_seconds (0.5s) ran out while restarting web-1 (TimeoutError); "
        "stopped there (restarted: web-2)"
    )
    assert box.lb.down == {"web-1"}  # left out, recorded as an ejection
    assert box.members_recorded() == [("web-1", False, "web-2")]
    await box.rolling.close()


async def test_one_rolling_restart_per_app_at_a_time() -> None:
    box = RollBox(*MEMBERS)
    box.runtime.delays["web-2"] = 0.1
    first = asyncio.create_task(box.roll(loop_failure("web-2")))
    await asyncio.sleep(0.02)
    with pytest.raises(RecoveryError, match="a rolling restart of web is already running"):
        await box.roll(loop_failure("web-3"))
    await first


async def test_members_recorded_before_a_takeover_are_not_restarted_again() -> None:
    box = RollBox(*MEMBERS)
    cause = loop_failure("web-2")
    box.state.apply(rolling_member(cause, "web-1", started_at=1.0, duration_ms=5.0, details={"replica": "r0"}))
    outcome = await box.roll(cause)
    assert outcome.details["restarted"] == ["web-2", "web-1", "web-3"]
    assert box.runtime.calls == [("restart", "web-2"), ("restart", "web-3")]


async def test_without_a_load_balancer_members_are_restarted_and_checked_only() -> None:
    box = RollBox(*MEMBERS, lb=False)
    await box.roll(loop_failure("web-1"))
    assert box.runtime.calls == [("restart", "web-1"), ("restart", "web-2"), ("restart", "web-3")]
    assert box.health.checked == ["web-1", "web-2", "web-3"]


async def test_a_member_ejected_on_its_own_is_left_to_its_own_restore() -> None:
    """Out of the LB by its own recorded ejection: not marked nor put back by the roll."""
    box = RollBox(*MEMBERS)
    box.state.instance("web", "web-3").ejected = True
    await box.roll(loop_failure("web-1"))
    assert ("restart", "web-3") in box.runtime.calls
    assert all(instance != "web-3" for instance, _ in box.lb.log)
