"""AutoServe Health runtime: NATS connection, embedded nats-server, provisioning, publishing."""

from .admission import Admission
from .bus import DEFAULT_NATS_URL, NatsUnavailable, connect, provision
from .config_watch import follow_apps, follow_detector_settings
from .consumer import ConsumerSpec, EventConsumer, SeenIds
from .feed import Feed, start_sequence, subscribe_from
from .lifecycle import cancel_all, close_nats, serve
from .logs import configure_logging
from .nats_server import EmbeddedNatsServer, NatsServerError, free_port, nats_server_binary
from .observability import (
    Endpoint,
    add_check,
    add_counter,
    add_gauge,
    count_published,
    endpoint_for,
    instrument,
    request_endpoint,
    watch_consumer,
    watch_publisher,
)
from .process import spawn_child, stop_child
from .publisher import EventPublisher, PublisherStats

__all__ = [
    "DEFAULT_NATS_URL",
    "Admission",
    "ConsumerSpec",
    "EmbeddedNatsServer",
    "Endpoint",
    "EventConsumer",
    "EventPublisher",
    "Feed",
    "NatsServerError",
    "NatsUnavailable",
    "PublisherStats",
    "SeenIds",
    "add_check",
    "add_counter",
    "add_gauge",
    "cancel_all",
    "close_nats",
    "configure_logging",
    "connect",
    "count_published",
    "endpoint_for",
    "follow_apps",
    "follow_detector_settings",
    "free_port",
    "instrument",
    "nats_server_binary",
    "provision",
    "request_endpoint",
    "serve",
    "spawn_child",
    "start_sequence",
    "stop_child",
    "subscribe_from",
    "watch_consumer",
    "watch_publisher",
]
