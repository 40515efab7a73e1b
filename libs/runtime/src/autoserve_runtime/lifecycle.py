"""Running a service process: signals, the event loop, and an orderly shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterable

import nats.errors
import uvloop
from nats.aio.client import Client

from .logs import configure_logging


def serve(name: str, run: Callable[[asyncio.Event], Awaitable[None]], *, grace_seconds: float = 10.0) -> int:
    """Run ``run(stop)`` on uvloop. SIGTERM or SIGINT sets ``stop`` for an orderly drain; a
    service that has not finished ``grace_seconds`` later (still waiting for NATS, say), or a
    second signal, cancels it. Exit status 0 either way: stopping was asked for."""
    configure_logging(name)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(run(stop))
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                task.cancel()
                return
            stop.set()
            loop.call_later(grace_seconds, task.cancel)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    uvloop.run(main())
    return 0


async def cancel_all(tasks: Iterable[asyncio.Task[object]]) -> None:
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def close_nats(nc: Client) -> None:
    """Drain (flush what is pending); if the server is already gone, just close."""
    try:
        await nc.drain()
    except nats.errors.Error:
        await nc.close()
