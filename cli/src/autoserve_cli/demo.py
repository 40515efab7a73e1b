"""Demo targets for ``make run``: real servers on 127.0.0.1 that behave like apps do.

- web-1 (18081) is always healthy;
- web-2 (18082) fails with 503 for 15 s of every 45 s;
- web-3 (18083) answers every fourth probe too late for its 2 s timeout;
- cache (18091) is a TCP service that answers ``PING`` with ``+PONG``.
"""

from __future__ import annotations

import asyncio
import signal
import time

from aiohttp import web

HOST = "127.0.0.1"


def _steady(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _flapping(_: web.Request) -> web.Response:
    if time.time() % 45 < 15:
        return web.json_response({"status": "degraded"}, status=503)
    return web.json_response({"status": "ok"})


def _sometimes_slow() -> web.RequestHandler:
    calls = 0

    async def handler(_: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls % 4 == 0:
            await asyncio.sleep(3)
        return web.json_response({"status": "ok"})

    return handler


async def _pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            if line.strip().upper() == b"PING":
                writer.write(b"+PONG\r\n")
                await writer.drain()
    finally:
        writer.close()


async def serve() -> None:
    runners = []
    for port, handler in ((18081, _steady), (18082, _flapping), (18083, _sometimes_slow())):
        app = web.Application()
        app.router.add_get("/health", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port).start()
        runners.append(runner)
    tcp = await asyncio.start_server(_pong, HOST, 18091)
    print("demo targets listening on 127.0.0.1:18081-18083 (HTTP) and 18091 (TCP)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    tcp.close()
    for runner in runners:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve())
