"""Recovery state as a fold over ``RecoveryExecuted``, ``HealthChanged`` and the panic
announcements (``FailureDetected`` with ``details.panic``): replay is the fold again.

Remediation events carry the escalation level and backoff they left behind in
``details``, so a service that replays only the last hour still restores a backoff that
took longer to build up, exactly.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from autoserve_events import Event, FailureDetected, HealthChanged, RecoveryExecuted, RecoveryStrategy

from .strategies import REMEDIATION, TRAFFIC, rank

HISTORY_PER_INSTANCE = 64  # remediations kept per instance: more than any budget counts
DONE_CAPACITY = 100_000  # failures remembered as handled


@dataclass
class Attempt:
    strategy: RecoveryStrategy
    started_at: float
    ended_at: float
    success: bool


@dataclass
class InstanceState:
    app_name: str
    lineage: str  # the first instance id of this slot; recreated containers inherit it
    current_id: str = ""  # the slot's instance id now (a recreated container's id); "" = lineage
    healthy: bool | None = None
    healthy_since: float | None = None
    ejected: bool = False
    attempts: deque[Attempt] = field(default_factory=lambda: deque(maxlen=HISTORY_PER_INSTANCE))
    level: int = 0  # escalation: index on LADDER where the next remediation starts
    backoff_level: int = 0  # remediations since the last long-enough healthy period
    next_allowed_at: float = 0.0
    last_remediation_end: float = 0.0


@dataclass
class RecoveryState:
    instances: dict[tuple[str, str], InstanceState] = field(default_factory=dict)
    aliases: dict[tuple[str, str], str] = field(default_factory=dict)  # (app, instance id) -> lineage
    health: dict[str, dict[str, bool]] = field(default_factory=dict)  # app -> instance id -> healthy
    actions: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))  # remediation start times
    done: OrderedDict[str, None] = field(default_factory=OrderedDict)  # "<cause id>/<strategy>"
    causes: OrderedDict[str, None] = field(default_factory=OrderedDict)  # cause ids acted on
    panic_announced: dict[str, bool] = field(default_factory=dict)
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)  # event ids folded
    removed: OrderedDict[tuple[str, str], None] = field(default_factory=OrderedDict)  # replaced by recovery

    def instance(self, app_name: str, instance_id: str) -> InstanceState:
        lineage = self.aliases.get((app_name, instance_id), instance_id)
        key = (app_name, lineage)
        if key not in self.instances:
            self.instances[key] = InstanceState(app_name, lineage)
        return self.instances[key]

    def is_done(self, cause_event_id: str, strategy: RecoveryStrategy | str, instance_id: str) -> bool:
        """Whether ``strategy`` (or an operation: "restore") was recorded for this cause
        on this instance (one cause can touch several: a panic restores every ejected one)."""
        return f"{cause_event_id}/{strategy}/{instance_id}" in self.done

    def handled(self, cause_event_id: str) -> bool:
        """Any action recorded for this cause (a failure or a health change)."""
        return cause_event_id in self.causes

    def _mark_done(self, cause: str, operation: str, instance_id: str) -> None:
        for seen, key in ((self.done, f"{cause}/{operation}/{instance_id}"), (self.causes, cause)):
            seen[key] = None
            if len(seen) > DONE_CAPACITY:
                seen.popitem(last=False)

    # -- the fold ------------------------------------------------------------------------

    def apply(self, event: Event) -> None:
        """Fold one event; one already folded (same ``event_id``) changes nothing."""
        if event.event_id in self.seen:
            return
        self.seen[event.event_id] = None
        if len(self.seen) > DONE_CAPACITY:
            self.seen.popitem(last=False)
        if isinstance(event, HealthChanged):
            self._health(event)
        elif isinstance(event, RecoveryExecuted):
            self._recovery(event)
        elif isinstance(event, FailureDetected) and event.details.get("panic") is not None:
            self.panic_announced[event.app_name] = bool(event.details["panic"])

    def _health(self, event: HealthChanged) -> None:
        state = self.instance(event.app_name, event.instance_id)
        self.health.setdefault(event.app_name, {})[event.instance_id] = event.healthy
        state.current_id = event.instance_id
        if event.healthy and not state.healthy:
            state.healthy_since = event.timestamp
        elif not event.healthy:
            state.healthy_since = None
        state.healthy = event.healthy

    def _recovery(self, event: RecoveryExecuted) -> None:
        operation = str(event.details.get("operation", event.strategy))
        self._mark_done(event.failure_event_id or event.event_id, operation, event.instance_id)
        state = self.instance(event.app_name, event.instance_id)
        state.current_id = event.instance_id
        if event.details.get("member_of") is not None:
            # One member of a rolling restart (caused by another instance's failure): its
            # own death during the restart is handled, its budgets are not spent.
            effective = float(event.details.get("effective_at") or event.timestamp)
            state.last_remediation_end = max(state.last_remediation_end, effective)
            return
        if event.strategy in TRAFFIC:
            if event.success:
                state.ejected = event.details.get("operation") != "restore"
            return
        if event.strategy not in REMEDIATION:
            return
        ended = event.timestamp + event.duration_ms / 1000
        state.attempts.append(Attempt(event.strategy, event.timestamp, ended, event.success))
        # Failures before the action took effect (e.g. the die of our own restart) are
        # handled by it; one after it (a crash at start) is a new failure.
        effective = float(event.details.get("effective_at") or ended)
        state.last_remediation_end = max(state.last_remediation_end, effective if event.success else ended)
        self.actions.append(event.timestamp)
        details = event.details
        # The decider wrote the resulting budget state down: take it as is (exact replay).
        state.level = int(details.get("level", state.level if event.success else rank(event.strategy) + 1))
        state.backoff_level = int(details.get("backoff_level", state.backoff_level + 1))
        state.next_allowed_at = float(details.get("next_allowed_at", ended))
        old = details.get("removed_instance_id")
        if old and event.success:
            self.health.get(event.app_name, {}).pop(str(old), None)
            self.removed[(event.app_name, str(old))] = None
            if len(self.removed) > DONE_CAPACITY:
                self.removed.popitem(last=False)
        new = details.get("new_instance_id")
        if new and event.strategy is not RecoveryStrategy.SCALE_OUT:
            # The slot lives on in a new container: same budgets, and the old member is gone.
            self.aliases[(event.app_name, str(new))] = state.lineage
            state.current_id = str(new)
            state.ejected = False

    # -- app-wide views ------------------------------------------------------------------

    def counts(self, app_name: str) -> tuple[int, int]:
        """(instances with a known health, how many of them are unhealthy)."""
        health = self.health.get(app_name, {})
        return len(health), sum(1 for healthy in health.values() if not healthy)

    def unhealthy_share_over(self, app_name: str, percent: float) -> bool:
        total, unhealthy = self.counts(app_name)
        return total >= 2 and unhealthy * 100 > percent * total

    def ejected(self, app_name: str) -> list[InstanceState]:
        return [s for (app, _), s in self.instances.items() if app == app_name and s.ejected]
