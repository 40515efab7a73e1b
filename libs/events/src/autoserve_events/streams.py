"""JetStream streams and the configuration KV bucket, as plain specs.

Provisioning (creating or updating them on a server) lives in ``autoserve_runtime``;
this module only says what they are, so every service agrees on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .subjects import DEADLETTER_WILDCARD, EVENTS_WILDCARD, PROBES_WILDCARD

PROBES_STREAM = "AUTOSERVE_PROBES"
EVENTS_STREAM = "AUTOSERVE_EVENTS"
APPS_BUCKET = "autoserve-apps"
SETTINGS_BUCKET = "autoserve-settings"

HOUR = 3600.0
DAY = 24 * HOUR
# JetStream drops a publish whose Nats-Msg-Id it saw within this window.
DUPLICATE_WINDOW_SECONDS = 120.0


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    max_age_seconds: float
    description: str
    duplicate_window_seconds: float = DUPLICATE_WINDOW_SECONDS


def stream_specs(
    probes_max_age_seconds: float = DAY, events_max_age_seconds: float = 30 * DAY
) -> tuple[StreamSpec, ...]:
    """High-volume, short-lived probe results; the long-lived audit trail of events.

    Dead letters live with the audit trail: an operator inspects them there.
    RPC and breaker-report subjects stay outside every stream on purpose: JetStream's
    publish ack would race the reply.
    """
    return (
        StreamSpec(
            PROBES_STREAM,
            (PROBES_WILDCARD,),
            probes_max_age_seconds,
            "Probe results and container observations",
        ),
        StreamSpec(
            EVENTS_STREAM,
            (EVENTS_WILDCARD, DEADLETTER_WILDCARD),
            events_max_age_seconds,
            "Health, failure, recovery and breaker events; dead letters",
        ),
    )
