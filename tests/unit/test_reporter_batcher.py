"""The batch writer's retries (tenacity) against a real engine (chDB, in-process): a table
detached under it makes every insert fail with ClickHouse's own error until it is attached
again. Retries back off (no hot loop), are counted, and end in the batch being stored; a
``close`` during the outage stops them and leaves the batch unacknowledged."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from autoserve_reporter.adapters.batcher import BatchWriter
from autoserve_reporter.adapters.clickhouse import Store

TABLE = "retried"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(f"chdb://{tmp_path / 'clickhouse'}")
    await s.command(f"CREATE TABLE {TABLE} (n UInt32) ENGINE = MergeTree ORDER BY n")
    yield s
    await s.close()


async def _until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_an_insert_is_retried_with_backoff_until_the_table_is_back(store: Store) -> None:
    writer = BatchWriter(store, TABLE, ("n",), max_rows=3, retry_initial=0.05, retry_max=0.1).start()
    try:
        await store.command(f"DETACH TABLE {TABLE}")
        started = time.monotonic()
        stored = writer.add([(1,), (2,), (3,)])
        await _until(lambda: writer.stats.insert_failures >= 3)
        await asyncio.sleep(0.5)
        elapsed, failures = time.monotonic() - started, writer.stats.insert_failures
        assert failures <= 1 + elapsed / 0.05  # each wait is at least retry_initial: no hot loop
        assert TABLE in writer.stats.last_error and not stored.done()

        await store.command(f"ATTACH TABLE {TABLE}")
        assert await asyncio.wait_for(stored, 30) is True
        assert (writer.stats.rows_stored, writer.stats.batches_stored, writer.stats.buffered_rows) == (3, 1, 0)
        assert await store.query(f"SELECT count() FROM {TABLE}") == [(3,)]
    finally:
        await writer.close()


async def test_close_during_an_outage_stops_retrying_and_stores_nothing(store: Store) -> None:
    writer = BatchWriter(store, TABLE, ("n",), max_rows=1, retry_initial=0.05, retry_max=0.1).start()
    await store.command(f"DETACH TABLE {TABLE}")
    stored = writer.add([(7,)])
    await _until(lambda: writer.stats.insert_failures >= 2)
    started = time.monotonic()
    await writer.close(timeout=0.2)
    assert time.monotonic() - started < 5
    assert not stored.done()  # never acknowledged: JetStream delivers it again on the next start
    failures = writer.stats.insert_failures
    await asyncio.sleep(0.3)
    assert writer.stats.insert_failures == failures  # no retry after close
    await store.command(f"ATTACH TABLE {TABLE}")
    assert await store.query(f"SELECT count() FROM {TABLE}") == [(0,)]
