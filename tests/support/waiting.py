"""Waiting for a condition with a deadline: the one poll loop of the tests (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

Condition = Callable[[], bool | Awaitable[bool]]


async def wait_for(condition: Condition, timeout: float = 15.0, what: str = "condition", every: float = 0.05) -> None:
    """Poll ``condition`` (plain or async) every ``every`` seconds until it holds; fail with
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if await result if inspect.isawaitable(result) else result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(every)
