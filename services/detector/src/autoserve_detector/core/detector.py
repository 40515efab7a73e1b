"""The failure detector as a fold: ``apply(event)`` updates the state and returns the
events it causes. Time comes from the events themselves, so replaying the same inputs
rebuilds the same state and the same outputs, with the same event ids.

Beyond the seed: a success resets the consecutive count (kubelet, Consul); health starts
unknown and changes only at the thresholds; and the types the seed named but never
detected are detected (see README, "Failure types").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from autoserve_config import DetectorConfig
from autoserve_events import (
    ContainerObserved,
    Event,
    FailureDetected,
    FailureType,
    HealthChanged,
    ProbeCompleted,
    derived_event_id,
)
from autoserve_events.catalogue import Severity

from .classify import classify_probe_failure, is_critical, memory_severity, severity_of
from .thresholds import HealthRun, Transition
from .window import BucketWindow

InstanceKey = tuple[str, str]


@dataclass(frozen=True)
class AppThresholds:
    """What the detector needs of an app's health check (the seed's defaults)."""

    failure_threshold: int = 3
    success_threshold: int = 1
    period_seconds: float = 30


DEFAULT_THRESHOLDS = AppThresholds()
ERROR_RATE_REPEAT_SECONDS = 60.0


@dataclass(slots=True)
class InstanceState:
    window_seconds: float
    health: HealthRun = field(default_factory=HealthRun)
    first_probe_at: float | None = None
    ever_healthy: bool = False
    startup_failure_reported: bool = False
    error_rate_reported_at: float | None = None  # while the error rate is over the threshold
    slow_run: int = 0
    resource_runs: dict[str, int] = field(default_factory=dict)
    died: bool = False
    restart_loop_reported: bool = False
    results: BucketWindow = field(init=False)
    failures: BucketWindow = field(init=False)
    restarts: BucketWindow = field(init=False)

    def __post_init__(self) -> None:
        self.results = BucketWindow(self.window_seconds)
        self.failures = BucketWindow(self.window_seconds)
        self.restarts = BucketWindow(self.window_seconds)


class Detector:
    def __init__(self, settings: DetectorConfig | None = None, apps: Mapping[str, AppThresholds] | None = None) -> None:
        self.settings = settings or DetectorConfig()
        self.apps: dict[str, AppThresholds] = dict(apps or {})
        self.instances: dict[InstanceKey, InstanceState] = {}

    def configure(self, settings: DetectorConfig, apps: Mapping[str, AppThresholds]) -> None:
        if settings.failure_rate_window_minutes != self.settings.failure_rate_window_minutes:
            self.instances.clear()  # windows of another length cannot be carried over
        self.settings = settings
        self.apps = dict(apps)

    @property
    def window_seconds(self) -> float:
        return self.settings.failure_rate_window_minutes * 60

    def apply(self, event: Event) -> list[Event]:
        if isinstance(event, ProbeCompleted):
            return self._on_probe(event)
        if isinstance(event, ContainerObserved):
            return self._on_container(event)
        return []

    def _state(self, app: str, instance: str) -> InstanceState:
        key = (app, instance)
        state = self.instances.get(key)
        if state is None:
            state = self.instances[key] = InstanceState(self.window_seconds)
        return state

    # -- probe results -----------------------------------------------------------------

    def _on_probe(self, probe: ProbeCompleted) -> list[Event]:
        app = self.apps.get(probe.app_name, DEFAULT_THRESHOLDS)
        state = self._state(probe.app_name, probe.instance_id)
        now = probe.timestamp
        out: list[Event] = []
        if state.first_probe_at is None:
            state.first_probe_at = probe.scheduled_at or now
        state.ever_healthy |= probe.is_healthy
        state.results.add(now, "ok" if probe.is_healthy else "failed")

        transition = state.health.observe(probe.is_healthy, app.failure_threshold, app.success_threshold)
        if transition is not None:
            out.append(self._health_changed(probe, transition, app))

        if not probe.is_healthy:
            failure_type = classify_probe_failure(probe)
            message = f"{failure_type.value.replace('_', ' ')}: {probe.error or 'unhealthy'}"
            out.append(self._failure(state, probe, failure_type, message, self._probe_details(probe),
                                     consecutive=state.health.consecutive_failures))  # fmt: skip

        answered = probe.status_code is not None or probe.is_healthy
        if answered and probe.response_time_ms > self.settings.max_response_time_ms:
            state.slow_run += 1
            details = {"response_time_ms": probe.response_time_ms, "threshold": self.settings.max_response_time_ms}
            message = f"High response time: {probe.response_time_ms:.0f}ms"
            out.append(
                self._failure(
                    state, probe, FailureType.HIGH_RESPONSE_TIME, message, details, consecutive=state.slow_run
                )
            )
        else:
            state.slow_run = 0

        out += self._error_rate(state, probe)
        out += self._startup(state, probe, app)
        return out

    def _health_changed(self, probe: ProbeCompleted, transition: Transition, app: AppThresholds) -> HealthChanged:
        if transition.healthy:
            reason = f"{transition.run} consecutive successful probes (success_threshold {app.success_threshold})"
        else:
            reason = (f"{transition.run} consecutive failed probes (failure_threshold {app.failure_threshold}): "
                      f"{probe.error or 'unhealthy'}")  # fmt: skip
        return HealthChanged(
            event_id=derived_event_id(probe.event_id, "health"),
            instance_id=probe.instance_id,
            app_name=probe.app_name,
            healthy=transition.healthy,
            previous=transition.previous,
            consecutive=transition.run,
            reason=reason,
            timestamp=probe.timestamp,
        )

    def _error_rate(self, state: InstanceState, probe: ProbeCompleted) -> list[Event]:
        failed = state.results.count(probe.timestamp, "failed")
        total = failed + state.results.count(probe.timestamp, "ok")
        rate = 100.0 * failed / total if total else 0.0
        high = total >= self.settings.min_probes_for_error_rate and rate > self.settings.max_error_rate_percent
        now = probe.timestamp
        if not high:
            state.error_rate_reported_at = None  # re-armed: the next crossing is reported at once
            return []
        last = state.error_rate_reported_at
        if last is not None and now - last < ERROR_RATE_REPEAT_SECONDS:
            return []
        # The crossing, then once a minute while the rate stays high: a consumer that ages
        # alerts out (the alerter's resolve_timeout) sees it is still going on.
        state.error_rate_reported_at = now
        details = {"error_rate_percent": round(rate, 2), "threshold": self.settings.max_error_rate_percent,
                   "failed": failed, "total": total}  # fmt: skip
        message = f"High error rate: {rate:.1f}% of {total} probes failed"
        return [self._failure(state, probe, FailureType.HIGH_ERROR_RATE, message, details, consecutive=failed)]

    def _startup(self, state: InstanceState, probe: ProbeCompleted, app: AppThresholds) -> list[Event]:
        """Never healthy within ``failure_threshold`` periods of its first probe (which came
        ``initial_delay_seconds`` after the instance appeared)."""
        if state.ever_healthy or state.startup_failure_reported or state.first_probe_at is None:
            return []
        waited = probe.timestamp - state.first_probe_at
        if waited < app.failure_threshold * app.period_seconds:
            return []
        state.startup_failure_reported = True
        details = {"waited_seconds": round(waited, 3), "failure_threshold": app.failure_threshold,
                   "period_seconds": app.period_seconds, "last_error": probe.error}  # fmt: skip
        message = f"Never became healthy within {waited:.0f}s of its first probe"
        return [self._failure(state, probe, FailureType.APPLICATION_STARTUP_FAILED, message, details,
                              consecutive=state.health.consecutive_failures)]  # fmt: skip

    @staticmethod
    def _probe_details(probe: ProbeCompleted) -> dict[str, Any]:
        return {
            "response_time_ms": probe.response_time_ms,
            "status_code": probe.status_code,
            "error": probe.error,
            "error_kind": probe.error_kind.value if probe.error_kind else None,
            "check_type": probe.check_type,
        }

    # -- container observations ----------------------------------------------------------

    def _on_container(self, obs: ContainerObserved) -> list[Event]:
        state = self._state(obs.app_name, obs.instance_id)
        now = obs.timestamp
        details: dict[str, Any] = {"container_id": obs.container_id, "event": obs.event}
        if obs.event == "die":
            state.died = True
            details["exit_code"] = obs.exit_code
            message = f"Container {obs.container_id[:12]} stopped (exit code {obs.exit_code})"
            return [self._failure(state, obs, FailureType.CONTAINER_STOPPED, message, details, consecutive=1)]
        if obs.event == "oom":
            message = f"Container {obs.container_id[:12]} was killed: out of memory"
            return [self._failure(state, obs, FailureType.CONTAINER_OOM_KILLED, message, details, consecutive=1)]
        if obs.event in ("start", "restart"):
            if obs.event == "restart" or state.died:
                state.restarts.add(now, "restart")
            state.died = False
            return self._restart_loop(state, obs, details)
        if obs.event == "stats":
            return self._resources(state, obs)
        return []

    def _restart_loop(self, state: InstanceState, obs: ContainerObserved, details: dict[str, Any]) -> list[Event]:
        restarts = state.restarts.count(obs.timestamp, "restart")
        if restarts <= self.settings.max_restart_count:
            state.restart_loop_reported = False
            return []
        if state.restart_loop_reported:
            return []
        state.restart_loop_reported = True
        details |= {"restarts": restarts, "max_restart_count": self.settings.max_restart_count,
                    "window_minutes": self.settings.failure_rate_window_minutes}  # fmt: skip
        message = f"Container restarted {restarts} times in {self.settings.failure_rate_window_minutes:g} minutes"
        return [self._failure(state, obs, FailureType.CONTAINER_RESTART_LOOP, message, details, consecutive=restarts)]

    def _resources(self, state: InstanceState, obs: ContainerObserved) -> list[Event]:
        out: list[Event] = []
        checks = (
            ("cpu", obs.cpu_percent, self.settings.max_cpu_percent),
            ("memory", obs.memory_percent, self.settings.max_memory_percent),
        )
        for metric, value, threshold in checks:
            if value is None or value <= threshold:
                state.resource_runs[metric] = 0
                continue
            run = state.resource_runs[metric] = state.resource_runs.get(metric, 0) + 1
            severity: Severity = memory_severity(value) if metric == "memory" else "medium"
            details: dict[str, Any] = {f"{metric}_percent": value, "threshold": threshold, "metric": metric}
            if metric == "memory":
                details["memory_bytes"] = obs.memory_usage_bytes
            message = f"High {metric.upper() if metric == 'cpu' else metric} usage: {value:.1f}%"
            out.append(self._failure(state, obs, FailureType.HIGH_RESOURCE_USAGE, message, details,
                                     consecutive=run, severity=severity, kind=metric))  # fmt: skip
        return out

    # -- the one place a FailureDetected is made -----------------------------------------

    def _failure(
        self,
        state: InstanceState,
        cause: ProbeCompleted | ContainerObserved,
        failure_type: FailureType,
        message: str,
        details: dict[str, Any],
        *,
        consecutive: int,
        severity: Severity | None = None,
        kind: str = "",
    ) -> FailureDetected:
        now = cause.timestamp
        state.failures.add(now, failure_type.value)
        severity = severity or severity_of(failure_type)
        return FailureDetected(
            event_id=derived_event_id(cause.event_id, f"failure/{failure_type.value}/{kind}"),
            failure_type=failure_type,
            instance_id=cause.instance_id,
            app_name=cause.app_name,
            severity=severity,
            message=message,
            details=details,
            timestamp=now,
            consecutive_count=consecutive,
            total_count=state.failures.count(now, failure_type.value),
            first_occurrence=state.failures.first_at(now),
            is_critical=is_critical(failure_type, severity, consecutive),
            cause_event_id=cause.event_id,
        )
