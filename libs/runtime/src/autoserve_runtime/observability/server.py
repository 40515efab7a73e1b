"""The endpoint server: ``/healthz``, ``/readyz`` and ``/metrics`` on the service's own loop.

One small aiohttp server per process, ``127.0.0.1:<per-service port>`` by default (see
``endpoint_for``). ``/healthz`` only says the event loop answers: it never depends on NATS,
so an outage of the bus does not make Kubernetes restart every pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..tasks import cancel_all
from .health import STATE, readiness, reasons
from .metrics import add_gauge, metrics_text, refresh_consumer_info

log = structlog.get_logger("autoserve.observability")

# One fixed port per service, so a Kubernetes manifest can name it and ``autoserve up``
# runs every service on one host without a clash. 0 turns the endpoint off.
DEFAULT_PORTS: dict[str, int] = {
    "prober": 9461,
    "detector": 9462,
    "breaker": 9463,
    "recovery": 9464,
    "reporter": 9465,
    "alerter": 9466,
}
DEFAULT_HOST = "127.0.0.1"
PORT_ENV = "AUTOSERVE_METRICS_PORT"
HOST_ENV = "AUTOSERVE_METRICS_HOST"
# Prober shards of one ``run prober --workers N`` get port + SHARD_PORT_STEP * shard.
SHARD_PORT_STEP = 100


def base_service(name: str) -> str:
    """``prober-3`` -> ``prober``: shards and replicas share their service's defaults."""
    return name.split("-", 1)[0]


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int  # 0: off

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


_override: dict[str, Any] = {}


def request_endpoint(host: str | None = None, port: int | None = None) -> None:
    """What the command line asked for (``--metrics-host``/``--metrics-port``): it wins
    over the environment."""
    if host is not None:
        _override["host"] = host
    if port is not None:
        _override["port"] = port


def endpoint_for(name: str, environ: dict[str, str] | None = None) -> Endpoint:
    """Flag, then ``AUTOSERVE_METRICS_PORT``/``AUTOSERVE_METRICS_HOST``, then the defaults."""
    env = os.environ if environ is None else environ
    host = _override.get("host") or env.get(HOST_ENV) or DEFAULT_HOST
    port: Any = _override.get("port")
    if port is None:
        port = env.get(PORT_ENV) or DEFAULT_PORTS.get(base_service(name), 0)
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{PORT_ENV}: expected a port number (0 turns it off), got {port!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"{PORT_ENV}: must be between 0 and 65535, got {number}")
    return Endpoint(host, number)


class HealthServer:
    """``/healthz``, ``/readyz``, ``/metrics`` on the service's own event loop."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._runner: Any = None
        self._lag_task: asyncio.Task[None] | None = None

    async def start(self) -> bool:
        """Serve; False (and an error logged) if the address is taken: the service runs on
        without it rather than not at all, and its probes fail visibly."""
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.endpoint.host, self.endpoint.port, reuse_address=True).start()
        except OSError as exc:
            await runner.cleanup()
            log.error(
                "health and metrics endpoint off: cannot listen",
                address=f"{self.endpoint.host}:{self.endpoint.port}",
                error=str(exc),
                hint=f"--metrics-port or {PORT_ENV} (0 turns it off)",
            )
            return False
        self._runner = runner
        self._lag_task = asyncio.create_task(_measure_loop_lag(), name="loop-lag")
        log.info("health and metrics endpoint", url=self.endpoint.url, paths="/healthz /readyz /metrics")
        return True

    async def stop(self) -> None:
        if self._lag_task is not None:
            await cancel_all([self._lag_task])
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()

    async def _healthz(self, _request: Any) -> Any:
        from aiohttp import web

        return web.Response(text="ok\n")

    async def _readyz(self, _request: Any) -> Any:
        from aiohttp import web

        checks = readiness()
        ready = all(checks.values())
        body = {"service": STATE.service, "ready": ready, "checks": checks, "reasons": reasons(checks)}
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, _request: Any) -> Any:
        from aiohttp import web

        await refresh_consumer_info()
        response = web.Response(body=metrics_text())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response


# -- loop lag: how late a timer fires, measured while the endpoint serves ------------------------

_loop_lag = [0.0]  # the last measure, seconds
add_gauge("event_loop_lag_seconds", "How late a 1 s timer fired, last measure", lambda: _loop_lag[0])


async def _measure_loop_lag(period: float = 1.0) -> None:
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(period)
        _loop_lag[0] = max(0.0, loop.time() - started - period)
