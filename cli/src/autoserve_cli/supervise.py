"""What ``autoserve up`` does with its children: the pure core of its supervisor.

A small state machine per child, in the manner of systemd's ``Restart=`` and kubelet's
CrashLoopBackOff: a child that dies is started again after a backoff (1 s doubling to
30 s, back to 1 s once it had run healthily for a minute), the others are left alone;
stopping is one SIGTERM per child with a grace period, then SIGKILL, in stop groups
(services first, then the demo targets, the bus last). No I/O: the adapter (``up``)
reports starts and exits and the time, and carries out the actions returned.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum


class Restart(StrEnum):
    NO = "no"  # the demo targets: the recovery service restarts them, that is the demo
    ON_FAILURE = "on-failure"  # a service: a clean exit (status 0) was asked for
    ALWAYS = "always"  # the bus: every service needs it


class Phase(StrEnum):
    RUNNING = "running"
    BACKOFF = "backoff"  # dead, to be started again at ``due``
    STOPPING = "stopping"  # SIGTERM sent; SIGKILL at ``due``
    DONE = "done"  # exited and not to be started again


@dataclass(frozen=True)
class Policy:
    restart: Restart = Restart.ON_FAILURE
    stop_group: int = 0  # lower groups stop first; the next group once they are all gone
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    reset_after: float = 60.0  # ran this long: the next crash starts the backoff over
    grace: float = 15.0  # SIGTERM to SIGKILL


@dataclass(frozen=True)
class Start:
    name: str


@dataclass(frozen=True)
class Signal:
    name: str
    signal: signal.Signals


@dataclass(frozen=True)
class Exited:
    """A child ended: what it said, and whether (after how long) it comes back."""

    name: str
    returncode: int  # negative: killed by that signal
    ran_for: float
    restart_in: float | None  # None: not started again
    restarts: int  # how many times it was started again so far
    expected: bool  # we asked it to stop

    @property
    def how(self) -> str:
        if self.returncode < 0:
            try:
                return f"signal {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"signal {-self.returncode}"
        return f"exit code {self.returncode}"


Action = Start | Signal | Exited


@dataclass
class Child:
    name: str
    policy: Policy
    phase: Phase = Phase.DONE
    started_at: float = 0.0
    due: float | None = None
    delay: float = 0.0  # the backoff the last restart waited
    restarts: int = 0
    termed: bool = False  # SIGTERM sent in this stop: never twice
    killed: bool = False


@dataclass
class Supervisor:
    children: dict[str, Child] = field(default_factory=dict)
    stopping: bool = False

    def add(self, name: str, policy: Policy) -> None:
        self.children[name] = Child(name, policy)

    def started(self, name: str, now: float) -> None:
        child = self.children[name]
        child.phase, child.started_at, child.due = Phase.RUNNING, now, None

    def exited(self, name: str, returncode: int, now: float) -> list[Action]:
        child = self.children[name]
        # A start that failed (still in backoff) ran for nothing: the backoff keeps doubling.
        ran_for = now - child.started_at if child.phase in (Phase.RUNNING, Phase.STOPPING) else 0.0
        expected = self.stopping or child.phase is Phase.STOPPING
        restart_in = None if expected else self._restart_delay(child, returncode, ran_for)
        if restart_in is None:
            child.phase, child.due = Phase.DONE, None
        else:
            child.phase, child.due, child.delay = Phase.BACKOFF, now + restart_in, restart_in
            child.restarts += 1
        actions: list[Action] = [Exited(name, returncode, ran_for, restart_in, child.restarts, expected)]
        if self.stopping:
            actions += self._next_group(now)
        return actions

    def _restart_delay(self, child: Child, returncode: int, ran_for: float) -> float | None:
        policy = child.policy
        if policy.restart is Restart.NO or (policy.restart is Restart.ON_FAILURE and returncode == 0):
            return None
        if child.restarts == 0 or ran_for >= policy.reset_after:
            return policy.backoff_initial
        return min(max(child.delay, policy.backoff_initial) * 2, policy.backoff_max)

    def tick(self, now: float) -> list[Action]:
        """What is due: restarts whose backoff is over, SIGKILLs whose grace is."""
        actions: list[Action] = []
        for child in self.children.values():
            if child.due is None or child.due > now:
                continue
            if child.phase is Phase.BACKOFF:
                child.due = None
                actions.append(Start(child.name))
            elif child.phase is Phase.STOPPING and not child.killed:
                child.killed, child.due = True, None
                actions.append(Signal(child.name, signal.SIGKILL))
        return actions

    def stop(self, now: float) -> list[Action]:
        """Stop everything: nothing waiting in backoff starts; group by group, one SIGTERM
        each, SIGKILL after the grace period."""
        if self.stopping:
            return []
        self.stopping = True
        for child in self.children.values():
            if child.phase is Phase.BACKOFF:
                child.phase, child.due = Phase.DONE, None
        return self._next_group(now)

    def _next_group(self, now: float) -> list[Action]:
        live = [c for c in self.children.values() if c.phase in (Phase.RUNNING, Phase.STOPPING)]
        if not live:
            return []
        group = min(c.policy.stop_group for c in live)
        actions: list[Action] = []
        for child in live:
            if child.policy.stop_group == group and not child.termed:
                child.termed, child.phase = True, Phase.STOPPING
                child.due = now + child.policy.grace
                actions.append(Signal(child.name, signal.SIGTERM))
        return actions

    def next_due(self) -> float | None:
        return min((c.due for c in self.children.values() if c.due is not None), default=None)

    @property
    def done(self) -> bool:
        """Stopping, and every child is gone."""
        return self.stopping and all(c.phase is Phase.DONE for c in self.children.values())

    def live(self) -> Iterable[str]:
        return (c.name for c in self.children.values() if c.phase in (Phase.RUNNING, Phase.STOPPING))
