"""The recovery core as pure, table-driven sequences: strategy choice, escalation,
budgets, backoff, the ejection cap, panic mode, replay. Time is passed in."""

from __future__ import annotations

import itertools

import msgspec
import pytest

from autoserve_config import RecoveryConfig
from autoserve_events import FailureDetected, FailureType, HealthChanged, RecoveryStrategy
from autoserve_recovery.adapters.process import CAPABILITIES
from autoserve_recovery.core import (
    DEFAULT_STRATEGY_MAP,
    AppPolicy,
    Limits,
    RecoveryState,
    backoff_delay,
    decide,
    left_out,
    panic_announcement,
    panic_restores,
    record,
    remediation_ladder,
    restore_plan,
    rolling_member,
    strategy_map,
    traffic_steps,
)
from autoserve_recovery.ports import RecoveryError
from autoserve_recovery.rolling import time_left

S = RecoveryStrategy
F = FailureType
_ids = itertools.count()


def failure(
    t: float, kind: F = F.CONTAINER_STOPPED, instance: str = "i1", consecutive: int = 1, app: str = "web"
) -> FailureDetected:
    return FailureDetected(
        event_id=f"f{next(_ids)}", failure_type=kind, instance_id=instance, app_name=app, severity="high",
        message="x", timestamp=t, consecutive_count=consecutive,
    )  # fmt: skip


def health(t: float, healthy: bool, instance: str = "i1", app: str = "web") -> HealthChanged:
    return HealthChanged(event_id=f"h{next(_ids)}", instance_id=instance, app_name=app, healthy=healthy,
                         previous=None, consecutive=1, reason="", timestamp=t)  # fmt: skip


def policy(**recovery: object) -> AppPolicy:
    return AppPolicy(RecoveryConfig(**recovery), failure_threshold=2, max_replicas=5)


def run(state: RecoveryState, event: FailureDetected, pol: AppPolicy, now: float, success: bool = True,
        duration: float = 0.2, limits: Limits | None = None):  # fmt: skip
    """Decide, then 'execute' every planned action and fold what it records."""
    plan = decide(state, event, pol, limits or Limits(), now)
    done = []
    for strategy in (*plan.traffic, *([plan.remediation] if plan.remediation else [])):
        executed = record(state, pol, event, strategy, success=success, started_at=now, duration_ms=duration * 1000)
        state.apply(executed)
        done.append(executed)
    return plan, done


# -- the strategy map ------------------------------------------------------------------


def test_the_defaults_are_the_seeds_map_with_a_restart_first_for_a_stopped_container() -> None:
    assert DEFAULT_STRATEGY_MAP[F.HEALTH_CHECK_FAILED] == (S.REMOVE_FROM_LB, S.RESTART_CONTAINER, S.RECREATE_CONTAINER)
    assert DEFAULT_STRATEGY_MAP[F.HIGH_RESPONSE_TIME] == (S.REMOVE_FROM_LB, S.SCALE_OUT, S.RESTART_CONTAINER)
    assert DEFAULT_STRATEGY_MAP[F.CONTAINER_OOM_KILLED] == (S.REPLACE_INSTANCE, S.SCALE_OUT)
    assert DEFAULT_STRATEGY_MAP[F.CONTAINER_STOPPED][0] is S.RESTART_CONTAINER


@pytest.mark.parametrize(
    ("listed", "ladder"),
    [
        (
            (S.REMOVE_FROM_LB, S.RESTART_CONTAINER),
            (S.RESTART_CONTAINER, S.RECREATE_CONTAINER, S.REPLACE_INSTANCE, S.SCALE_OUT),
        ),
        ((S.REMOVE_FROM_LB, S.SCALE_OUT, S.RESTART_CONTAINER), (S.SCALE_OUT, S.RESTART_CONTAINER)),
        ((S.REPLACE_INSTANCE, S.SCALE_OUT), (S.REPLACE_INSTANCE, S.SCALE_OUT)),
        ((S.REMOVE_FROM_LB, S.RECREATE_CONTAINER), (S.RECREATE_CONTAINER, S.REPLACE_INSTANCE, S.SCALE_OUT)),
        ((S.REMOVE_FROM_LB,), ()),
    ],
)
def test_escalation_continues_up_the_ladder_after_the_listed_remediations(listed, ladder) -> None:
    assert remediation_ladder(listed, escalate=True) == ladder
    assert traffic_steps(listed) == tuple(s for s in listed if s is S.REMOVE_FROM_LB)


def test_an_apps_override_replaces_that_failure_types_list_only() -> None:
    merged = strategy_map({"container_stopped": ["recreate_container"]})
    assert merged[F.CONTAINER_STOPPED] == (S.RECREATE_CONTAINER,)
    assert merged[F.HEALTH_CHECK_TIMEOUT] == DEFAULT_STRATEGY_MAP[F.HEALTH_CHECK_TIMEOUT]
    assert remediation_ladder(merged[F.CONTAINER_STOPPED], escalate=False) == (S.RECREATE_CONTAINER,)


# -- escalation, budgets and backoff -----------------------------------------------------


def test_a_crash_loop_escalates_restart_recreate_replace_scale_out_with_doubling_backoff() -> None:
    state, pol = RecoveryState(), policy()
    steps = []
    now = 0.0
    for _ in range(7):
        plan, done = run(state, failure(now), pol, now)
        if plan.retry_at is not None:  # deferred: come back when the backoff allows
            now = plan.retry_at
            plan, done = run(state, failure(now), pol, now)
        steps.append((round(now, 1), done[0].strategy if done else None))
        now += 1.0  # it crashes again a second after each action
    assert steps == [
        (0.0, S.RESTART_CONTAINER),
        (10.2, S.RESTART_CONTAINER),  # 10 s after the first ended
        (30.4, S.RESTART_CONTAINER),  # 20 s
        (70.6, S.RECREATE_CONTAINER),  # 3 restarts in 5 minutes: the budget is spent
        (150.8, S.REPLACE_INSTANCE),  # 80 s
        (311.0, S.SCALE_OUT),  # 160 s
        (611.2, S.RESTART_CONTAINER),  # 300 s cap; the ladder is spent and the window refilled
    ]


@pytest.mark.parametrize(("level", "delay"), [(0, 0), (1, 10), (2, 20), (3, 40), (5, 160), (6, 300), (12, 300)])
def test_backoff_doubles_from_10_to_300_seconds(level: int, delay: float) -> None:
    assert backoff_delay(level, policy()) == delay


def test_backoff_and_escalation_reset_after_ten_minutes_healthy_not_before() -> None:
    state, pol = RecoveryState(), policy()
    run(state, failure(0), pol, 0)
    run(state, failure(20), pol, 20)
    state.apply(health(21, True))
    plan = decide(state, failure(300), pol, Limits(), 300)  # healthy for 279 s: backoff holds
    assert plan.remediation is S.RESTART_CONTAINER or plan.retry_at is None  # 20 s backoff long over
    _, done = run(state, failure(300), pol, 300)
    assert done[0].details["backoff_level"] == 3
    state.apply(health(302, True))
    _, done = run(state, failure(302 + 600 + 1), pol, 302 + 600 + 1)  # healthy 10 minutes: start over
    assert done[0].strategy is S.RESTART_CONTAINER and done[0].details["backoff_level"] == 1


def test_no_more_than_max_restarts_in_the_window_then_recreate() -> None:
    state, pol = RecoveryState(), policy(backoff_initial_seconds=0, backoff_max_seconds=0)
    strategies = [run(state, failure(t), pol, t)[1][0].strategy for t in (0, 1, 2, 3)]
    assert strategies == [S.RESTART_CONTAINER] * 3 + [S.RECREATE_CONTAINER]


def test_a_failed_action_escalates_at_once() -> None:
    state, pol = RecoveryState(), policy(backoff_initial_seconds=0, backoff_max_seconds=0)
    _, first = run(state, failure(0), pol, 0, success=False)
    _, second = run(state, failure(1), pol, 1)
    assert (first[0].strategy, first[0].success, second[0].strategy) == (
        S.RESTART_CONTAINER,
        False,
        S.RECREATE_CONTAINER,
    )


def test_probe_failures_wait_for_the_failure_threshold_container_deaths_do_not() -> None:
    state, pol = RecoveryState(), policy()
    assert decide(state, failure(0, F.HEALTH_CHECK_TIMEOUT, consecutive=1), pol, Limits(), 0).empty
    plan = decide(state, failure(1, F.HEALTH_CHECK_TIMEOUT, consecutive=2), pol, Limits(), 1)
    assert plan.remediation is S.RESTART_CONTAINER
    assert decide(state, failure(1, F.CONTAINER_STOPPED), pol, Limits(), 1).remediation is S.RESTART_CONTAINER


def test_a_failure_older_than_the_last_remediation_or_recovery_is_stale() -> None:
    state, pol = RecoveryState(), policy()
    run(state, failure(10), pol, 10, duration=0.5)
    assert decide(state, failure(10.3), pol, Limits(), 11).empty  # e.g. the die of our own restart
    state.apply(health(20, True))
    assert decide(state, failure(19, F.HEALTH_CHECK_FAILED, consecutive=3), pol, Limits(), 21).empty


def test_the_seeds_scale_out_rule_two_consecutive_failures_and_once_per_window() -> None:
    state, pol = RecoveryState(), policy()
    assert (
        decide(state, failure(0, F.HIGH_RESOURCE_USAGE, consecutive=1), pol, Limits(), 0).remediation
        is S.RESTART_CONTAINER
    )
    _, done = run(state, failure(1, F.HIGH_RESOURCE_USAGE, consecutive=2), pol, 1)
    assert done[0].strategy is S.SCALE_OUT


def test_the_global_rate_limit_defers_remediation() -> None:
    state, pol, limits = RecoveryState(), policy(), Limits(max_actions_per_minute=2)
    run(state, failure(0, instance="a"), pol, 0, limits=limits)
    run(state, failure(1, instance="b"), pol, 1, limits=limits)
    plan = decide(state, failure(2, instance="c"), pol, limits, 2)
    assert plan.remediation is None and plan.retry_at == 60.0


def test_disabled_recovery_does_nothing() -> None:
    assert decide(RecoveryState(), failure(0), policy(enabled=False), Limits(), 0).empty


# -- load balancer: ejection cap, last healthy, panic, restore -----------------------------


def four_instances(state: RecoveryState) -> None:
    for name in ("a", "b", "c", "d"):
        state.apply(health(0, True, instance=name))


def test_the_ejection_cap_holds_and_panic_mode_stops_ejecting_but_not_remediation() -> None:
    state, pol = RecoveryState(), policy(max_ejection_percent=50)
    four_instances(state)
    ejected = []
    for t, name in ((10, "b"), (11, "c"), (12, "d")):
        state.apply(health(t, False, instance=name))
        plan, _ = run(state, failure(t, F.HEALTH_CHECK_FAILED, instance=name, consecutive=2), pol, t)
        ejected.append(S.REMOVE_FROM_LB in plan.traffic)
        assert plan.remediation is S.RESTART_CONTAINER  # remediation continues in panic
    assert ejected == [True, True, False]
    assert [s.lineage for s in state.ejected("web")] == ["b", "c"]
    assert any("panic mode: 3 of 4" in note for note in plan.notes)


def test_the_cap_counts_and_allows_at_least_one_ejection() -> None:
    state, pol = RecoveryState(), policy(max_ejection_percent=10, panic_threshold_percent=100)
    for name in ("a", "b", "c"):
        state.apply(health(0, True, instance=name))
    state.apply(health(1, False, instance="a"))
    plan, _ = run(state, failure(1, F.HEALTH_CHECK_FAILED, instance="a", consecutive=2), pol, 1)
    assert plan.traffic == (S.REMOVE_FROM_LB,)
    state.apply(health(2, False, instance="b"))
    plan, _ = run(state, failure(2, F.HEALTH_CHECK_FAILED, instance="b", consecutive=2), pol, 2)
    assert plan.traffic == () and any("ejection cap" in n for n in plan.notes)


def test_never_remove_the_last_healthy_instance() -> None:
    state, pol = RecoveryState(), policy(max_ejection_percent=100, panic_threshold_percent=100)
    for name in ("a", "b"):
        state.apply(health(0, True, instance=name))
    state.apply(health(1, False, instance="a"))
    assert run(state, failure(1, F.HEALTH_CHECK_FAILED, instance="a", consecutive=2), pol, 1)[0].traffic
    plan = decide(state, failure(2, F.HEALTH_CHECK_FAILED, instance="b", consecutive=2), pol, Limits(), 2)
    assert plan.traffic == () and "would remove the last healthy instance" in plan.notes


def test_panic_is_announced_once_on_entry_and_once_on_exit() -> None:
    state, pol = RecoveryState(), policy()
    four_instances(state)
    announced = []
    for t, name, healthy in (
        (1, "a", False),
        (2, "b", False),
        (3, "c", False),
        (4, "d", False),
        (5, "c", True),
        (6, "b", True),
    ):
        event = health(t, healthy, instance=name)
        state.apply(event)
        if (out := panic_announcement(state, event, pol)) is not None:
            state.apply(out)
            announced.append((t, out.details["panic"], out.severity))
    assert announced == [(3, True, "critical"), (6, False, "low")]


def test_a_healthy_instance_that_is_out_goes_back_in_once() -> None:
    state, pol = RecoveryState(), policy()
    four_instances(state)
    state.apply(health(1, False, instance="a"))
    run(state, failure(1, F.HEALTH_CHECK_FAILED, instance="a", consecutive=2), pol, 1)
    back = health(5, True, instance="a")
    state.apply(back)
    assert restore_plan(state, back)
    state.apply(
        record(state, pol, back, S.REMOVE_FROM_LB, success=True, started_at=5, duration_ms=1, operation="restore")
    )
    assert not state.instance("web", "a").ejected and not restore_plan(state, back)


# -- replay ----------------------------------------------------------------------------


def test_replaying_the_recorded_events_restores_budgets_and_backoff_exactly() -> None:
    state, pol = RecoveryState(), policy()
    log = []
    for t in (0, 10.2, 30.4):
        _, done = run(state, failure(t), pol, t)
        log += done
    log.append(health(31, True))
    state.apply(log[-1])
    replayed = RecoveryState()
    for event in log:  # as decoded from the stream, twice: a redelivery changes nothing
        copy = msgspec.json.decode(msgspec.json.encode(event), type=type(event))
        replayed.apply(copy)
        replayed.apply(copy)
    now = 80.0
    assert decide(replayed, failure(now), pol, Limits(), now) == decide(state, failure(now), pol, Limits(), now)
    original, rebuilt = state.instance("web", "i1"), replayed.instance("web", "i1")
    assert (rebuilt.level, rebuilt.backoff_level, rebuilt.next_allowed_at) == (
        original.level,
        original.backoff_level,
        original.next_allowed_at,
    )
    assert len(rebuilt.attempts) == 3


def test_a_recreated_container_inherits_its_slots_budgets() -> None:
    state, pol = RecoveryState(), policy(backoff_initial_seconds=0, backoff_max_seconds=0)
    event = failure(0)
    state.apply(record(state, pol, event, S.RECREATE_CONTAINER, success=True, started_at=0, duration_ms=100,
                       details={"new_instance_id": "i2", "removed_instance_id": "i1"}))  # fmt: skip
    assert state.instance("web", "i2").lineage == "i1"
    _, done = run(state, failure(1, instance="i2"), pol, 1)
    assert done[0].strategy is S.REPLACE_INSTANCE  # the level moved past recreate


def test_duplicate_failures_are_acted_on_once() -> None:
    state, pol = RecoveryState(), policy()
    event = failure(0)
    _, first = run(state, event, pol, 0)
    _, again = run(state, event, pol, 50)
    assert len(first) == 1 and again == []


# -- panic restores, rolling restarts ---------------------------------------------------


def test_entering_panic_puts_the_ejected_instances_back_and_a_later_failure_ejects_again() -> None:
    state, pol = RecoveryState(), policy(max_ejection_percent=50)
    four_instances(state)
    for t, name in ((1, "b"), (2, "c")):
        state.apply(health(t, False, instance=name))
        run(state, failure(t, F.HEALTH_CHECK_FAILED, instance=name, consecutive=2), pol, t)
    assert sorted(s.lineage for s in state.ejected("web")) == ["b", "c"]
    calm = health(2.5, True, instance="a")  # not in panic: nothing to restore
    state.apply(calm)
    assert panic_restores(state, calm, pol) == ()
    third = health(3, False, instance="d")
    state.apply(third)
    assert panic_restores(state, third, pol) == ("b", "c")
    for target in ("b", "c"):
        state.apply(record(state, pol, third, S.REMOVE_FROM_LB, success=True, started_at=3, duration_ms=1,
                           operation="restore", instance_id=target, details={"panic": True}))  # fmt: skip
    assert state.ejected("web") == [] and panic_restores(state, third, pol) == ()
    # Out of panic (c is healthy again), b's next failure takes it out again.
    state.apply(health(4, True, instance="c"))
    plan = decide(state, failure(5, F.HEALTH_CHECK_FAILED, instance="b", consecutive=5), pol, Limits(), 5)
    assert plan.traffic == (S.REMOVE_FROM_LB,)


def test_a_restore_for_another_instance_has_its_own_id_and_done_key() -> None:
    state, pol = RecoveryState(), policy()
    cause = health(1, False, instance="d")
    one = record(state, pol, cause, S.REMOVE_FROM_LB, success=True, started_at=1, duration_ms=1,
                 operation="restore", instance_id="b")  # fmt: skip
    two = record(state, pol, cause, S.REMOVE_FROM_LB, success=True, started_at=1, duration_ms=1,
                 operation="restore", instance_id="c")  # fmt: skip
    assert one.event_id != two.event_id and (one.instance_id, two.instance_id) == ("b", "c")
    state.apply(one)
    assert state.is_done(cause.event_id, "restore", "b") and not state.is_done(cause.event_id, "restore", "c")


def test_a_rolling_restart_member_makes_its_own_death_stale_without_spending_its_budget() -> None:
    state, pol = RecoveryState(), policy()
    cause = failure(10, F.HEALTH_CHECK_FAILED, instance="a", consecutive=2)
    member = rolling_member(cause, "b", started_at=11, duration_ms=300, details={"effective_at": 11.2})
    state.apply(member)
    b = state.instance("web", "b")
    assert (b.last_remediation_end, b.level, b.backoff_level, len(b.attempts)) == (11.2, 0, 0, 0)
    assert decide(state, failure(11.1, instance="b"), pol, Limits(), 12).empty  # the die of the rolling restart
    assert decide(state, failure(13, instance="b"), pol, Limits(), 13).remediation is S.RESTART_CONTAINER
    assert state.is_done(cause.event_id, S.ROLLING_RESTART, "b")


def test_a_failed_rolling_restart_member_is_recorded_and_its_death_is_still_ours() -> None:
    state, pol = RecoveryState(), policy()
    cause = failure(10, F.HEALTH_CHECK_FAILED, instance="a", consecutive=2)
    member = rolling_member(cause, "b", started_at=11, duration_ms=8000, details={"effective_at": 11.2},
                            error="b does not answer its health check")  # fmt: skip
    assert (member.success, member.error) == (False, "b does not answer its health check")
    assert member.details["member_of"] == "a"
    state.apply(member)
    assert decide(state, failure(11.1, instance="b"), pol, Limits(), 12).empty  # the die of its restart
    assert len(state.instance("web", "b").attempts) == 0  # its own budgets are not spent


def test_a_member_left_out_by_a_failed_rolling_restart_is_an_ejection_the_normal_restore_undoes() -> None:
    state = RecoveryState()
    cause = failure(10, F.HEALTH_CHECK_FAILED, instance="a", consecutive=2)
    state.apply(health(9, False, "a"))
    event = left_out(cause, "a", at=20, details={"down": ["a"]}, reason="a does not answer")
    assert event.strategy is S.REMOVE_FROM_LB and event.success
    assert event.details["left_out_by"] == "rolling_restart" and "operation" not in event.details
    # Its own id: the cause's own remove_from_lb (if its plan had one) is another event.
    own_removal = record(state, policy(), cause, S.REMOVE_FROM_LB, success=False, started_at=10, duration_ms=1)
    assert event.event_id != own_removal.event_id
    state.apply(event)
    assert state.instance("web", "a").ejected and [s.lineage for s in state.ejected("web")] == ["a"]
    back = health(30, True, "a")
    state.apply(back)
    assert restore_plan(state, back)
    state.apply(record(state, policy(), back, S.REMOVE_FROM_LB, success=True, started_at=30, duration_ms=1,
                       operation="restore"))  # fmt: skip
    assert not state.instance("web", "a").ejected


def test_a_rolling_restart_out_of_time_says_which_timeout_ran_out() -> None:
    assert time_left(100.0, 97.5, 30, "b", ["a"]) == 2.5
    for now in (100.0, 101.0):
        with pytest.raises(RecoveryError) as raised:
            time_left(100.0, now, 30, "b", ["a"])
        assert str(raised.value) == (
            "rolling_restart: action_timeout_seconds (30s) ran out before b was restarted; stopped there (restarted: a)"
        )


# -- the escalation ends where the runtime does (issue: the demo's web-3 stayed down) ----


class LocalProcesses:
    """A runtime as the service sees it: declares what it can do, as ProcessRuntime does."""

    capabilities = CAPABILITIES


class NoDeclaration:
    name = "docker"


def test_a_local_process_crash_loop_never_escalates_to_replace_or_scale_out() -> None:
    """The sequence that used to go restart x3, recreate, replace_instance (which fails for
    a local process: "needs a container runtime"), scale_out: now it stops at recreate
    and keeps restarting under the same budgets and doubling backoff, saying so."""
    state = RecoveryState()
    pol = policy().for_runtime(LocalProcesses())
    steps, chain_ends = [], []
    now = 0.0
    for _ in range(9):
        plan, done = run(state, failure(now, F.PORT_NOT_LISTENING, consecutive=3), pol, now)
        if plan.retry_at is not None:
            now = plan.retry_at
            plan, done = run(state, failure(now, F.PORT_NOT_LISTENING, consecutive=3), pol, now)
        remediation = next(e for e in done if e.strategy is not S.REMOVE_FROM_LB)
        steps.append((round(now, 1), remediation.strategy))
        chain_ends.append(remediation.details.get("escalation_wanted"))
        now += 1.0
    assert steps == [
        (0.0, S.RESTART_CONTAINER),
        (10.2, S.RESTART_CONTAINER),
        (30.4, S.RESTART_CONTAINER),
        (70.6, S.RECREATE_CONTAINER),  # 3 restarts in 5 minutes
        (150.8, S.RECREATE_CONTAINER),  # was replace_instance: past the process runtime
        (311.0, S.RESTART_CONTAINER),  # was scale_out; the window has room for restarts again
        (611.2, S.RESTART_CONTAINER),  # 300 s cap
        (911.4, S.RESTART_CONTAINER),
        (1211.6, S.RESTART_CONTAINER),
    ]
    assert chain_ends[:4] == [None] * 4
    assert chain_ends[4:] == ["replace_instance"] * 5  # every attempt past the limit says so
    assert all(s in CAPABILITIES.remediations for _, s in steps)


def test_the_event_says_the_chain_ended_at_the_runtimes_limit() -> None:
    state = RecoveryState()
    pol = policy(backoff_initial_seconds=0, backoff_max_seconds=0).for_runtime(LocalProcesses())
    done = [run(state, failure(t), pol, t)[1][0] for t in (0, 1, 2, 3, 4)]
    assert [e.strategy for e in done] == [S.RESTART_CONTAINER] * 3 + [S.RECREATE_CONTAINER] * 2
    last = done[-1]
    assert last.success and last.details["escalation_wanted"] == "replace_instance"
    assert (
        "process runtime's limit" in last.details["chain_end"]
        and "cannot replace_instance" in last.details["chain_end"]
    )
    assert "chain_end" not in done[3].details  # recreate is still on the ladder: no note


def test_a_runtime_that_declares_nothing_keeps_the_whole_ladder() -> None:
    assert policy().for_runtime(NoDeclaration()).capabilities is None
    state = RecoveryState()
    pol = policy(backoff_initial_seconds=0, backoff_max_seconds=0).for_runtime(NoDeclaration())
    done = [run(state, failure(t), pol, t)[1][0].strategy for t in (0, 1, 2, 3, 4, 5)]
    assert done == [S.RESTART_CONTAINER] * 3 + [S.RECREATE_CONTAINER, S.REPLACE_INSTANCE, S.SCALE_OUT]


@pytest.mark.parametrize(
    ("listed", "ladder"),
    [
        ((S.RESTART_CONTAINER, S.RECREATE_CONTAINER), (S.RESTART_CONTAINER, S.RECREATE_CONTAINER)),
        ((S.REPLACE_INSTANCE, S.SCALE_OUT), (S.RECREATE_CONTAINER,)),  # nothing it can do: its top rung
        ((S.REMOVE_FROM_LB, S.SCALE_OUT, S.RESTART_CONTAINER), (S.RESTART_CONTAINER,)),
        ((S.REMOVE_FROM_LB,), ()),
    ],
)
def test_the_ladder_within_a_runtime(listed, ladder) -> None:
    assert remediation_ladder(listed, escalate=True, capabilities=CAPABILITIES) == ladder
