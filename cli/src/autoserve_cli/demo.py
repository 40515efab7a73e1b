"""Demo targets for ``make run``: real servers on 127.0.0.1 that behave like apps do.

- web-1 (18081) is always healthy;
- web-2 (18082) fails with 503 for 15 s of every 45 s;
- web-3 (18083) answers every fourth probe too late for its 2 s timeout;
- cache (18091) is a TCP service that answers ``PING`` with ``+PONG``;
- web-3 (18084) crashes 45 s after each start: the recovery service restarts it.

``--target NAME`` runs one target as its own process and records how to start it again
under ``$AUTOSERVE_DATA_DIR/processes/<app>/<instance>.json``: the recovery service's
local-process runtime restarts it from there (``make run`` has no Docker engine).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

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


# instance -> (app, port); each can run alone with --target.
TARGETS: dict[str, tuple[str, int]] = {
    "web-1": ("web", 18081),
    "web-2": ("web", 18082),
    "api-1": ("slow-api", 18083),
    "web-3": ("web", 18084),
    "cache-1": ("cache", 18091),
    # Not an app: the local webhook the demo's alerting config notifies. It prints each
    # notification (see .autoserve/logs/demo-alert-receiver.log) and checks the HMAC.
    "alert-receiver": ("alerts", 18095),
}
ALERT_RECEIVER = "alert-receiver"
DEMO_HMAC_SECRET = "autoserve-demo-secret"  # public on purpose: examples/demo-webhook.secret
CRASH_AFTER_SECONDS = 45.0


def _register(instance: str) -> None:
    """Tell the recovery service how to start this target again (its process runtime)."""
    app, port = TARGETS[instance]
    path = Path(os.environ.get("AUTOSERVE_DATA_DIR", ".autoserve")).resolve() / "processes" / app / f"{instance}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "autoserve_cli.demo", "--target", instance]
    log = path.parent.parent.parent / "logs" / f"demo-{instance}.log"
    record = {"argv": argv, "pid": os.getpid(), "port": port, "cwd": os.getcwd(), "log": str(log)}
    path.with_suffix(".tmp").write_text(json.dumps(record))
    os.replace(path.with_suffix(".tmp"), path)


async def _print_notification(request: web.Request) -> web.Response:
    """Alerting in the demo: print what arrives, as an operator's chat would show it."""
    from autoserve_alerter.adapters.receivers import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify

    body = await request.read()
    signed = verify(DEMO_HMAC_SECRET.encode(), request.headers.get(TIMESTAMP_HEADER, ""), body,
                    request.headers.get(SIGNATURE_HEADER, ""))  # fmt: skip
    payload = json.loads(body)
    stamp = time.strftime("%H:%M:%S")
    tier = f" escalation tier {payload['tier']}" if payload.get("tier") else ""
    print(f"{stamp} ALERT {payload['status'].upper()}{tier} to {payload['receiver']} "
          f"({payload['groupKey']}; HMAC {'ok' if signed else 'not verified'})", flush=True)  # fmt: skip
    for alert in payload["alerts"]:
        labels = alert["labels"]
        print(f"    {alert['ackStatus']:<12} {alert['alertId']} {labels['app']}/{labels['instance']} "
              f"{labels['alertname']} ({labels['severity']}): {alert['annotations']['description']}", flush=True)  # fmt: skip
    for alert in payload.get("suppressedDependents", []):
        print(f"    held back   {alert['alertId']} {alert['labels']['app']}: {alert['reason']}", flush=True)
    return web.Response(text="ok")


async def _http(port: int, route: web.RouteDef) -> web.AppRunner:
    """One route served on 127.0.0.1:``port``; clean up through the runner."""
    app = web.Application()
    app.router.add_routes([route])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    return runner


async def serve_one(instance: str) -> None:
    app_name, port = TARGETS[instance]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if instance == "cache-1":
        server = await asyncio.start_server(_pong, HOST, port)
        cleanup = server.close
    elif instance == ALERT_RECEIVER:
        cleanup = (await _http(port, web.post("/alerts", _print_notification))).cleanup
    else:
        handler = {"web-1": _steady, "web-2": _flapping, "api-1": _sometimes_slow(), "web-3": _steady}[instance]
        cleanup = (await _http(port, web.get("/health", handler))).cleanup
    if instance != ALERT_RECEIVER:  # not an app: nothing for the recovery service to restart
        _register(instance)
    if instance == "web-3":  # a crash, not a clean exit: nothing is flushed or closed
        loop.call_later(CRASH_AFTER_SECONDS, os._exit, 1)
    print(f"demo target {instance} ({app_name}) listening on {HOST}:{port}, pid {os.getpid()}", flush=True)
    await stop.wait()
    result = cleanup()
    if asyncio.iscoroutine(result):
        await result


async def serve() -> None:
    runners = []
    for port, handler in ((18081, _steady), (18082, _flapping), (18083, _sometimes_slow())):
        runners.append(await _http(port, web.get("/health", handler)))
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
    if len(sys.argv) == 3 and sys.argv[1] == "--target":
        asyncio.run(serve_one(sys.argv[2]))
    else:
        asyncio.run(serve())
