"""The event catalogue: every event the services exchange, as frozen msgspec structs.

Field names are the seed document's, so an operator who knows the seed reads them
directly. Evolution rules (msgspec): new fields get defaults, a field never changes its
type; a breaking change bumps ``schema_version`` and registers an upcaster in ``codec``.
"""

from __future__ import annotations

import enum
import hashlib
import time
import uuid
from typing import Any, Literal

import msgspec


class FailureType(enum.StrEnum):
    """The seed's ``FailureType`` values."""

    HEALTH_CHECK_FAILED = "health_check_failed"
    HEALTH_CHECK_TIMEOUT = "health_check_timeout"
    HEALTH_CHECK_ERROR = "health_check_error"
    HIGH_RESPONSE_TIME = "high_response_time"
    HIGH_ERROR_RATE = "high_error_rate"
    HIGH_RESOURCE_USAGE = "high_resource_usage"
    CONTAINER_STOPPED = "container_stopped"
    CONTAINER_RESTART_LOOP = "container_restart_loop"
    CONTAINER_OOM_KILLED = "container_oom_killed"
    NETWORK_UNREACHABLE = "network_unreachable"
    PORT_NOT_LISTENING = "port_not_listening"
    DNS_RESOLUTION_FAILED = "dns_resolution_failed"
    APPLICATION_STARTUP_FAILED = "application_startup_failed"
    APPLICATION_DEADLOCK = "application_deadlock"
    APPLICATION_MEMORY_LEAK = "application_memory_leak"


class RecoveryStrategy(enum.StrEnum):
    """The seed's ``RecoveryStrategy`` values."""

    RESTART_CONTAINER = "restart_container"
    RECREATE_CONTAINER = "recreate_container"
    REPLACE_INSTANCE = "replace_instance"
    SCALE_OUT = "scale_out"
    DRAIN_INSTANCE = "drain_instance"
    ROLLING_RESTART = "rolling_restart"
    REMOVE_FROM_LB = "remove_from_lb"
    REDIRECT_TRAFFIC = "redirect_traffic"
    CLEAR_CACHE = "clear_cache"
    RESTART_DEPENDENCIES = "restart_dependencies"


class ErrorKind(enum.StrEnum):
    """Why a probe failed, so consumers need not parse error texts."""

    TIMEOUT = "timeout"
    CONNECTION_REFUSED = "connection_refused"
    CONNECTION_ERROR = "connection_error"
    DNS = "dns"
    TLS = "tls"
    UNEXPECTED_STATUS = "unexpected_status"
    UNEXPECTED_RESPONSE = "unexpected_response"
    REDIRECT_BLOCKED = "redirect_blocked"
    PROTOCOL_ERROR = "protocol_error"


Severity = Literal["low", "medium", "high", "critical"]
CheckType = Literal["http", "tcp"]
BreakerState = Literal["closed", "open", "half_open"]

SCHEMA_VERSION = 1


def new_event_id() -> str:
    return uuid.uuid4().hex


def derived_event_id(*parts: object) -> str:
    """An id that is a function of what caused the event: a service that repeats work after
    a crash publishes the same ids, and JetStream's duplicate window drops the copies."""
    return hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=16).hexdigest()


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True, gc=False):
    """Envelope shared by every event. ``event_id`` doubles as the ``Nats-Msg-Id``.

    ``gc=False``: an event never refers back to anything that refers to it, so the cycle
    collector need not track the hundreds of thousands a consumer decodes; fewer tracked
    allocations mean fewer collections in the hot path."""

    event_id: str = msgspec.field(default_factory=new_event_id)
    schema_version: int = SCHEMA_VERSION
    emitted_at: float = msgspec.field(default_factory=time.time)


class ProbeCompleted(Event, frozen=True, kw_only=True):
    """One health check result (the seed's ``HealthCheckResult``)."""

    instance_id: str
    app_name: str
    check_type: CheckType
    is_healthy: bool
    response_time_ms: float
    timestamp: float
    status_code: int | None = None
    response_body: str | None = None
    headers: dict[str, str] = {}
    error: str | None = None
    # Beyond the seed: a machine-readable cause, when the probe was due (consumers see
    # lateness and gaps), and how many attempts ``max_retries`` allowed it.
    error_kind: ErrorKind | None = None
    scheduled_at: float | None = None
    attempts: int = 1


class ContainerObserved(Event, frozen=True, kw_only=True):
    """A Docker event or a stats sample for a container that belongs to an app."""

    instance_id: str
    app_name: str
    container_id: str
    event: str
    timestamp: float
    exit_code: int | None = None
    cpu_percent: float | None = None
    memory_percent: float | None = None
    memory_usage_bytes: int | None = None
    restart_count: int | None = None


class HealthChanged(Event, frozen=True, kw_only=True):
    instance_id: str
    app_name: str
    healthy: bool
    previous: bool | None
    consecutive: int
    reason: str
    timestamp: float


class FailureDetected(Event, frozen=True, kw_only=True):
    failure_type: FailureType
    instance_id: str
    app_name: str
    severity: Severity
    message: str
    timestamp: float
    details: dict[str, Any] = {}
    consecutive_count: int = 1
    total_count: int = 1
    first_occurrence: float | None = None
    is_critical: bool = False
    cause_event_id: str | None = None


class RecoveryExecuted(Event, frozen=True, kw_only=True):
    strategy: RecoveryStrategy
    failure_type: FailureType | None
    instance_id: str
    app_name: str
    success: bool
    timestamp: float
    duration_ms: float
    details: dict[str, Any] = {}
    error: str | None = None
    failure_event_id: str | None = None


class BreakerStateChanged(Event, frozen=True, kw_only=True):
    app_name: str
    instance_id: str
    state: BreakerState
    previous_state: BreakerState | None
    consecutive_failures: int
    consecutive_successes: int
    reason: str
    timestamp: float
    # Beyond the seed, so the state is a fold of these events alone: the breaker's
    # transition count (orders them), an operator's hold (``autoserve breaker open|close``),
    # when an open breaker half-opens, a machine-readable trigger, and what caused it.
    generation: int = 0
    forced: bool = False
    retry_at: float | None = None
    trigger: str = ""
    cause_event_id: str | None = None


class BreakerTrialAdmitted(Event, frozen=True, kw_only=True):
    """A half-open breaker admitted trial request number ``trial`` of its ``generation``:
    recorded so a restarted breaker never admits more than ``max_test_requests``."""

    app_name: str
    instance_id: str
    generation: int
    trial: int
    timestamp: float


AlertStatus = Literal["firing", "acknowledged", "resolved"]
NotificationOutcome = Literal["sent", "failed", "suppressed"]


class AlertChanged(Event, frozen=True, kw_only=True):
    """An alert's transition (the alerter): firing -> acknowledged -> resolved.

    One alert is one episode of one ``failure_type`` on one instance (Alertmanager's alert:
    ``labels``, ``starts_at``, ``ends_at``, ``fingerprint``); ``failure_type`` is the seed's
    value, or ``circuit_breaker_open`` for a breaker. ``alert_id`` is what an operator acks.
    """

    alert_id: str
    app_name: str
    instance_id: str
    status: AlertStatus
    previous_status: AlertStatus | None
    failure_type: str
    severity: Severity
    message: str
    timestamp: float
    starts_at: float
    ends_at: float | None = None
    labels: dict[str, str] = {}
    fingerprint: str = ""
    reason: str = ""
    acknowledged_by: str | None = None
    cause_event_id: str | None = None


class AlertAcknowledged(Event, frozen=True, kw_only=True):
    """``autoserve alerts ack ID``: an operator took an alert; it stops repeating and escalating."""

    alert_id: str
    app_name: str
    acknowledged_by: str
    timestamp: float
    instance_id: str = ""
    comment: str = ""


class SilenceCreated(Event, frozen=True, kw_only=True):
    """A silence (``autoserve alerts silence``) or a maintenance window that began: no
    notification for the app (or one instance) from ``starts_at`` to ``ends_at``; the
    suppressed ones are logged. ``maintenance`` windows may be left out of reports."""

    silence_id: str
    app_name: str
    starts_at: float
    ends_at: float
    created_by: str
    reason: str
    timestamp: float
    instance_id: str = ""  # "" = every instance of the app
    maintenance: bool = False
    window: str = ""  # the config's maintenance window, when it made this


class NotificationLogged(Event, frozen=True, kw_only=True):
    """An entry of the notification log (Alertmanager's nflog): a notification a receiver
    got (``sent``), one given up after retries (``failed``), or alerts held back
    (``suppressed``: silence, maintenance window, failing dependency). Its ``event_id`` is
    the notification's id, derived from the group, receiver, tier and sequence number, so a
    restarted alerter knows what was sent and does not decide it again. Delivery is still at
    least once: a crash (or a lost answer) between the receiver taking a notification and
    this entry being stored repeats it, with the same id for the receiver to drop."""

    receiver: str
    group_key: str
    outcome: NotificationOutcome
    timestamp: float
    app_name: str = ""  # the group's app; "" when the group spans apps
    instance_id: str = ""
    tier: int = 0  # 0: the route's receiver; n: escalation tier n
    seq: int = 0
    firing: list[str] = []
    resolved: list[str] = []
    suppressed: dict[str, str] = {}  # alert_id -> why
    attempts: int = 0
    error: str | None = None


AnyEvent = (
    ProbeCompleted
    | ContainerObserved
    | HealthChanged
    | FailureDetected
    | RecoveryExecuted
    | BreakerStateChanged
    | BreakerTrialAdmitted
    | AlertChanged
    | AlertAcknowledged
    | SilenceCreated
    | NotificationLogged
)

EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        ProbeCompleted,
        ContainerObserved,
        HealthChanged,
        FailureDetected,
        RecoveryExecuted,
        BreakerStateChanged,
        BreakerTrialAdmitted,
        AlertChanged,
        AlertAcknowledged,
        SilenceCreated,
        NotificationLogged,
    )
}
