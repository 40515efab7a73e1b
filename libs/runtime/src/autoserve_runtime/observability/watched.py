"""What the process watches: its NATS clients, durable consumers and publishers.

Readiness checks them (connected, bound) and ``/metrics`` exports them (counts, lag). Each
is held by weak reference: the service keeps it, and a dropped one disappears from both.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nats.aio.client import Client

    from ..consumer import EventConsumer
    from ..publisher import EventPublisher
    from ..pull import PullConsumer


@dataclass
class _Watched:
    nats: weakref.WeakValueDictionary[int, Client] = field(default_factory=weakref.WeakValueDictionary)
    consumers: dict[int, tuple[str, weakref.ref[EventConsumer | PullConsumer]]] = field(default_factory=dict)
    publishers: dict[int, tuple[str, weakref.ref[EventPublisher]]] = field(default_factory=dict)


WATCHED = _Watched()


def watch_nats(nc: Client) -> None:
    """Readiness wants every live client connected (``connect`` and ``watch_publisher`` call this)."""
    WATCHED.nats[id(nc)] = nc


def watch_publisher(service: str, publisher: EventPublisher) -> None:
    """Export ``publisher.stats``; its NATS connection counts for readiness."""
    WATCHED.publishers[id(publisher)] = (service, weakref.ref(publisher))
    watch_nats(publisher._js._nc)


def watch_durable(service: str, consumer: EventConsumer | PullConsumer) -> None:
    """Export ``consumer.stats`` and its durable's lag; readiness waits until it is bound."""
    WATCHED.consumers[id(consumer)] = (service, weakref.ref(consumer))


def watch_consumer(service: str, consumer: EventConsumer) -> None:
    """``watch_durable``, and its publisher is watched too. Idempotent."""
    watch_durable(service, consumer)
    watch_publisher(service, consumer._publisher)


def live(refs: dict[int, tuple[str, weakref.ref[Any]]]) -> Iterator[tuple[str, Any]]:
    """The watched objects still alive, with their service; forgets the others."""
    for key, (service, ref) in list(refs.items()):
        obj = ref()
        if obj is None:
            refs.pop(key, None)
        else:
            yield service, obj


def bound(consumer: EventConsumer | PullConsumer) -> bool:
    return consumer._sub is not None
