"""The supervisor of ``autoserve up`` as a pure state machine, driven by sequences of
inputs (starts, exits, ticks, a stop) with the time passed in, in the style of kubelet's
worker_test.go: each step's actions are checked."""

from __future__ import annotations

import signal

import pytest

from autoserve_cli.supervise import Exited, Policy, Restart, Signal, Start, Supervisor

TERM, KILL = signal.SIGTERM, signal.SIGKILL


def supervisor(**children: Policy) -> Supervisor:
    sup = Supervisor()
    for name, policy in children.items():
        sup.add(name, policy)
        sup.started(name, 0.0)
    return sup


def restart_in(actions: list) -> float | None:
    (exited,) = [a for a in actions if isinstance(a, Exited)]
    return exited.restart_in


def test_a_crashed_service_is_restarted_after_the_backoff_and_the_others_are_left_alone() -> None:
    sup = supervisor(prober=Policy(), detector=Policy())
    actions = sup.exited("detector", -9, 5.0)
    assert actions == [Exited("detector", -9, 5.0, 1.0, 1, False)]
    assert actions[0].how == "signal SIGKILL"
    assert sup.tick(5.5) == []  # not before the backoff
    assert sup.next_due() == 6.0
    assert sup.tick(6.0) == [Start("detector")]
    assert sup.tick(7.0) == []  # once
    assert "prober" in sup.live() and not sup.stopping


@pytest.mark.parametrize(
    ("runs", "delays"),
    [
        # crashes right after each start: 1 s doubling to the 30 s cap
        ([1, 1, 1, 1, 1, 1, 1], [1, 2, 4, 8, 16, 30, 30]),
        # ran healthily for a minute: the backoff starts over
        ([1, 1, 1, 60, 1], [1, 2, 4, 1, 2]),
    ],
)
def test_crash_loop_backoff_doubles_to_a_cap_and_resets_after_a_healthy_run(runs, delays) -> None:
    sup = supervisor(recovery=Policy())
    now, seen = 0.0, []
    for ran in runs:
        now += ran
        delay = restart_in(sup.exited("recovery", 1, now))
        seen.append(delay)
        now = sup.next_due()  # type: ignore[assignment]
        assert sup.tick(now) == [Start("recovery")]
        sup.started("recovery", now)
    assert seen == delays


def test_restart_policies_on_failure_always_and_no() -> None:
    sup = supervisor(service=Policy(Restart.ON_FAILURE), bus=Policy(Restart.ALWAYS), target=Policy(Restart.NO))
    assert restart_in(sup.exited("service", 0, 1.0)) is None  # a clean exit was asked for
    assert restart_in(sup.exited("bus", 0, 1.0)) == 1.0  # the bus always comes back
    assert restart_in(sup.exited("target", 1, 1.0)) is None  # the recovery service's job
    assert sup.tick(2.0) == [Start("bus")]


def test_stop_sends_one_sigterm_per_child_group_by_group_then_sigkill_after_the_grace() -> None:
    sup = supervisor(
        prober=Policy(stop_group=0, grace=15),
        reporter=Policy(stop_group=0, grace=15),
        target=Policy(Restart.NO, stop_group=1, grace=15),
        bus=Policy(Restart.ALWAYS, stop_group=2, grace=15),
    )
    assert sup.stop(100.0) == [Signal("prober", TERM), Signal("reporter", TERM)]
    assert sup.stop(100.5) == []  # a second Ctrl-C: no second SIGTERM
    assert sup.exited("prober", 0, 101.0) == [Exited("prober", 0, 101.0, None, 0, True)]
    assert sup.tick(110.0) == []
    assert sup.tick(115.0) == [Signal("reporter", KILL)]  # its grace is over
    assert sup.tick(116.0) == []
    actions = sup.exited("reporter", -9, 115.1)
    assert actions[1:] == [Signal("target", TERM)]  # the services are gone: the next group
    assert sup.exited("target", 0, 116.0)[1:] == [Signal("bus", TERM)]  # the bus last
    assert not sup.done
    assert restart_in(sup.exited("bus", 0, 117.0)) is None  # not restarted while stopping
    assert sup.done and sup.next_due() is None


def test_a_child_waiting_in_backoff_is_not_started_once_stopping() -> None:
    sup = supervisor(detector=Policy(), bus=Policy(Restart.ALWAYS, stop_group=2))
    sup.exited("detector", -9, 1.0)
    assert sup.stop(1.5) == [Signal("bus", TERM)]  # no live service: straight to the bus
    assert sup.tick(10.0) == []
    sup.exited("bus", 0, 2.0)
    assert sup.done


def test_a_crash_during_the_stop_of_an_earlier_group_is_not_restarted() -> None:
    sup = supervisor(prober=Policy(stop_group=0), target=Policy(Restart.NO, stop_group=1))
    sup.stop(0.0)
    assert restart_in(sup.exited("target", -9, 0.5)) is None
    assert sup.exited("prober", 0, 1.0)[1:] == []  # nothing left to signal
    assert sup.done
