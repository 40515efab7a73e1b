"""The due-time timer: steps when due, sleeps until the next due time or a wake-up, and a
step that raises is counted and ticked past, never the end of the timer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from autoserve_runtime.timer import DueTimer


async def run_until(timer: DueTimer, done: Callable[[], bool], timeout: float = 5.0) -> None:
    task = asyncio.create_task(timer.run())
    try:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert done(), "the timer did not get there in time"
    finally:
        task.cancel()


async def test_nothing_due_sleeps_until_woken() -> None:
    steps: list[float] = []
    timer = DueTimer("t", lambda now: steps.append(now), min_wait=0.001, max_wait=30.0)
    await run_until(timer, lambda: len(steps) == 1)
    await asyncio.sleep(0.05)
    assert len(steps) == 1, "nothing was due: no second step before a wake-up"
    timer.wakeup.set()
    await run_until(timer, lambda: len(steps) >= 2)


async def test_steps_again_at_the_due_time_it_returned() -> None:
    steps: list[float] = []

    def step(now: float) -> float:
        steps.append(now)
        return now + 0.02

    timer = DueTimer("t", step, min_wait=0.001, max_wait=30.0)
    await run_until(timer, lambda: len(steps) >= 3)
    assert steps[1] - steps[0] >= 0.015


async def test_a_step_that_raises_is_counted_and_the_timer_goes_on() -> None:
    calls: list[float] = []

    def step(now: float) -> float | None:
        calls.append(now)
        if len(calls) <= 2:
            raise RuntimeError("a bug in a decision")
        return None

    timer = DueTimer("t", step, min_wait=0.001, max_wait=30.0)
    await run_until(timer, lambda: len(calls) >= 3)
    assert timer.errors == 2


async def test_a_due_time_already_past_waits_min_wait_not_a_spin() -> None:
    calls: list[float] = []
    timer = DueTimer("t", lambda now: calls.append(now) or now - 10, min_wait=0.02, max_wait=30.0)
    await run_until(timer, lambda: len(calls) >= 3)
    assert calls[2] - calls[0] >= 0.035, "each step waited at least min_wait"
