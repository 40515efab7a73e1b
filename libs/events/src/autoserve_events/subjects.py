"""Subjects: one builder per event, and the wildcards consumers filter on.

``<app>`` and ``<instance>`` are single subject tokens, so names are restricted to
``[A-Za-z0-9_-]``; anything else could split or wildcard a subject.
"""

from __future__ import annotations

import re

from .catalogue import (
    AlertAcknowledged,
    AlertChanged,
    BreakerStateChanged,
    BreakerTrialAdmitted,
    ContainerObserved,
    Event,
    FailureDetected,
    HealthChanged,
    NotificationLogged,
    ProbeCompleted,
    RecoveryExecuted,
    SilenceCreated,
)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

PREFIX = "autoserve"
PROBES_WILDCARD = f"{PREFIX}.probe.>"
EVENTS_WILDCARD = f"{PREFIX}.event.>"
DEADLETTER_WILDCARD = f"{PREFIX}.deadletter.>"
BREAKER_ALLOW_RPC = f"{PREFIX}.rpc.breaker.allow"
# Manual override (``autoserve breaker open|close|reset``): request/reply, the owner answers.
BREAKER_OVERRIDE_RPC = f"{PREFIX}.rpc.breaker.override"
# Request outcomes reported by load balancers and clients: plain NATS, outside every stream.
BREAKER_REPORT_PREFIX = f"{PREFIX}.breaker.report"
BREAKER_REPORT_WILDCARD = f"{BREAKER_REPORT_PREFIX}.*.*"

_STEMS: dict[type[Event], str] = {
    ProbeCompleted: "probe.completed",
    ContainerObserved: "probe.container",
    HealthChanged: "event.health",
    FailureDetected: "event.failure",
    RecoveryExecuted: "event.recovery",
    BreakerStateChanged: "event.breaker",
    BreakerTrialAdmitted: "event.breaker.trial",
}


# Alerting events have one name token: ``autoserve.event.alert.<app>`` for AlertChanged, and
# one more token for the alerter's records, so ``autoserve.event.alert.*`` is alerts only.
_ONE_TOKEN: dict[type[Event], tuple[str, str]] = {
    AlertChanged: ("event.alert", "app_name"),
    AlertAcknowledged: ("event.alert.ack", "app_name"),
    SilenceCreated: ("event.alert.silence", "app_name"),
    NotificationLogged: ("event.alert.nflog", "receiver"),
}
ALERTS_WILDCARD = f"{PREFIX}.event.alert.*"
ALERTING_WILDCARD = f"{PREFIX}.event.alert.>"

# Every breaker event: states (5 tokens) and trials (6 tokens), in stream order.
BREAKER_EVENTS_WILDCARD = f"{PREFIX}.event.breaker.>"


def is_valid_name(name: str) -> bool:
    return bool(NAME_PATTERN.match(name))


def _token(value: str, what: str) -> str:
    if not is_valid_name(value):
        raise ValueError(f"{what} {value!r} is not a valid subject token ([A-Za-z0-9_-]{{1,128}})")
    return value


def subject(event_type: type[Event], app_name: str, instance_id: str) -> str:
    return f"{PREFIX}.{_STEMS[event_type]}.{_token(app_name, 'app_name')}.{_token(instance_id, 'instance_id')}"


def subject_for(event: Event) -> str:
    one = _ONE_TOKEN.get(type(event))
    if one is not None:
        stem, field = one
        return f"{PREFIX}.{stem}.{_token(getattr(event, field), field)}"
    return subject(type(event), event.app_name, event.instance_id)  # type: ignore[attr-defined]


def wildcard(event_type: type[Event], app_name: str = "*", instance_id: str = "*") -> str:
    """Filter subject for one event type, optionally narrowed to an app or instance."""
    return f"{PREFIX}.{_STEMS[event_type]}.{app_name}.{instance_id}"


def breaker_report(app_name: str, instance_id: str) -> str:
    return f"{BREAKER_REPORT_PREFIX}.{_token(app_name, 'app_name')}.{_token(instance_id, 'instance_id')}"


def deadletter(service: str) -> str:
    return f"{PREFIX}.deadletter.{_token(service, 'service')}"
