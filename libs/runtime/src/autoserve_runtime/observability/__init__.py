"""Health and metrics for every service: ``/healthz``, ``/readyz`` and ``/metrics``.

``serve()`` starts one endpoint server per process; what it reports is gathered here,
process-wide, in three parts and what they share:

- ``server``: the endpoint (which host and port, the aiohttp server, the loop-lag gauge);
- ``health``: readiness, the checks ``/readyz`` lists, and draining on SIGTERM;
- ``metrics``: the counters and the collector ``/metrics`` reads at scrape time;
- ``watched``: the NATS clients, consumers and publishers both of them read.
"""

from __future__ import annotations

from .health import STATE, add_check, begin, mark_stopping, readiness, reasons, remove_check
from .metrics import (
    DEAD_LETTERS,
    EVENTS_IN,
    EVENTS_OUT,
    HANDLER_SECONDS,
    PROBES,
    REGISTRY,
    SAMPLE_EVERY,
    SCRAPED,
    Reader,
    Tally,
    add_counter,
    add_gauge,
    count_published,
    dead_letter_reason,
    dead_lettered,
    instrument,
    metrics_text,
    refresh_consumer_info,
)
from .server import (
    DEFAULT_HOST,
    DEFAULT_PORTS,
    HOST_ENV,
    PORT_ENV,
    SHARD_PORT_STEP,
    Endpoint,
    HealthServer,
    base_service,
    endpoint_for,
    request_endpoint,
)
from .watched import WATCHED, watch_consumer, watch_durable, watch_nats, watch_publisher

__all__ = [
    "DEAD_LETTERS",
    "DEFAULT_HOST",
    "DEFAULT_PORTS",
    "EVENTS_IN",
    "EVENTS_OUT",
    "HANDLER_SECONDS",
    "HOST_ENV",
    "PORT_ENV",
    "PROBES",
    "REGISTRY",
    "SAMPLE_EVERY",
    "SCRAPED",
    "SHARD_PORT_STEP",
    "STATE",
    "WATCHED",
    "Endpoint",
    "HealthServer",
    "Reader",
    "Tally",
    "add_check",
    "add_counter",
    "add_gauge",
    "base_service",
    "begin",
    "count_published",
    "dead_letter_reason",
    "dead_lettered",
    "endpoint_for",
    "instrument",
    "mark_stopping",
    "metrics_text",
    "readiness",
    "reasons",
    "refresh_consumer_info",
    "remove_check",
    "request_endpoint",
    "watch_consumer",
    "watch_durable",
    "watch_nats",
    "watch_publisher",
]
