"""AutoServe Health runtime: NATS connection, embedded nats-server, provisioning, publishing."""

from .admission import Admission
from .bus import DEFAULT_NATS_URL, NatsUnavailable, connect
from .config_watch import follow_apps, follow_detector_settings, follow_setting
from .consumer import ConsumerSpec, EventConsumer, SeenIds, dead_letter_headers
from .feed import Feed, start_sequence, subscribe_from
from .lifecycle import close_nats, serve
from .logs import configure_logging
from .nats_server import EmbeddedNatsServer, NatsServerError, bindable, free_port, nats_server_binary
from .observability import (
    EVENTS_IN,
    HANDLER_SECONDS,
    Endpoint,
    add_check,
    add_counter,
    add_gauge,
    count_published,
    dead_lettered,
    endpoint_for,
    instrument,
    request_endpoint,
    watch_consumer,
    watch_publisher,
)
from .process import spawn_child, stop_child
from .provisioning import ReplicasError, live_keys, provision, stream_replicas
from .publisher import EventPublisher, PublisherStats
from .pull import PullConsumer, PullStats
from .tasks import cancel_all

__all__ = [
    "DEFAULT_NATS_URL",
    "EVENTS_IN",
    "HANDLER_SECONDS",
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
    "PullConsumer",
    "PullStats",
    "ReplicasError",
    "SeenIds",
    "add_check",
    "add_counter",
    "add_gauge",
    "bindable",
    "cancel_all",
    "close_nats",
    "configure_logging",
    "connect",
    "count_published",
    "dead_letter_headers",
    "dead_lettered",
    "endpoint_for",
    "follow_apps",
    "follow_detector_settings",
    "follow_setting",
    "free_port",
    "instrument",
    "live_keys",
    "nats_server_binary",
    "provision",
    "request_endpoint",
    "serve",
    "spawn_child",
    "start_sequence",
    "stop_child",
    "stream_replicas",
    "subscribe_from",
    "watch_consumer",
    "watch_publisher",
]
