"""AutoServe Health runtime: NATS connection, embedded nats-server, provisioning, publishing."""

from .bus import DEFAULT_NATS_URL, NatsUnavailable, connect, provision
from .config_watch import follow_apps, follow_detector_settings
from .consumer import ConsumerSpec, EventConsumer, SeenIds
from .lifecycle import cancel_all, close_nats, serve
from .logs import configure_logging
from .nats_server import EmbeddedNatsServer, NatsServerError, free_port, nats_server_binary
from .process import spawn_child, stop_child
from .publisher import EventPublisher, PublisherStats

__all__ = [
    "DEFAULT_NATS_URL",
    "ConsumerSpec",
    "EmbeddedNatsServer",
    "EventConsumer",
    "EventPublisher",
    "NatsServerError",
    "NatsUnavailable",
    "PublisherStats",
    "SeenIds",
    "cancel_all",
    "close_nats",
    "configure_logging",
    "connect",
    "follow_apps",
    "follow_detector_settings",
    "free_port",
    "nats_server_binary",
    "provision",
    "serve",
    "spawn_child",
    "stop_child",
]
