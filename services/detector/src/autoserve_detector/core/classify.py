"""The seed's failure classification and severity, with the types it named but never detected."""

from __future__ import annotations

from autoserve_events import ErrorKind, FailureType, ProbeCompleted
from autoserve_events.catalogue import Severity

_BY_KIND: dict[ErrorKind, FailureType] = {
    ErrorKind.TIMEOUT: FailureType.HEALTH_CHECK_TIMEOUT,
    ErrorKind.CONNECTION_REFUSED: FailureType.PORT_NOT_LISTENING,
    ErrorKind.CONNECTION_ERROR: FailureType.NETWORK_UNREACHABLE,
    ErrorKind.DNS: FailureType.DNS_RESOLUTION_FAILED,
    ErrorKind.TLS: FailureType.HEALTH_CHECK_ERROR,
    ErrorKind.PROTOCOL_ERROR: FailureType.HEALTH_CHECK_ERROR,
    ErrorKind.REDIRECT_BLOCKED: FailureType.HEALTH_CHECK_ERROR,
    ErrorKind.UNEXPECTED_RESPONSE: FailureType.HEALTH_CHECK_FAILED,
    ErrorKind.UNEXPECTED_STATUS: FailureType.HEALTH_CHECK_FAILED,
}

CRITICAL_TYPES = frozenset(
    {FailureType.CONTAINER_STOPPED, FailureType.CONTAINER_OOM_KILLED, FailureType.APPLICATION_STARTUP_FAILED}
)
CRITICAL_CONSECUTIVE = 5


def classify_probe_failure(result: ProbeCompleted) -> FailureType:
    """``error_kind`` when the prober gave one; else the seed's ``_classify_health_failure``
    on the error text (for results from other producers), with 'refused' made precise."""
    if result.error_kind is not None:
        return _BY_KIND[result.error_kind]
    if not result.error:
        return FailureType.HEALTH_CHECK_FAILED
    text = result.error.lower()
    if "timeout" in text:
        return FailureType.HEALTH_CHECK_TIMEOUT
    if "refused" in text:
        return FailureType.PORT_NOT_LISTENING
    if "connection" in text:
        return FailureType.NETWORK_UNREACHABLE
    if "dns" in text:
        return FailureType.DNS_RESOLUTION_FAILED
    return FailureType.HEALTH_CHECK_ERROR


def severity_of(failure_type: FailureType) -> Severity:
    """The seed's ``_determine_severity``."""
    if failure_type in (FailureType.CONTAINER_STOPPED, FailureType.CONTAINER_OOM_KILLED):
        return "critical"
    if failure_type in (FailureType.APPLICATION_STARTUP_FAILED, FailureType.CONTAINER_RESTART_LOOP):
        return "high"
    if failure_type in (FailureType.HEALTH_CHECK_TIMEOUT, FailureType.HIGH_RESPONSE_TIME):
        return "medium"
    return "low"


def memory_severity(memory_percent: float) -> Severity:
    """The seed's memory rule: above 95 % is high, else medium."""
    return "high" if memory_percent > 95 else "medium"


def is_critical(failure_type: FailureType, severity: Severity, consecutive_count: int) -> bool:
    """The seed's ``FailureEvent.is_critical``."""
    return failure_type in CRITICAL_TYPES or severity == "critical" or consecutive_count >= CRITICAL_CONSECUTIVE
