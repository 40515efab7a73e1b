"""Serving a small aiohttp app on 127.0.0.1 for the length of a test."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator

from aiohttp import web

LOCALHOST = "127.0.0.1"


@contextlib.asynccontextmanager
async def serving_app(
    app: web.Application, port: int, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[None]:
    """``app`` answers on 127.0.0.1:``port`` (no access log) until the block ends."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, LOCALHOST, port, ssl_context=ssl_context).start()
        yield
    finally:
        await runner.cleanup()
