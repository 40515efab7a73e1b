"""Every breaker of every (app, instance), and which of them this replica decides for.

Decisions are partitioned: the replica that ``owns`` a key folds its outcomes, admits its
half-open trials and decides its transitions. Answers are replicated: every replica
follows every ``BreakerStateChanged`` and answers ``allow`` for any key from it. A replica
that does not own a half-open key admits no trial (so the cap holds across replicas) and
leaves timed transitions to the owner.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from autoserve_config import AppSpec, BreakerConfig
from autoserve_events import BreakerStateChanged, BreakerTrialAdmitted, Event, OverrideAction, ProbeCompleted

from . import breaker as core
from .breaker import CLOSED, HALF_OPEN, OPEN, Breaker

Key = tuple[str, str]
DEFAULT_CONFIG = BreakerConfig()


class Decision:
    """An ``allow`` answer. ``known`` is False when no breaker exists and the default answered."""

    __slots__ = ("allow", "known", "state")

    def __init__(self, allow: bool, state: str, known: bool = True) -> None:
        self.allow, self.state, self.known = allow, state, known

    def __repr__(self) -> str:
        return f"Decision(allow={self.allow}, state={self.state!r}, known={self.known})"


class Breakers:
    def __init__(self, *, owns: Callable[[str, str], bool] | None = None, allow_unknown_apps: bool = True) -> None:
        self.breakers: dict[Key, Breaker] = {}
        self.configs: dict[str, BreakerConfig] = {}
        self.configured: dict[str, frozenset[str]] = {}
        self.allow_unknown_apps = allow_unknown_apps
        self._owns = owns
        self._owned: dict[Key, bool] = {}
        self._timed: set[Key] = set()  # owned keys that ``tick`` must look at

    # -- configuration ---------------------------------------------------------------

    def set_apps(self, apps: Mapping[str, AppSpec]) -> None:
        self.configs = {name: spec.breaker for name, spec in apps.items()}
        self.configured = {name: frozenset(i.id for i in spec.instances) for name, spec in apps.items()}
        self._timed.update(k for k, b in self.breakers.items() if b.state != CLOSED and self.owns(k))

    def config(self, app_name: str) -> BreakerConfig:
        return self.configs.get(app_name, DEFAULT_CONFIG)

    def owns(self, key: Key) -> bool:
        owned = self._owned.get(key)
        if owned is None:
            owned = self._owned[key] = self._owns is None or self._owns(*key)
        return owned

    def get(self, app_name: str, instance_id: str) -> Breaker | None:
        return self.breakers.get((app_name, instance_id))

    def _breaker(self, key: Key) -> Breaker:
        breaker = self.breakers.get(key)
        if breaker is None:
            breaker = self.breakers[key] = Breaker(*key)
        return breaker

    # -- inputs ------------------------------------------------------------------------

    def record(
        self, app_name: str, instance_id: str, success: bool, duration_ms: float, now: float, cause: str | None = None
    ) -> list[BreakerStateChanged]:
        """A request outcome (a client's report, or a probe): the seed's ``record_success``
        and ``record_failure``. Returns the transitions to publish."""
        key = (app_name, instance_id)
        if not self.owns(key):
            return []
        breaker = self._breaker(key)
        config = self.configs.get(app_name, DEFAULT_CONFIG)
        outcomes = core.record(breaker, config, success, duration_ms, now)
        if not outcomes:
            return []
        outcome = outcomes[0]
        if breaker.state == CLOSED:
            core.ensure_window(breaker, config)
        core.apply(breaker, outcome)
        changes = core.evaluate(breaker, config, outcome, now, cause)
        for change in changes:
            self._apply(key, breaker, change)
        return changes

    def probe(self, event: ProbeCompleted) -> list[BreakerStateChanged]:
        """A probe result is an outcome observed at its own timestamp: a replay folds it
        exactly as it was folded live."""
        return self.record(
            event.app_name, event.instance_id, event.is_healthy, event.response_time_ms, event.timestamp, event.event_id
        )

    def allow(self, app_name: str, instance_id: str, now: float) -> tuple[Decision, list[Event]]:
        key = (app_name, instance_id)
        breaker = self.breakers.get(key)
        if breaker is None:
            return self._unknown(app_name, instance_id), []
        if breaker.state == CLOSED:
            return Decision(True, CLOSED), []
        if not self.owns(key):
            return Decision(False, breaker.state), []  # trials and timers belong to the owner
        allowed, events = core.allow(breaker, self.configs.get(app_name, DEFAULT_CONFIG), now)
        for event in events:
            self._apply(key, breaker, event)
        return Decision(allowed, breaker.state), events  # type: ignore[return-value]

    def _unknown(self, app_name: str, instance_id: str) -> Decision:
        config = self.configs.get(app_name)
        if config is None:
            allowed = self.allow_unknown_apps
        elif instance_id in self.configured.get(app_name, ()):
            return Decision(True, CLOSED)  # configured, never seen failing: closed
        else:
            allowed = config.allow_unknown_instances
        return Decision(allowed, CLOSED if allowed else OPEN, known=False)

    def tick(self, now: float) -> list[BreakerStateChanged]:
        """Timed transitions of owned breakers: open to half-open after ``recovery_timeout``."""
        changes: list[BreakerStateChanged] = []
        for key in list(self._timed):
            breaker = self.breakers[key]
            for change in core.tick(breaker, self.config(key[0]), now):
                self._apply(key, breaker, change)
                changes.append(change)
        return changes

    def next_due(self) -> float | None:
        dues = [core.due_at(self.breakers[k], self.config(k[0])) for k in self._timed]
        return min((d for d in dues if d is not None), default=None)

    def override(
        self, app_name: str, instance_id: str, action: OverrideAction, now: float, by: str, cause: str
    ) -> list[BreakerStateChanged]:
        key = (app_name, instance_id)
        breaker = self._breaker(key)
        changes = core.override(breaker, self.config(app_name), action, now, by, cause)
        for change in changes:
            self._apply(key, breaker, change)
        return changes

    def follow(self, event: BreakerStateChanged | BreakerTrialAdmitted) -> bool:
        """A breaker event from the stream: on start-up (the replay), or another replica's
        decision. Applied only if newer than what this replica knows; True if applied."""
        key = (event.app_name, event.instance_id)
        breaker = self._breaker(key)
        if isinstance(event, BreakerStateChanged):
            if event.generation <= breaker.generation:
                return False  # this replica's own decision, or an older one
        elif event.generation != breaker.generation or event.trial <= breaker.test_request_count:
            return False
        self._apply(key, breaker, event)
        return True

    def _apply(self, key: Key, breaker: Breaker, event: BreakerStateChanged | BreakerTrialAdmitted) -> None:
        core.apply(breaker, event)
        if breaker.state in (OPEN, HALF_OPEN) and not breaker.forced and self.owns(key):
            self._timed.add(key)
        else:
            self._timed.discard(key)

    def states(self) -> dict[str, int]:
        counts = {CLOSED: 0, OPEN: 0, HALF_OPEN: 0}
        for breaker in self.breakers.values():
            counts[breaker.state] += 1
        return counts
