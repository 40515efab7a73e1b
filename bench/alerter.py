"""Alerter benchmarks: notification latency and an alert storm.

- Latency: ``FailureDetected`` published to JetStream -> the webhook receiver has the
  notification, with ``group_wait: 0`` and one group per instance, one failure at a time.
  The peer, in the same run: a real Prometheus Alertmanager (Debian's
  ``/usr/bin/prometheus-alertmanager``) with ``group_wait: 0``, one group per instance and
  a webhook receiver; an alert POSTed to its ``/api/v2/alerts`` -> its webhook received.
- Storm: 10,000 failures across 1,000 instances (10 apps) in 10 s, grouped by app; the
  notifications the webhook gets, and the CPU time of the alerter process.

The alerter runs as the real ``autoserve run alerter`` process against its own nats-server;
the webhook receiver is an aiohttp server in this process. All on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import yaml
from aiohttp import ClientError, ClientSession, web

from autoserve_cli.apply import store_config
from autoserve_config import load_config_text
from autoserve_events import FailureDetected, FailureType, encode, headers_for, subject_for
from autoserve_runtime import connect, free_port, provision, spawn_child, stop_child
from bench.common import LOG_DIR, VENV_BIN, WORK_DIR, Table, cpu_seconds, fmt, nats_server

SAMPLES = 200
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
STORM_EVENTS, STORM_INSTANCES, STORM_APPS, STORM_SECONDS = 10_000, 1_000, 10, 10.0


def _config(port: int, group_by: list[str], group_wait: str) -> str:
    apps = {f"app{i}": {"instances": []} for i in range(STORM_APPS)}
    alerting = {
        "receivers": {"hook": {"type": "webhook", "url": f"http://127.0.0.1:{port}/hook"}},
        "route": {"receiver": "hook", "group_by": group_by, "group_wait": group_wait, "group_interval": "10s",
                  "repeat_interval": "4h"},
        "resolve_timeout": "1h",
    }  # fmt: skip
    return yaml.safe_dump({"apps": apps, "alerting": alerting})


def _failure(app: str, instance: str) -> FailureDetected:
    return FailureDetected(failure_type=FailureType.CONTAINER_STOPPED, instance_id=instance, app_name=app,
                           severity="critical", message="exit code 137", timestamp=time.time(), is_critical=True)  # fmt: skip


async def _sampled(send: Callable[[int], Awaitable[object]], received: list) -> list[float]:
    """SAMPLES notifications one at a time, 10 ms apart: ms from sending one until the
    webhook has it (5 s at most; a lost one is left out)."""
    samples = []
    for i in range(SAMPLES):
        started = time.perf_counter()
        await send(i)
        deadline = time.monotonic() + 5
        while len(received) <= i and time.monotonic() < deadline:
            await asyncio.sleep(0.0005)
        if len(received) > i:
            samples.append((received[i][0] - started) * 1000)
        await asyncio.sleep(0.01)
    return samples


async def _warmed_up(received: list, timeout: float, failure: str) -> None:
    """Wait for the warm-up notification, then forget it: the samples start clean."""
    deadline = time.monotonic() + timeout
    while not received:
        if time.monotonic() > deadline:
            raise RuntimeError(failure)
        await asyncio.sleep(0.02)
    received.clear()


@contextlib.asynccontextmanager
async def _webhook(received: list[tuple[float, dict]]) -> AsyncIterator[int]:
    """A webhook receiver (aiohttp, in this process) on 127.0.0.1: (arrival, JSON) of each POST."""

    async def hook(request: web.Request) -> web.Response:
        received.append((time.perf_counter(), await request.json()))
        return web.Response(text="ok")

    port = free_port()
    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def _scenario(group_by: list[str], group_wait: str, body) -> dict:  # type: ignore[no-untyped-def]
    received: list[tuple[float, dict]] = []
    async with _webhook(received) as port:
        return await _run_alerter(port, received, group_by, group_wait, body)


async def _run_alerter(port: int, received: list[tuple[float, dict]], group_by: list[str], group_wait: str,
                       body) -> dict:  # type: ignore[no-untyped-def]  # fmt: skip
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    server = nats_server("nats-alerter").start()
    process = None
    try:
        nc = await connect(server.url, "bench-alerter", timeout=10)
        js = nc.jetstream()
        await provision(js)
        await store_config(js, load_config_text(_config(port, group_by, group_wait)))
        with (LOG_DIR / "alerter.log").open("ab") as log:
            process = spawn_child([str(VENV_BIN / "autoserve"), "run", "alerter", "--nats-url", server.url],
                                  stdout=log, stderr=log)  # fmt: skip
        await asyncio.sleep(0.2)
        # ready once a probe failure is notified
        warmup = _failure("app0", "warmup")
        await js.publish(subject_for(warmup), encode(warmup), headers=headers_for(warmup))
        await _warmed_up(received, 60, "the alerter never notified the warm-up failure")
        result = await body(js, received, process.pid)
        await nc.close()
        return result
    finally:
        if process is not None:
            process.terminate()
            stop_child(process)
        server.stop()


async def latency() -> list[float]:
    async def body(js, received, _pid):  # type: ignore[no-untyped-def]
        async def send(i: int) -> None:
            event = _failure("app1", f"lat-{i}")
            await js.publish(subject_for(event), encode(event), headers=headers_for(event))

        return {"samples": await _sampled(send, received)}

    return (await _scenario(["app", "instance"], "0s", body))["samples"]


def _am_alert(instance: str) -> dict:
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return {"labels": {"alertname": "container_stopped", "app": "app1", "instance": instance, "severity": "critical"},
            "annotations": {"description": "exit code 137"}, "startsAt": now, "generatorURL": ""}  # fmt: skip


async def alertmanager_latency() -> list[float]:
    """The peer: one alert at a time POSTed to a real Alertmanager's ``/api/v2/alerts``, each a
    new group (grouped by instance, ``group_wait: 0``) -> its webhook receiver has it."""
    received: list[tuple[float, dict]] = []
    async with _webhook(received) as port:
        work = WORK_DIR / "alertmanager"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        am_port = free_port()
        (work / "am.yml").write_text(yaml.safe_dump({
            "route": {"receiver": "hook", "group_by": ["instance"], "group_wait": "0s", "group_interval": "10s",
                      "repeat_interval": "4h"},
            "receivers": [{"name": "hook", "webhook_configs": [{"url": f"http://127.0.0.1:{port}/hook",
                                                                "send_resolved": False}]}],
        }))  # fmt: skip
        url = f"http://127.0.0.1:{am_port}"
        with (LOG_DIR / "alertmanager.log").open("ab") as log:
            process = spawn_child([ALERTMANAGER, f"--config.file={work / 'am.yml'}", f"--storage.path={work / 'data'}",
                                   f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
                                  stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            async with ClientSession() as session:

                async def post(alert: dict) -> None:
                    async with session.post(f"{url}/api/v2/alerts", json=[alert]) as resp:
                        resp.raise_for_status()

                deadline = time.monotonic() + 30
                for _ in range(600):  # ready? bounded in looks and by the deadline
                    with contextlib.suppress(ClientError, OSError):
                        async with session.get(f"{url}/-/ready") as resp:
                            if resp.status == 200:
                                break
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError("alertmanager did not become ready")
                    await asyncio.sleep(0.05)
                else:
                    raise RuntimeError("alertmanager did not become ready")
                await post(_am_alert("warmup"))
                await _warmed_up(received, 30, "alertmanager never notified the warm-up alert")
                return await _sampled(lambda i: post(_am_alert(f"lat-{i}")), received)
        finally:
            stop_child(process)


def _quantiles(samples: list[float]) -> list[float]:
    ordered = sorted(samples)
    return statistics.quantiles(ordered, n=100) if len(ordered) > 1 else [ordered[0]] * 99


def _latency_row(table: Table, system: str, samples: list[float], base: list[float] | None, goal: str) -> None:
    q = _quantiles(samples)
    b = _quantiles(base) if base else None
    p50_ratio, p99_ratio = (f"{q[49] / b[49]:.2f}x", f"{q[98] / b[98]:.2f}x") if b else ("-", "-")
    table.add(system, fmt(len(samples)), fmt(q[49], 1), fmt(q[89], 1), fmt(q[98], 1), fmt(max(samples), 1),
              p50_ratio, p99_ratio, goal.format(met="met" if q[98] < 100 else "NOT met"))  # fmt: skip


def _am_version() -> str:
    """``0.25.0`` from ``--version`` (the first line), or ``?``."""
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        out = subprocess.run([ALERTMANAGER, "--version"], capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).split()[2]
    return "?"


async def storm() -> dict:
    async def body(js, received, pid):  # type: ignore[no-untyped-def]
        cpu0 = cpu_seconds(pid)
        started = time.monotonic()
        per_batch = STORM_EVENTS // 100
        for batch in range(100):  # 100 batches over STORM_SECONDS
            futures = []
            for k in range(per_batch):
                n = batch * per_batch + k
                instance = n % STORM_INSTANCES
                event = _failure(f"app{instance % STORM_APPS}", f"i-{instance}")
                futures.append(js.publish(subject_for(event), encode(event), headers=headers_for(event)))
            await asyncio.gather(*futures)
            await asyncio.sleep(max(0.0, started + (batch + 1) * STORM_SECONDS / 100 - time.monotonic()))
        published_in = time.monotonic() - started
        # group_wait 5 s, group_interval 10 s: wait until every alert was announced
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            announced = {a["alertId"] for _, p in received for a in p["alerts"]}
            if len(announced) >= STORM_INSTANCES:
                break
            await asyncio.sleep(0.2)
        announced = {a["alertId"] for _, p in received for a in p["alerts"]}
        return {"published_in": published_in, "notifications": len(received), "alerts": len(announced),
                "cpu": cpu_seconds(pid) - cpu0, "until_all": time.monotonic() - started}  # fmt: skip

    return await _scenario(["app"], "5s", body)


async def alerter_tables() -> list[Table]:
    samples = await latency()
    peer = await alertmanager_latency()
    base = peer or None
    table = Table(
        "Alerter: notification latency at group_wait 0, event in -> webhook received, vs Prometheus Alertmanager",
        ["system", "samples", "p50 ms", "p90 ms", "p99 ms", "max ms", "p50 vs AM", "p99 vs AM", "goal"],
    )
    _latency_row(table, "autoserve alerter", samples, base, "p99 < 100 ms: {met}")
    if peer:
        _latency_row(table, f"Alertmanager {_am_version()}", peer, base, "-")
    table.notes.append(
        f"{SAMPLES} alerts one at a time, each a new group (grouped by app and instance; Alertmanager by instance), "
        "10 ms apart; the alerter is the real `autoserve run alerter` process, Alertmanager Debian's "
        "`prometheus-alertmanager` (no cluster); both notify the same kind of webhook, aiohttp in the benchmark "
        "process. Ours starts at the JetStream publish (acked) and includes the consumer, the fold and the "
        "publishing of AlertChanged; Alertmanager's at its HTTP API."
    )
    result = await storm()
    storm_table = Table(
        f"Alerter: alert storm, {STORM_EVENTS:,} failures across {STORM_INSTANCES:,} instances "
        f"({STORM_APPS} apps) in {STORM_SECONDS:g} s",
        ["published in s", "alerts announced", "notifications", "alerter CPU s", "all announced by s"],
    )
    storm_table.add(fmt(result["published_in"], 1), fmt(result["alerts"]), fmt(result["notifications"]),
                    fmt(result["cpu"], 2), fmt(result["until_all"], 1))  # fmt: skip
    storm_table.notes.append(
        "grouped by app, group_wait 5s, group_interval 10s: the first notification per app after 5 s, the rest "
        "batched into one per app per interval. CPU is utime+stime of the alerter process over the storm and "
        "the flushes after it (AlertChanged and NotificationLogged publishing included)."
    )
    return [table, storm_table]


if __name__ == "__main__":
    from rich.console import Console

    for t in asyncio.run(alerter_tables()):
        Console().print(t.rich())
