"""Running a service process: signals, the event loop, health and metrics, and an orderly
shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Awaitable, Callable

import nats.errors
import structlog
import uvloop
from nats.aio.client import Client

from . import observability
from .logs import configure_logging

log = structlog.get_logger("autoserve.lifecycle")


def _ready_event_of(run: Callable[..., object]) -> asyncio.Event | None:
    """A service object's ``ready`` event, when ``run`` is its bound ``run`` method: every
    service sets it once replayed and consuming, so readiness needs no extra line."""
    ready = getattr(getattr(run, "__self__", None), "ready", None)
    return ready if isinstance(ready, asyncio.Event) else None


def serve(
    name: str,
    run: Callable[[asyncio.Event], Awaitable[None]],
    *,
    grace_seconds: float = 10.0,
    ready: asyncio.Event | None = None,
    endpoint: observability.Endpoint | None = None,
) -> int:
    """Run ``run(stop)`` on uvloop. SIGTERM or SIGINT sets ``stop`` for an orderly drain; a
    service that has not finished ``grace_seconds`` later (still waiting for NATS, say), or a
    second signal, cancels it. Exit status 0 either way: stopping was asked for.

    ``/healthz``, ``/readyz`` and ``/metrics`` are served on ``endpoint`` (default: the
    ``--metrics-port`` flag, ``AUTOSERVE_METRICS_PORT``, or the service's fixed port; see
    ``observability.endpoint_for``) from the start until the drain is over. ``/readyz``
    waits for ``ready`` (default: the ``ready`` event of the object ``run`` belongs to)."""
    configure_logging(name)
    try:
        where = endpoint or observability.endpoint_for(name)
    except ValueError as exc:
        raise SystemExit(f"autoserve run {name}: {exc}") from None
    ready = ready or _ready_event_of(run)
    observability.begin(observability.base_service(name), ready)

    async def main() -> None:
        stop = asyncio.Event()
        server = observability.HealthServer(where)
        if where.port:
            await server.start()
        task = asyncio.ensure_future(run(stop))
        freezer = asyncio.ensure_future(freeze_startup_heap(ready)) if ready is not None else None
        loop = asyncio.get_running_loop()

        def cancel(why: str, again: bool = False) -> None:
            if task.done():
                return
            if not again:
                log.warning("stopping by cancellation", service=name, why=why)
            task.cancel()
            # A cancellation can be swallowed: Python 3.11's wait_for loses it when its inner
            # future finishes at the same moment (a refused connect while waiting for NATS,
            # seen in CI). So ask again until the service has stopped.
            loop.call_later(1.0, cancel, why, True)

        def on_signal() -> None:
            if stop.is_set():
                cancel("a second signal")
                return
            observability.mark_stopping()
            stop.set()
            loop.call_later(grace_seconds, cancel, f"not drained within {grace_seconds:g}s")

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            if freezer is not None:
                freezer.cancel()
            await server.stop()

    uvloop.run(main())
    return 0


async def freeze_startup_heap(ready: asyncio.Event) -> None:
    """Once the service is ready, what its start built (modules, the state its replay
    folded) lives as long as the process: move it out of the cycle collector's reach
    (``gc.freeze``), so a full collection scans only what came after. Those scans of
    the whole heap were the detector's periodic latency spikes."""
    await ready.wait()
    gc.collect()
    gc.freeze()
    log.info("startup heap frozen", objects=gc.get_freeze_count())


async def close_nats(nc: Client) -> None:
    """Drain (flush what is pending); if the server is already gone, just close."""
    try:
        await nc.drain()
    except nats.errors.Error:
        await nc.close()
