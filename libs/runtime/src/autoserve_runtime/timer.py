"""The timer of a core that has due times: tick, then sleep until the next one.

A core answers "what is due now" (``step(now)``) and "when is the next thing due" (its
return value). The timer sleeps until then, at most ``max_wait``, or until ``wakeup`` is
set by an input that may have made something due sooner. The wake flag is cleared before
the step, so an input folded while it runs wakes the next sleep at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("autoserve.timer")

ERROR_LOG_EVERY = 60.0  # a step that keeps failing is logged once a minute, with a count


class DueTimer:
    def __init__(
        self,
        name: str,
        step: Callable[[float], float | None],
        *,
        min_wait: float,
        max_wait: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._step = step  # returns the next due time, or None when nothing is due
        self.min_wait = min_wait  # after a failed step, or a due time already past: never a spin
        self.max_wait = max_wait  # bounds the sleep anyway (a due time not foreseen, a clock step)
        self._clock = clock
        self.wakeup = asyncio.Event()
        self.errors = 0

    async def run(self) -> None:
        logged_at = float("-inf")
        while True:
            self.wakeup.clear()
            wait = self.min_wait
            try:
                due = self._step(self._clock())
                wait = self.max_wait if due is None else max(due - self._clock(), self.min_wait)
            except Exception:
                # One bad decision must not stop every later one: log it and go on.
                self.errors += 1
                if time.monotonic() - logged_at >= ERROR_LOG_EVERY:
                    logged_at = time.monotonic()
                    log.exception(f"{self.name} tick failed; ticking on", errors=self.errors)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), min(wait, self.max_wait))
