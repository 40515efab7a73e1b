"""One incident as the audit trail records it: failure → unhealthy → recovery → healthy."""

from __future__ import annotations

from autoserve_events import Event, FailureDetected, FailureType, HealthChanged, RecoveryExecuted, RecoveryStrategy


def incident_events(
    app: str,
    instance: str,
    at: float,
    ttr: float,
    strategy: RecoveryStrategy = RecoveryStrategy.RESTART_CONTAINER,
) -> list[Event]:
    """The events of one incident starting at ``at`` and healthy again ``ttr`` seconds later."""

    def health(healthy: bool, consecutive: int, reason: str, timestamp: float) -> HealthChanged:
        return HealthChanged(instance_id=instance, app_name=app, healthy=healthy, previous=not healthy,
                             consecutive=consecutive, reason=reason, timestamp=timestamp)  # fmt: skip

    failure = FailureDetected(failure_type=FailureType.PORT_NOT_LISTENING, instance_id=instance, app_name=app,
                              severity="low", message="refused", timestamp=at)  # fmt: skip
    return [
        failure,
        health(False, 3, "3 failures", at + 1),
        RecoveryExecuted(
            strategy=strategy,
            failure_type=failure.failure_type,
            instance_id=instance,
            app_name=app,
            success=True,
            timestamp=at + 2,
            duration_ms=300.0,
            failure_event_id=failure.event_id,
        ),
        health(True, 1, "recovered", at + ttr),
    ]
