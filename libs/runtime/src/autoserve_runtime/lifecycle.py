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


def serve(name: str, run: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run ``run(stop)`` on uvloop until SIGTERM or SIGINT sets ``stop``; exit status 0."""
    configure_logging(name)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(stop)

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
