"""Delivering notifications: one task each, retried with backoff, never blocking another.

A receiver gets at most ``PER_RECEIVER`` deliveries at a time, so a black-hole receiver
ties up its own slots and timeouts only. A delivery retries (tenacity: 0.5 s doubling to
30 s, plus up to 0.5 s of jitter so that a receiver coming back is not hit by every retry
at once) until it succeeds, fails permanently, or the next try would start after
``retry_for`` (counted from the submit, the wait for a slot too); then ``on_done`` records the
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
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

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
    def __init__(
        self,
        on_done: OnDone,
        *,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.receivers: dict[str, Receiver] = {}
        self._on_done = on_done
        self._slots: dict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(PER_RECEIVER))
        self._tasks: set[asyncio.Task[None]] = set()
        self._initial = initial_backoff
        self._max = max_backoff
        self._clock = clock  # and sleep: a test's own, to check the waits without waiting
        self._sleep = sleep
        self.sent = 0
        self.failed = 0
        self.attempts = 0

    def use(self, receivers: dict[str, Receiver]) -> None:
        """New settings' receivers; one that cannot work is said so now, not at its first alert."""
        self.receivers = receivers
        for name, receiver in receivers.items():
            problem = getattr(receiver, "problem", None)
            if problem:
                log.error("receiver misconfigured; its notifications will fail", receiver=name, problem=problem)

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
        deadline = self._clock() + retry_for  # waiting for a slot counts too
        attempts = 0

        async def attempt() -> None:
            nonlocal attempts
            attempts += 1
            self.attempts += 1
            await asyncio.wait_for(receiver.send(n), receiver.timeout + 1)

        def warn(state: RetryCallState) -> None:
            if state.attempt_number in (1, 5) or state.attempt_number % 20 == 0:
                log.warning("notification retrying", receiver=n.receiver, attempts=state.attempt_number,
                            error=_error(_exception(state), receiver.timeout), retry_in=round(state.upcoming_sleep, 3))  # fmt: skip

        retrying = AsyncRetrying(
            retry=retry_if_exception(_transient),
            wait=wait_exponential_jitter(multiplier=self._initial, max=self._max, jitter=self._initial),
            stop=lambda state: self._clock() + state.upcoming_sleep > deadline,  # no try after retry_for
            before_sleep=warn,
            sleep=self._sleep,
            reraise=True,  # the receiver's own error, not tenacity's RetryError
        )
        async with self._slots[n.receiver]:
            try:
                await retrying(attempt)
            except (DeliveryError, TimeoutError) as exc:
                self._failed(n, attempts, _error(exc, receiver.timeout))
                return
            except Exception as exc:
                # A bug, not an answer: trying again would repeat it, so it fails now, through
                # the same path as any failure (the group tries again a group_interval later).
                # Only the type and place are told: the message may quote the url.
                self._failed(n, attempts, f"unexpected {type(exc).__name__} in the alerter at {_origin(exc)}")
                return
        self.sent += 1
        report = log.debug if n.resend else log.info  # a re-send to Alertmanager every minute: no news
        report("notification sent", receiver=n.receiver, group=n.group_key, status=n.status, tier=n.tier,
               firing=len(n.firing), resolved=len(n.resolved), attempts=attempts, resend=n.resend)  # fmt: skip
        self._on_done(n, "sent", attempts, None)

    def _failed(self, n: Notification, attempts: int, error: str) -> None:
        self.failed += 1
        log.error("notification failed", receiver=n.receiver, group=n.group_key, notification=n.notification_id,
                  attempts=attempts, error=error)  # fmt: skip
        self._on_done(n, "failed", attempts, error)


def _transient(exc: BaseException) -> bool:
    """An answer worth trying again: a timeout, or a delivery error that is not permanent
    (a 3xx or 4xx is, say). Anything else is a bug, and fails at once."""
    return isinstance(exc, TimeoutError) or (isinstance(exc, DeliveryError) and not exc.permanent)


def _exception(state: RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome is not None else None


def _error(exc: BaseException | None, timeout: float) -> str:
    return str(exc) or f"no answer within {timeout + 1:g}s"
