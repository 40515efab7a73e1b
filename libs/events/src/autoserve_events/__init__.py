"""AutoServe Health event catalogue: events, subjects, streams and codec."""

from .catalogue import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    AnyEvent,
    BreakerStateChanged,
    ContainerObserved,
    ErrorKind,
    Event,
    FailureDetected,
    FailureType,
    HealthChanged,
    ProbeCompleted,
    RecoveryExecuted,
    RecoveryStrategy,
    new_event_id,
)
from .codec import MalformedEvent, decode, encode, headers_for, register_upcaster
from .streams import APPS_BUCKET, EVENTS_STREAM, PROBES_STREAM, SETTINGS_BUCKET, StreamSpec, stream_specs
from .subjects import deadletter, is_valid_name, subject, subject_for, wildcard

__all__ = [
    "APPS_BUCKET",
    "EVENTS_STREAM",
    "EVENT_TYPES",
    "PROBES_STREAM",
    "SCHEMA_VERSION",
    "SETTINGS_BUCKET",
    "AnyEvent",
    "BreakerStateChanged",
    "ContainerObserved",
    "ErrorKind",
    "Event",
    "FailureDetected",
    "FailureType",
    "HealthChanged",
    "MalformedEvent",
    "ProbeCompleted",
    "RecoveryExecuted",
    "RecoveryStrategy",
    "StreamSpec",
    "deadletter",
    "decode",
    "encode",
    "headers_for",
    "is_valid_name",
    "new_event_id",
    "register_upcaster",
    "stream_specs",
    "subject",
    "subject_for",
    "wildcard",
]
