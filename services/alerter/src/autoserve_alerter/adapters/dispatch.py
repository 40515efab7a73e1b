"""Delivering notifications: one task each, retried with backoff, never blocking another.

A receiver gets at most ``PER_RECEIVER`` deliveries at a time, so a black-hole receiver
ties up its own slots and timeouts only. A delivery retries (0.5 s doubling to 30 s) until
it succeeds, fails permanently, or ``retry_for`` has passed; then ``on_done`` records the
outcome (the notification log entry). Every way a delivery ends reaches ``on_done``, an
unexpected exception too (as ``failed``): otherwise the core would hold the notification in
flight for ever and its group would never notify again.

A retry after a timeout can repeat a message the receiver did take (the answer was lost):
delivery is at least once, and every copy carries the same notification id.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import structlog

from autoserve_events.catalogue import NotificationOutcome

from ..core.notification import Notification
from .receivers import DeliveryError, Receiver

log = structlog.get_logger("autoserve.alerter.dispatch")

PER_RECEIVER = 16
OnDone = Callable[[Notification, NotificationOutcome, int, str | None], None]


def _origin(exc: BaseException) -> str:
    """``file.py:123`` where an exception was raised: enough to find the bug, and unlike the
    message it cannot quote a secret (a receiver's url)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "unknown"


class Dispatcher:
    def __init__(self, on_done: OnDone, *, initial_backoff: float = 0.5, max_backoff: float = 30.0) -> None:
        self.receivers: dict[str, Receiver] = {}
        self._on_done = on_done
        self._slots: dict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(PER_RECEIVER))
        self._tasks: set[asyncio.Task[None]] = set()
        self._initial = initial_backoff
        self._max = max_backoff
        self.sent = 0
        self.failed = 0
        self.attempts = 0

    def submit(self, notification: Notification) -> None:
        task = asyncio.create_task(self._deliver(notification), name=f"notify:{notification.receiver}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _deliver(self, n: Notification) -> None:
        receiver = self.receivers.get(n.receiver)
        if receiver is None:
            self.failed += 1
            self._on_done(n, "failed", 0, f"receiver {n.receiver!r} is not configured")
            return
        retry_for = receiver.retry_for if n.retry_for is None else min(receiver.retry_for, n.retry_for)
        deadline = time.monotonic() + retry_for
        delay, attempts = self._initial, 0
        async with self._slots[n.receiver]:
            while True:
                attempts += 1
                self.attempts += 1
                try:
                    await asyncio.wait_for(receiver.send(n), receiver.timeout + 1)
                except (DeliveryError, TimeoutError) as exc:
                    error = str(exc) or f"no answer within {receiver.timeout + 1:g}s"
                    permanent = isinstance(exc, DeliveryError) and exc.permanent
                    if permanent or time.monotonic() + delay > deadline:
                        self.failed += 1
                        log.error("notification failed", receiver=n.receiver, group=n.group_key,
                                  notification=n.notification_id, attempts=attempts, error=error)  # fmt: skip
                        self._on_done(n, "failed", attempts, error)
                        return
                    if attempts in (1, 5) or attempts % 20 == 0:
                        log.warning("notification retrying", receiver=n.receiver, attempts=attempts, error=error,
                                    retry_in=delay)  # fmt: skip
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._max)
                    continue
                except Exception as exc:
                    # A bug, not an answer: trying again would repeat it, so it fails now, through
                    # the same path as any failure (the group tries again a group_interval later).
                    # Only the type and place are told: the message may quote the url.
                    self.failed += 1
                    error = f"unexpected {type(exc).__name__} in the alerter at {_origin(exc)}"
                    log.error("notification failed", receiver=n.receiver, group=n.group_key,
                              notification=n.notification_id, attempts=attempts, error=error)  # fmt: skip
                    self._on_done(n, "failed", attempts, error)
                    return
                self.sent += 1
                report = log.debug if n.resend else log.info  # a re-send to Alertmanager every minute: no news
                report("notification sent", receiver=n.receiver, group=n.group_key, status=n.status, tier=n.tier,
                       firing=len(n.firing), resolved=len(n.resolved), attempts=attempts, resend=n.resend)  # fmt: skip
                self._on_done(n, "sent", attempts, None)
                return
