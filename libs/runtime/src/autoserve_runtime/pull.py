"""A durable pull consumer a service fetches from by itself, watched as ``EventConsumer`` is.

``EventConsumer`` (``consumer.py``) pushes inputs to a fold; a service that fetches from a
durable pull consumer itself (the recovery service's work queue, shared by its replicas)
counts into a ``PullConsumer`` instead, and gets the same ``/metrics`` and ``/readyz``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .observability.watched import watch_durable, watch_nats

if TYPE_CHECKING:
    from nats.js import JetStreamContext


@dataclass
class PullStats:
    """What a service that fetches from a durable pull consumer itself counts (the same
    names as ``ConsumerStats``, so ``/metrics`` exports both alike)."""

    received: int = 0  # deliveries, redeliveries (deferred inputs) included
    duplicates: int = 0
    dead_lettered: int = 0
    outputs: int = 0
    replayed: int = 0
    acked_seq: int = 0  # the highest stream sequence acknowledged
    resumed: int = 0  # stays 0: a fetch's lost messages come back after ack_wait (explicit acks)


@dataclass(frozen=True)
class _Durable:
    stream: str
    durable: str


class PullConsumer:
    """``/metrics`` and ``/readyz`` for a durable pull consumer: the service counts into
    ``stats`` and marks it ``bound``; its lag is asked of JetStream at scrape time. Watched
    by weak reference: the service keeps it."""

    def __init__(self, service: str, js: JetStreamContext, stream: str, durable: str) -> None:
        self._js = js
        self._spec = _Durable(stream, durable)
        self._sub: object | None = None
        self.stats = PullStats()
        watch_durable(service, self)
        with contextlib.suppress(AttributeError):
            watch_nats(js._nc)

    def bound(self, sub: object) -> None:
        """The subscription fetches from now on (readiness waits for it)."""
        self._sub = sub

    def acked(self, seq: int) -> None:
        self.stats.acked_seq = max(self.stats.acked_seq, seq)
