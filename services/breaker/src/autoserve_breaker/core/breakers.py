"""Every breaker of every (app, instance), and which of them this member decides for.

Decisions are partitioned: the member that ``owns`` a key folds its outcomes, admits its
half-open trials and decides its transitions. Answers are replicated: every member follows
every ``BreakerStateChanged`` and answers ``allow`` for any key from it. A member that does
not own a half-open key admits no trial (so the cap holds across members) and leaves timed
transitions to the owner. ``may_decide`` (False while this member's lease may have lapsed)
stops every decision at once, whatever ownership says.

Takeover (``reown``): a key this member gains starts again from the log, its last transition
and trial (``from_log``); the stored probes since are replayed into it (``replay_probe``);
live outcomes for it meanwhile are held back and folded after them (``rebuilt``). Only then
does this member decide for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from autoserve_config import AppSpec, BreakerConfig
from autoserve_events import BreakerStateChanged, BreakerTrialAdmitted, Event, OverrideAction, ProbeCompleted

from . import breaker as core
from .breaker import CLOSED, HALF_OPEN, OPEN, Breaker

Key = tuple[str, str]
Owns = Callable[[str, str], bool]
DEFAULT_CONFIG = BreakerConfig()


class Decision:
    """An ``allow`` answer. ``known`` is False when no breaker exists and the default answered."""

    __slots__ = ("allow", "known", "state")

    def __init__(self, allow: bool, state: str, known: bool = True) -> None:
        self.allow, self.state, self.known = allow, state, known

    def __repr__(self) -> str:
        return f"Decision(allow={self.allow}, state={self.state!r}, known={self.known})"


class Breakers:
    def __init__(
        self,
        *,
        owns: Owns | None = None,
        allow_unknown_apps: bool = True,
        may_decide: Callable[[], bool] | None = None,
    ) -> None:
        self.breakers: dict[Key, Breaker] = {}
        self.configs: dict[str, BreakerConfig] = {}
        self.configured: dict[str, frozenset[str]] = {}
        self.periods: dict[str, float] = {}  # each app's probe period
        self.allow_unknown_apps = allow_unknown_apps
        self._owns = owns
        self._may_decide = may_decide
        self._owned: dict[Key, bool] = {}
        self._timed: set[Key] = set()  # owned keys that ``tick`` must look at
        self._gained: Owns | None = None  # keys taken over and still being rebuilt
        self._held_back: list[tuple[Key, bool, float, float, str | None]] = []  # their live outcomes
        self._logged: dict[Key, tuple[BreakerStateChanged, int]] = {}  # last transition stored, stream seq
        self._logged_trials: dict[Key, BreakerTrialAdmitted] = {}

    # -- configuration ---------------------------------------------------------------

    def set_apps(self, apps: Mapping[str, AppSpec]) -> None:
        self.configs = {name: spec.breaker for name, spec in apps.items()}
        self.periods = {name: spec.health_check.period_seconds for name, spec in apps.items()}
        self.configured = {name: frozenset(i.id for i in spec.instances) for name, spec in apps.items()}
        self._timed.update(k for k, b in self.breakers.items() if b.state != CLOSED and self.owns(k))

    def config(self, app_name: str) -> BreakerConfig:
        return self.configs.get(app_name, DEFAULT_CONFIG)

    def owns(self, key: Key) -> bool:
        """True if this member decides for ``key`` now (never while it may not decide)."""
        if self._may_decide is not None and not self._may_decide():
            return False
        owned = self._owned.get(key)
        if owned is None:
            owned = self._owns is None or self._owns(*key)
            owned = self._owned[key] = owned and not (self._gained is not None and self._gained(*key))
        return owned

    def decides_overrides(self, key: Key) -> bool:
        """An operator's override needs no counts: the owner applies it even while it is still
        rebuilding the breaker (replayed outcomes older than it are then ignored)."""
        if self.owns(key):
            return True
        may_decide = self._may_decide is None or self._may_decide()
        return may_decide and self._gained is not None and self._gained(*key)

    def owned_count(self) -> int:
        return sum(1 for key in self.breakers if self.owns(key))

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
            if self._gained is not None and self._gained(*key):  # folded once its rebuild is done
                self._held_back.append((key, success, duration_ms, now, cause))
            return []
        return self._record(key, success, duration_ms, now, cause)

    def _record(
        self, key: Key, success: bool, duration_ms: float, now: float, cause: str | None
    ) -> list[BreakerStateChanged]:
        breaker = self._breaker(key)
        config = self.configs.get(key[0], DEFAULT_CONFIG)
        outcomes = core.record(breaker, config, success, duration_ms, now)
        if not outcomes:
            return []
        outcome = outcomes[0]
        if breaker.state == CLOSED:
            core.ensure_window(breaker, config)
        core.apply(breaker, outcome)
        if self._may_decide is not None and not self._may_decide():
            return []  # counted; the decision waits for a member that holds its lease
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
        if self._may_decide is not None and not self._may_decide():
            return changes
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

    def follow(self, event: BreakerStateChanged | BreakerTrialAdmitted, seq: int = 0) -> bool:
        """A breaker event from the stream (at stream sequence ``seq``): on start-up (the
        replay), or another member's decision. Remembered as the log's last of its breaker;
        applied only if newer than what this member knows; True if applied."""
        key = (event.app_name, event.instance_id)
        breaker = self._breaker(key)
        if isinstance(event, BreakerStateChanged):
            self._logged[key] = (event, seq)  # the stream delivers in order: the newest is last
            if event.generation <= breaker.generation:
                return False  # this member's own decision, or an older one
        else:
            last = self._logged_trials.get(key)
            if last is None or (event.generation, event.trial) > (last.generation, last.trial):
                self._logged_trials[key] = event
            if event.generation != breaker.generation or event.trial <= breaker.test_request_count:
                return False
        self._apply(key, breaker, event)
        return True

    # -- takeover: rebuilt from the log ----------------------------------------------------

    def logged(self, key: Key) -> tuple[int, int, str]:
        """``key``'s last stored transition: its generation, stream sequence and event id
        (0, 0, "": none)."""
        entry = self._logged.get(key)
        return (entry[0].generation, entry[1], entry[0].event_id) if entry else (0, 0, "")

    def log_aged_out(self, key: Key) -> None:
        """The stream may no longer hold ``key``'s last transition: name none when extending it."""
        if (entry := self._logged.get(key)) is not None:
            self._logged[key] = (entry[0], 0)

    def from_log(self, key: Key) -> Breaker:
        entry = self._logged.get(key)
        return core.from_log(*key, entry[0] if entry else None, self._logged_trials.get(key))

    def history_seconds(self, cap: float) -> float:
        """How much probe history a rebuild must replay: the most any app needs, at most ``cap``."""
        needed = [core.history_needed(self.configs[app], period) for app, period in self.periods.items()]
        return min(cap, max(needed, default=cap))

    def reown(self, owns: Owns | None, gained: Owns | None = None) -> None:
        """Ownership moved: ``owns`` says which keys this member decides for from now on, and
        ``gained`` which of them it did not before; those are rebuilt from the log first."""
        self._owns, self._gained, self._held_back = owns, gained, []
        self._owned.clear()
        if gained is not None:
            for key in self.breakers:
                if gained(*key):
                    self.breakers[key] = self.from_log(key)
        self._retime()

    def replay_probe(self, event: ProbeCompleted) -> list[BreakerStateChanged]:
        """A stored probe, replayed into the breakers being rebuilt (others are skipped); a
        transition their last owner did not live to store is decided here."""
        key = (event.app_name, event.instance_id)
        if self._gained is None or not self._gained(*key):
            return []
        return self._record(key, event.is_healthy, event.response_time_ms, event.timestamp, event.event_id)

    def rebuilt(self) -> list[BreakerStateChanged]:
        """The replay is done: fold the live outcomes held back meanwhile, and decide."""
        held, self._held_back, self._gained = self._held_back, [], None
        self._owned.clear()
        self._retime()
        changes: list[BreakerStateChanged] = []
        for key, success, duration_ms, now, cause in held:
            if self.owns(key):
                changes += self._record(key, success, duration_ms, now, cause)
        return changes

    def resync(self, key: Key) -> None:
        """A transition of ``key`` was refused by the log (another member's came first): start
        again from what the log holds."""
        breaker = self.breakers[key] = self.from_log(key)
        self._timed.discard(key)
        if breaker.state != CLOSED and not breaker.forced and self.owns(key):
            self._timed.add(key)

    def _retime(self) -> None:
        self._timed = {k for k, b in self.breakers.items() if b.state != CLOSED and not b.forced and self.owns(k)}

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
