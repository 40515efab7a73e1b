"""Two reporters, active and standby, as real ``autoserve run reporter`` processes on one
host: one chDB data path and one report API port between them (the lease lets one at a time
open either). SIGKILL the active one in the middle of ingestion: the standby takes over,
and every event is stored once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
from nats.aio.client import Client

from autoserve_events import FailureDetected, FailureType
from autoserve_reporter.adapters.clickhouse import Store
from autoserve_reporter.core.rows import EVENTS_TABLE, METRICS_TABLE
from autoserve_runtime import EmbeddedNatsServer, free_port, provision, spawn_child, stop_child

from .conftest import LOCALHOST, wait_for
from .test_reporter import AUTOSERVE, probe, publish

TTL = 2


class Member:
    """One ``autoserve run reporter`` member: its own /readyz port, the shared store and API."""

    def __init__(self, name: str, nats_url: str, clickhouse_url: str, api_port: int, logs: Path) -> None:
        self.name = name
        self.health = f"http://{LOCALHOST}:{free_port()}"
        self.log = logs / f"reporter-{name}.log"
        self.env = {**os.environ, "AUTOSERVE_NATS_URL": nats_url, "AUTOSERVE_CLICKHOUSE_URL": clickhouse_url,
                    "AUTOSERVE_REPORTER_LISTEN": f"{LOCALHOST}:{api_port}",
                    "AUTOSERVE_METRICS_PORT": self.health.rpartition(":")[2],
                    "AUTOSERVE_MEMBER": name, "AUTOSERVE_MEMBER_TTL": str(TTL)}  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Member:
        with self.log.open("ab") as out:
            self.process = spawn_child([AUTOSERVE, "run", "reporter"], env=self.env, stdout=out, stderr=out)
        return self

    async def readyz(self) -> tuple[int, dict]:
        assert self.process is not None and self.process.poll() is None, self.log.read_text()[-3000:]
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.get(f"{self.health}/readyz")
        except httpx.HTTPError:
            return 0, {}
        return response.status_code, response.json()

    async def active(self) -> bool:
        return (await self.readyz())[0] == 200

    async def standby(self) -> bool:
        status, body = await self.readyz()
        return status == 503 and any(why.startswith("standby:") for why in body.get("reasons", {}).values())

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    async def sigterm(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, 60)

    def stop(self) -> None:
        if self.process is not None:
            stop_child(self.process)


async def total(api: str, app: str) -> int:
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"{api}/v1/apps/{app}/report", params={"hours": 24})
    except httpx.HTTPError:
        return -1
    return response.json()["total_health_checks"] if response.status_code == 200 else -1


def failure(instance: str, t: float) -> FailureDetected:
    return FailureDetected(failure_type=FailureType.HEALTH_CHECK_FAILED, instance_id=instance, app_name="load",
                           severity="medium", message="probe failed", timestamp=t)  # fmt: skip


async def test_sigkill_the_active_reporter_mid_ingestion_the_standby_takes_over_storing_each_event_once(
    nats_server: EmbeddedNatsServer, nc: Client, tmp_path: Path
) -> None:
    await provision(nc.jetstream())
    n, chunk = 5000, 125
    now = time.time()
    probes = [probe("load", f"l{k % 8}", now - 1800 + k * 0.25, float(k % 50)) for k in range(n)]
    failures = [failure(f"l{k % 8}", now - 1800 + k * 10) for k in range(n // chunk)]  # the events table too
    api_port = free_port()
    api = f"http://{LOCALHOST}:{api_port}"
    clickhouse_url = f"chdb://{tmp_path / 'clickhouse'}"
    a = Member("a", nats_server.url, clickhouse_url, api_port, tmp_path).start()
    b = Member("b", nats_server.url, clickhouse_url, api_port, tmp_path)

    async def publish_continuously() -> None:
        for i, start in enumerate(range(0, n, chunk)):  # 40 chunks, paced: the load runs across the kill
            await publish(nc, [*probes[start : start + chunk], failures[i]])
            await asyncio.sleep(0.1)

    publishing: asyncio.Task[None] | None = None
    try:
        await wait_for(a.active, timeout=60, what="a active")
        b.start()
        await wait_for(b.standby, timeout=60, what="b running as a standby (not ready, saying why)")
        publishing = asyncio.create_task(publish_continuously())
        await wait_for(lambda: _some(api), timeout=30, what="the first batches stored by a")
        assert not publishing.done(), "the load ended before the kill: not a kill during ingestion"
        a.kill()
        killed_at = time.monotonic()
        await wait_for(b.active, timeout=30, what="b active after a's SIGKILL")
        took_over = time.monotonic() - killed_at
        print(f"\nstandby active {took_over:.2f}s after the SIGKILL (TTL {TTL}s)")
        await asyncio.wait_for(publishing, 60)
        await wait_for(lambda: _total_is(api, n), timeout=90, what=f"all {n} probes reported by b")
        assert await b.sigterm() == 0, b.log.read_text()[-3000:]
    finally:
        if publishing is not None:
            publishing.cancel()
        a.stop()
        b.stop()
    assert took_over < 3 * TTL + 5  # the lease's TTL, a renewal period, and chDB's start

    store = Store(clickhouse_url)  # the members' store, once both are gone
    try:
        probes_stored, failures_stored = [
            (await store.query(f"SELECT uniqExact(event_id), (SELECT count() FROM {table} FINAL {where}), "
                               f"count() FROM {table} {where}"))[0]
            for table, where in ((METRICS_TABLE, "WHERE metric_type = 'health_check_status'"),
                                 (EVENTS_TABLE, "WHERE type = 'FailureDetected'"))
        ]  # fmt: skip
    finally:
        await store.close()
    distinct, final, raw = probes_stored
    print(f"probes: {distinct} distinct, {final} rows read FINAL, {raw} stored before merging "
          f"({raw - n} repeats of a batch stored by a and not acknowledged before the kill)")  # fmt: skip
    assert (distinct, final) == (n, n)  # every probe, each stored once
    assert failures_stored[:2] == (len(failures), len(failures))


async def _some(api: str) -> bool:
    return await total(api, "load") > 0


async def _total_is(api: str, n: int) -> bool:
    return await total(api, "load") == n
