"""The report API: the same reports as ``autoserve report``, over HTTP, with OpenAPI.

aiohttp.web, because it is already a dependency (the prober and the tests use it), it runs
in the reporter's own event loop next to the consumer, and it adds no framework: FastAPI
would bring pydantic models and a second ASGI server for five GET routes. With the embedded
engine, this API is the only way in: chDB lets one process hold the data directory.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
import structlog
from aiohttp import web

from ..core.report import BadRequest, UnknownApp, check_app_name, parse_flag, parse_hours

log = structlog.get_logger("autoserve.reporter.api")

DEFAULT_PORT = 8710
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"

_json = msgspec.json.Encoder()


class ReportSource(Protocol):
    """What the API needs from the service (``ReporterService`` provides it)."""

    reports: Any

    async def known_app(self, app: str) -> bool: ...
    async def apps(self) -> list[str]: ...
    def is_ready(self) -> bool: ...
    def status(self) -> dict[str, Any]: ...


def _reply(body: object, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(body), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _reply({"error": message}, status)


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    try:
        return await handler(request)
    except BadRequest as exc:
        return _error(400, str(exc))
    except UnknownApp as exc:
        return _error(404, str(exc.args[0]))
    except web.HTTPException:
        raise
    except Exception as exc:  # ClickHouse down, say: the client gets a reason, the service keeps running
        log.exception("request failed", path=request.path)
        return _error(503, f"reports unavailable: {type(exc).__name__}: {str(exc)[:300]}")


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen: must be HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


def build_app(source: ReportSource) -> web.Application:
    async def app_name(request: web.Request) -> str:
        app = check_app_name(request.match_info["app"])
        if not await source.known_app(app):
            raise UnknownApp(f"unknown app {app!r}: not configured and nothing stored for it")
        return app

    async def report(request: web.Request) -> web.Response:
        hours = parse_hours(request.query.get("hours"))
        exclude = parse_flag("exclude_maintenance", request.query.get("exclude_maintenance"))
        app = await app_name(request)
        return _reply(await source.reports.health_report(app, hours, time.time(), exclude_maintenance=exclude))

    async def incidents(request: web.Request) -> web.Response:
        hours = parse_hours(request.query.get("hours"))
        app = await app_name(request)
        return _reply(await source.reports.incidents(app, hours, time.time()))

    async def timeline(request: web.Request) -> web.Response:
        hours = parse_hours(request.query.get("hours"))
        app = await app_name(request)
        bucket = request.query.get("bucket_seconds")
        return _reply(await source.reports.timeline(app, hours, time.time(), bucket))

    async def apps(_: web.Request) -> web.Response:
        return _reply({"apps": await source.apps()})

    async def health(_: web.Request) -> web.Response:
        return _reply({"ready": source.is_ready(), **source.status()}, 200 if source.is_ready() else 503)

    async def openapi(_: web.Request) -> web.Response:
        return _reply(OPENAPI)

    app = web.Application(middlewares=[_errors])
    app.router.add_get("/v1/apps", apps)
    app.router.add_get("/v1/apps/{app}/report", report)
    app.router.add_get("/v1/apps/{app}/incidents", incidents)
    app.router.add_get("/v1/apps/{app}/timeline", timeline)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/openapi.json", openapi)
    return app


_HOURS = {
    "name": "hours",
    "in": "query",
    "required": False,
    "description": "Report period in hours, > 0 and <= 8784 (default 24).",
    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 8784, "default": 24},
}
_EXCLUDE_MAINTENANCE = {
    "name": "exclude_maintenance",
    "in": "query",
    "required": False,
    "description": "Leave the alerting config's maintenance windows out of the period (true/false, default false).",
    "schema": {"type": "boolean", "default": False},
}
_APP = {
    "name": "app",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"},
}
_ERROR = {
    "description": "A clear reason",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _get(summary: str, schema: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "parameters": params,
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
                },
                "400": _ERROR,
                "404": _ERROR,
                "503": _ERROR,
            },
        }
    }


def _schemas() -> dict[str, Any]:
    from ..core.incidents import IncidentList
    from ..core.report import HealthReport, Timeline

    (_, components) = msgspec.json.schema_components(
        [HealthReport, IncidentList, Timeline], ref_template="#/components/schemas/{name}"
    )
    components["Error"] = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
    components["Apps"] = {"type": "object", "properties": {"apps": {"type": "array", "items": {"type": "string"}}}}
    return components


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "AutoServe Health reporter", "version": "1"},
    "paths": {
        "/v1/apps": _get("Apps with stored data", "Apps", []),
        "/v1/apps/{app}/report": _get(
            "The seed's health report (uptime, checks, avg and p95 response time, errors) and per instance",
            "HealthReport",
            [_APP, _HOURS, _EXCLUDE_MAINTENANCE],
        ),
        "/v1/apps/{app}/incidents": _get(
            "Incidents (failure, recovery, healthy) with time to recover, and per strategy",
            "IncidentList",
            [_APP, _HOURS],
        ),
        "/v1/apps/{app}/timeline": _get(
            "Availability in time buckets; a bucket without probes says 'no data'",
            "Timeline",
            [
                _APP,
                _HOURS,
                {
                    "name": "bucket_seconds",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1},
                },
            ],
        ),
    },
    "components": {"schemas": _schemas()},
}
