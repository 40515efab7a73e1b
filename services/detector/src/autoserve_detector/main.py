"""``autoserve run detector``."""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop

from autoserve_runtime import configure_logging

from .service import DetectorService


async def _serve(nats_url: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await DetectorService(nats_url).run(stop)


def run_service(args: argparse.Namespace) -> int:
    configure_logging("detector")
    uvloop.run(_serve(args.nats_url))
    return 0
