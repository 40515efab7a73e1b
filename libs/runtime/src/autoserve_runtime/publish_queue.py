"""What the publisher holds, and when it sends, sends again and takes no more input: pure
(no I/O, no asyncio, time passed in), so these rules are tested without a server.

- **Order.** Events wait in submission order. One that must be sent again (its ack did not
  come in time, or JetStream answered with a transient error) goes back to its own place,
  ahead of every newer one.
- **Elections.** While a stream elects a leader, JetStream answers a publish with a 503
  "no responders" status (measured on a 3-node cluster: every publish for 4-6 s after
  the leader was killed), or not at all if the node that had it died. After such a
  failure only one publish is in flight, and the next one waits a pause that doubles from
  ``MIN_PAUSE`` up to ``MAX_PAUSE``: an election costs a few small publishes a second, not
  waves of 512, and publishing goes on within ``MAX_PAUSE`` of the stream being back. The
  first stored ack opens the window again.
- **Nothing is dropped.** Past ``limit`` events not yet stored the queue is *full*: ``add``
  still takes what it is given (a caller within bounds never waits), and the adapters that
  take input wait for room, which comes back once the events pending are down to
  ``resume_at`` (the gap keeps a steady overload from flapping).
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

T = TypeVar("T")

MIN_PAUSE = 0.05
MAX_PAUSE = 0.5
# Errors below 500 that a cluster answers while it moves: the same Nats-Msg-Id still being
# proposed by the last leader (409), and no peers to place on while nodes are away.
TRANSIENT_ERR_CODES = frozenset({10158, 10005})


class Answer(Enum):
    STORED = "stored"
    RETRY = "retry"
    REJECTED = "rejected"


def classify(data: bytes, status: str | None) -> tuple[Answer, str]:
    """What JetStream's reply to a publish says, and why (for a log line). Only a PubAck
    (``{"stream": ..., "seq": ...}``, ``"duplicate": true`` included) means stored."""
    if b'"error"' in data:
        try:
            error = json.loads(data).get("error") or {}
            code, err_code = int(error.get("code") or 0), int(error.get("err_code") or 0)
        except (ValueError, AttributeError, TypeError):
            return Answer.RETRY, f"unreadable reply: {data[:100]!r}"
        why = f"{code}/{err_code} {error.get('description', '')}"
        return (Answer.RETRY if code >= 500 or err_code in TRANSIENT_ERR_CODES else Answer.REJECTED), why
    if b'"seq"' in data:
        return Answer.STORED, ""
    if status is not None:  # 503: no responders, the stream has no leader (or does not exist yet)
        return Answer.RETRY, f"status {status}"
    return Answer.RETRY, f"not a publish ack: {data[:100]!r}"


@dataclass(slots=True)
class PublisherStats:
    submitted: int = 0
    acked: int = 0
    retried: int = 0
    rejected: int = 0
    stalls: int = 0  # times the queue filled and input waited for room
    stalled_seconds: float = 0.0  # how long input waited, stalls that ended


class PublishQueue(Generic[T]):
    """Events to publish (``T``, opaque here), those in flight by key, and those to send again."""

    def __init__(self, *, limit: int, window: int, resume_at: int | None = None) -> None:
        if limit < 1 or window < 1:
            raise ValueError(f"limit and window must be positive, got {limit} and {window}")
        self.limit = limit
        self.resume_at = max(0, limit * 3 // 4 if resume_at is None else min(resume_at, limit - 1))
        self._window = window
        self._buffer: deque[tuple[int, T]] = deque()
        self._again: list[tuple[int, T]] = []  # a heap by submission number
        self._in_flight: dict[int, tuple[int, T, float]] = {}  # key -> (number, event, sent at)
        self._numbers = itertools.count()
        self._keys = itertools.count()
        self._failures = 0  # transient failures since the last stored ack
        self._paused_until = 0.0
        self._full_since = 0.0
        self.full = False
        self.stats = PublisherStats()

    @property
    def pending(self) -> int:
        """Submitted, not yet stored or rejected."""
        return len(self._buffer) + len(self._again) + len(self._in_flight)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def failing(self) -> bool:
        """A transient failure since the last stored ack: one publish at a time, paused."""
        return self._failures > 0

    def add(self, event: T, now: float) -> bool:
        """Queue ``event``; True when this made the queue full (input should wait)."""
        self.stats.submitted += 1
        self._buffer.append((next(self._numbers), event))
        if not self.full and self.pending >= self.limit:
            self.full = True
            self.stats.stalls += 1
            self._full_since = now
            return True
        return False

    def ready(self, now: float) -> float | None:
        """0 if one can be sent now, seconds to wait if paused, None until something changes
        (nothing to send, or the window is full: wait for an ack, an expiry or an ``add``)."""
        if not (self._again or self._buffer):
            return None
        if len(self._in_flight) >= (1 if self._failures else self._window):
            return None
        return max(0.0, self._paused_until - now)

    def take(self, now: float) -> tuple[int, T]:
        """The next event to send (the oldest to send again first) and its key."""
        number, event = heapq.heappop(self._again) if self._again else self._buffer.popleft()
        key = next(self._keys)
        self._in_flight[key] = (number, event, now)
        return key, event

    def stored(self, key: int) -> T | None:
        """JetStream stored it; None if ``key`` was not in flight (expired and sent again)."""
        entry = self._in_flight.pop(key, None)
        if entry is None:
            return None
        self._failures = 0
        self._paused_until = 0.0
        self.stats.acked += 1
        return entry[1]

    def rejected(self, key: int) -> T | None:
        """JetStream refused it for good (too large, say): it leaves the queue."""
        entry = self._in_flight.pop(key, None)
        if entry is not None:
            self.stats.rejected += 1
            return entry[1]
        return None

    def failed(self, key: int, now: float) -> bool:
        """A transient failure: back to its place, and pause; False if not in flight."""
        entry = self._in_flight.pop(key, None)
        if entry is None:
            return False
        self._send_again(entry)
        self._pause(now)
        return True

    def expire(self, now: float, sent_before: float, *, failure: bool = True) -> int:
        """Send again what was sent before ``sent_before`` and is still not answered (its ack
        is lost); with ``failure``, pause as after a transient answer. How many."""
        late = [key for key, (_, _, sent_at) in self._in_flight.items() if sent_at < sent_before]
        for key in late:
            self._send_again(self._in_flight.pop(key))
        if late and failure:
            self._pause(now)
        return len(late)

    def reopen(self, now: float) -> float | None:
        """If the queue was full and is down to ``resume_at``: not full any more, and how
        long input waited. None otherwise."""
        if not self.full or self.pending > self.resume_at:
            return None
        self.full = False
        waited = max(0.0, now - self._full_since)
        self.stats.stalled_seconds += waited
        return waited

    def stalled_for(self, now: float) -> float:
        """How long input has been waiting (0 when not full)."""
        return max(0.0, now - self._full_since) if self.full else 0.0

    def _send_again(self, entry: tuple[int, T, float]) -> None:
        number, event, _ = entry
        self.stats.retried += 1
        heapq.heappush(self._again, (number, event))

    def _pause(self, now: float) -> None:
        self._failures += 1
        pause = min(MAX_PAUSE, MIN_PAUSE * 2 ** min(self._failures - 1, 16))
        self._paused_until = max(self._paused_until, now + pause)
