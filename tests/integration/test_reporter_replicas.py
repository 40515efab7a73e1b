"""Two reporters, active and standby, as real ``autoserve run reporter`` processes on one
host: one chDB data path and one report API port between them (the lease lets one at a time
open either). Pause the active one past its lease, then SIGKILL the active one, both in the
middle of ingestion: the standby takes over each time, and every event is stored once."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client

from autoserve_events import FailureDetected, FailureType
from autoserve_reporter.adapters.clickhouse import Store
from autoserve_reporter.core.rows import EVENTS_TABLE, METRICS_TABLE
from autoserve_runtime import EmbeddedNatsServer, free_port, provision, spawn_child, stop_child
from autoserve_runtime.membership import Lease

from .conftest import LOCALHOST, wait_for
from .test_reporter import AUTOSERVE, ReporterProcess, probe, publish

pytestmark = pytest.mark.members  # the members lane of make test, beside the others

TTL = 2


class Member(ReporterProcess):
    """One ``autoserve run reporter`` member: its own /readyz port, the shared store and API."""

    def __init__(self, name: str, nats_url: str, clickhouse_url: str, api_port: int, logs: Path) -> None:
        self.health = f"http://{LOCALHOST}:{free_port()}"
        super().__init__(nats_url, clickhouse_url, logs / f"reporter-{name}.log", AUTOSERVE_MEMBER=name,
                         AUTOSERVE_MEMBER_TTL=str(TTL), AUTOSERVE_METRICS_PORT=self.health.rpartition(":")[2],
                         AUTOSERVE_REPORTER_LISTEN=f"{LOCALHOST}:{api_port}")  # fmt: skip
        self.port, self.url = api_port, f"http://{LOCALHOST}:{api_port}"

    def launch(self) -> Member:
        """Started, without waiting: a standby is never ready."""
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

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def sigkill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a paused one must be able to stop
            stop_child(self.process)


def failure(instance: str, t: float) -> FailureDetected:
    return FailureDetected(failure_type=FailureType.HEALTH_CHECK_FAILED, instance_id=instance, app_name="load",
                           severity="medium", message="probe failed", timestamp=t)  # fmt: skip


async def test_the_active_reporter_paused_then_killed_mid_ingestion_each_event_is_stored_once(
    nats_server: EmbeddedNatsServer, nc: Client, tmp_path: Path
) -> None:
    """Probes (and a failure per chunk, for the events table) are published all along.
    1. SIGSTOP the active member ``a`` past its lease: ``b`` takes the lease but cannot open
       the chDB path ``a`` still holds; SIGCONT ``a``: it finds its lease lapsed, stops
       ingesting at once and closes the store, and goes back to standby; ``b`` opens it.
    2. SIGKILL ``b`` in the middle of ingestion: ``a`` takes over again (a second term in
       the same process), and in the end every event is stored once."""
    await provision(nc.jetstream())
    api_port = free_port()
    clickhouse_url = f"chdb://{tmp_path / 'clickhouse'}"
    a = Member("a", nats_server.url, clickhouse_url, api_port, tmp_path).launch()
    b = Member("b", nats_server.url, clickhouse_url, api_port, tmp_path)
    lease = Lease(nc.jetstream(), "reporter", "test", TTL)
    load = Load(nc)
    try:
        await wait_for(a.active, timeout=60, what="a active")
        b.launch()
        await wait_for(b.standby, timeout=60, what="b running as a standby (not ready, saying why)")
        load.start()
        await wait_for(lambda: _total_above(a, 0), timeout=30, what="the first batches stored by a")

        a.signal(signal.SIGSTOP)
        await wait_for(lambda: _holder_is(lease, "b"), timeout=15, what="b holding the lease while a is paused")
        assert not await b.active()  # a paused still holds the chDB path: b waits for it
        a.signal(signal.SIGCONT)
        await wait_for(b.active, timeout=30, what="b active once a let the store go")
        await wait_for(a.standby, timeout=10, what="a back to standby")
        stored = await b.total("load")
        await wait_for(lambda: _total_above(b, stored), timeout=30, what="b storing")

        b.sigkill()
        killed_at = time.monotonic()
        await wait_for(a.active, timeout=30, what="a active again after b's SIGKILL")
        took_over = time.monotonic() - killed_at
        print(f"\nafter the SIGKILL the standby was active in {took_over:.2f}s (TTL {TTL}s)")
        n = await load.stop()
        await wait_for(lambda: _total_is(a, n), timeout=90, what=f"all {n} probes reported by a")
        assert await a.sigterm() == 0, a.log.read_text()[-3000:]
    finally:
        await load.stop()
        a.stop()
        b.stop()
    assert '"lease lapsed: stopping ingestion at once, back to standby"' in a.log.read_text()

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
    print(f"probes: {n} published, {distinct} distinct stored, {final} rows read FINAL, {raw} stored before merging "
          f"({raw - n} repeats of rows stored and not acknowledged before the pause or the kill)")  # fmt: skip
    assert (distinct, final) == (n, n)  # every probe, each stored once
    assert failures_stored[:2] == (load.failures, load.failures)


class Load:
    """Probes published in chunks every 0.1 s until stopped, and one failure per chunk."""

    def __init__(self, nc: Client, chunk: int = 100) -> None:
        self.nc, self.chunk = nc, chunk
        self.probes = self.failures = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        start = time.time() - 3600
        while not self._stop.is_set():
            k = self.probes
            batch = [probe("load", f"l{i % 8}", start + i * 0.01, float(i % 50)) for i in range(k, k + self.chunk)]
            await publish(self.nc, [*batch, failure(f"l{self.failures % 8}", start + self.failures)])
            self.probes, self.failures = k + self.chunk, self.failures + 1
            await asyncio.sleep(0.1)

    async def stop(self) -> int:
        """Stop after the chunk in flight; the number of probes published."""
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 30)
        return self.probes


async def _holder_is(lease: Lease, member: str) -> bool:
    return await lease.current_holder() == member


async def _total_above(api: Member, n: int) -> bool:
    return await api.total("load") > n  # the one API address, whichever member is active


async def _total_is(api: Member, n: int) -> bool:
    return await api.total("load") == n
