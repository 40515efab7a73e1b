"""Rows into one ClickHouse table in batches, by size or by time, whichever comes first.

``add`` returns the future of the batch the rows joined; it resolves True once that batch
is stored, and the consumer acknowledges the JetStream messages behind it only then. A
failing insert is retried until it succeeds (tenacity: ``retry_initial`` doubling to
``retry_max``, plus up to ``retry_initial`` of jitter): a batch is never dropped. While
ClickHouse is away, batches wait in order; the bound on memory is the durable consumer's
``max_ack_pending`` (JetStream delivers no more unacknowledged messages than that, so the
reporter stops pulling instead of dropping). ``stats.buffered_rows`` shows the level.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import structlog
from tenacity import AsyncRetrying, RetryCallState, wait_exponential_jitter

from autoserve_runtime import cancel_all

from .clickhouse import Store

log = structlog.get_logger("autoserve.reporter.batcher")

_encode = msgspec.json.Encoder().encode


@dataclass
class _Batch:
    lines: list[bytes] = field(default_factory=list)
    opened_at: float = 0.0
    done: asyncio.Future[bool] | None = None


@dataclass
class BatcherStats:
    rows_stored: int = 0
    batches_stored: int = 0
    insert_failures: int = 0
    buffered_rows: int = 0
    max_buffered_rows: int = 0
    last_error: str = ""


class BatchWriter:
    def __init__(
        self,
        store: Store,
        table: str,
        columns: Sequence[str],
        *,
        max_rows: int = 10_000,
        max_delay: float = 1.0,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
    ) -> None:
        self.store = store
        self.table = table
        self.columns = tuple(columns)
        self.max_rows = max_rows
        self.max_delay = max_delay
        self._wait = wait_exponential_jitter(multiplier=retry_initial, max=retry_max, jitter=retry_initial)
        self._open = _Batch()
        self._sealed: deque[_Batch] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.stats = BatcherStats()

    def start(self) -> BatchWriter:
        self._task = asyncio.create_task(self._run(), name=f"batcher:{self.table}")
        return self

    def add(self, rows: Sequence[tuple]) -> asyncio.Future[bool]:
        batch = self._open
        if batch.done is None:
            batch.done = asyncio.get_running_loop().create_future()
            batch.opened_at = time.monotonic()
            self._wakeup.set()  # start the time limit
        batch.lines.extend(_encode(row) for row in rows)
        self.stats.buffered_rows += len(rows)
        self.stats.max_buffered_rows = max(self.stats.max_buffered_rows, self.stats.buffered_rows)
        if len(batch.lines) >= self.max_rows:
            self._seal()
        return batch.done

    def _seal(self) -> None:
        if self._open.lines:
            self._sealed.append(self._open)
            self._open = _Batch()
            self._wakeup.set()

    async def _run(self) -> None:
        while True:
            if not self._sealed:
                if self._open.lines:
                    left = self._open.opened_at + self.max_delay - time.monotonic()
                    if left <= 0:
                        self._seal()
                        continue
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), left)
                else:
                    await self._wakeup.wait()
                self._wakeup.clear()
                continue
            batch = self._sealed[0]
            await self._store(batch)
            self._sealed.popleft()
            self.stats.buffered_rows -= len(batch.lines)
            if batch.done is not None and not batch.done.done():
                batch.done.set_result(True)

    async def _store(self, batch: _Batch) -> None:
        """Insert until it succeeds; a partial insert repeated is collapsed by the table's
        ReplacingMergeTree key, so retrying is always safe. It never gives up by itself;
        ``close`` cancels it, in a try or in a wait."""

        def failed(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            self.stats.insert_failures += 1
            self.stats.last_error = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("insert failed; retrying", table=self.table, rows=len(batch.lines),
                        retry_in=round(state.upcoming_sleep, 2), error=self.stats.last_error[:200])  # fmt: skip

        retrying = AsyncRetrying(wait=self._wait, before_sleep=failed)  # any Exception, for ever
        await retrying(self.store.insert_lines, self.table, self.columns, b"\n".join(batch.lines))
        self.stats.rows_stored += len(batch.lines)
        self.stats.batches_stored += 1

    async def flush(self, timeout: float) -> bool:
        """Seal what is open and wait up to ``timeout`` for everything to be stored."""
        self._seal()
        pending = [b.done for b in self._sealed if b.done is not None]
        if not pending:
            return True
        _, not_done = await asyncio.wait(pending, timeout=timeout)
        return not not_done

    async def close(self, timeout: float = 5.0) -> None:
        """Store what is buffered if ClickHouse answers within ``timeout``; what is not
        stored stays unacknowledged in JetStream and comes back on the next start."""
        await self.flush(timeout)
        if self._task is not None:
            await cancel_all([self._task])
