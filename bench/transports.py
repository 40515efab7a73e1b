"""Why the prober's HTTP client is aiohttp: 64 concurrent GETs to one nginx, requests per
CPU-second of the client process, for each candidate client.

``run_variant`` runs one variant in a subprocess of its own (``python bench/transports.py
VARIANT URL SECONDS``), so no two share a loop, a pool or warm caches. Each subprocess
prints one JSON line. Everything runs on uvloop, as the prober does.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

CONCURRENCY = 64
MAX_REQUESTS = 200_000  # per worker: a count bound on top of the time bound

# variant -> what it is, for the table
VARIANTS: dict[str, str] = {
    "httpx-default": "httpx.AsyncClient() defaults (100 connections, 20 kept alive)",
    "httpx-tuned": "httpx.AsyncClient(limits=Limits(max_connections=128, max_keepalive_connections=128))",
    "httpx-aiohttp": "httpx.AsyncClient(transport=httpx_aiohttp.AiohttpTransport(...)), limits raised",
    "aiohttp-keepalive": "aiohttp.ClientSession(TCPConnector(limit=128))",
    "aiohttp-new-conn": "aiohttp.ClientSession(TCPConnector(force_close=True)): a new connection per request",
}

Get = Callable[[], Awaitable[int]]


async def _client(variant: str, url: str, stack: AsyncExitStack) -> Get:
    if variant.startswith("httpx"):
        import httpx

        limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
        if variant == "httpx-default":
            client = httpx.AsyncClient()
        elif variant == "httpx-tuned":
            client = httpx.AsyncClient(limits=limits)
        else:
            from httpx_aiohttp import AiohttpTransport

            client = httpx.AsyncClient(transport=AiohttpTransport(limits=limits))
        await stack.enter_async_context(client)

        async def get_httpx() -> int:
            response = await client.get(url)
            return response.status_code

        return get_httpx

    import aiohttp

    connector = aiohttp.TCPConnector(limit=128, force_close=variant == "aiohttp-new-conn")
    session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))

    async def get_aiohttp() -> int:
        async with session.get(url) as response:
            await response.read()
            return response.status

    return get_aiohttp


async def measure(variant: str, url: str, seconds: float) -> dict[str, float]:
    """Warm up for 0.5 s, then count completed GETs for ``seconds`` of wall time."""
    async with AsyncExitStack() as stack:
        get = await _client(variant, url, stack)
        counts = {"ok": 0, "errors": 0}
        measuring = False
        stop_at = time.monotonic() + 0.5 + seconds

        async def worker() -> None:
            for _ in range(MAX_REQUESTS):
                if time.monotonic() >= stop_at:
                    return
                try:
                    status = await get()
                except Exception:
                    status = 0
                if measuring:
                    counts["ok" if status == 200 else "errors"] += 1

        tasks = [asyncio.create_task(worker()) for _ in range(CONCURRENCY)]
        await asyncio.sleep(0.5)
        measuring = True
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.gather(*tasks)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    return {"requests": counts["ok"], "errors": counts["errors"], "cpu_s": cpu, "wall_s": wall}


def run_variant(variant: str, url: str, seconds: float) -> dict[str, float]:
    """One variant in a fresh interpreter; returns its measurement."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), variant, url, str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"transport {variant} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    import uvloop

    variant, url, seconds = argv[0], argv[1], float(argv[2])
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    print(json.dumps(uvloop.run(measure(variant, url, seconds))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
