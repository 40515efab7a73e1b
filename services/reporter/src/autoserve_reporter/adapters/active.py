"""Active/standby on a lease: one member of the reporter ingests, the others wait.

chDB is one process per data path, so two reporters cannot both write it. Each member runs
this loop: take ``lease.reporter`` (the members bucket, per-key TTL) when it is free, then
``activate`` (open the store, the writers, the API, the consumers) and renew the lease every
third of the TTL. When a renewal has not succeeded within the TTL (this process was paused,
or cut off from NATS), the lease may be someone else's: ``deactivate`` at once and wait as
a standby again. A standby whose active member died takes the lease once its TTL lapses.

``held`` is what the ingestion path checks before it takes an input: a process resumed from
a pause past its TTL refuses inputs before its first renewal can even fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

from autoserve_runtime import cancel_all
from autoserve_runtime.membership import Lease

log = structlog.get_logger("autoserve.reporter.active")

Activate = Callable[[], Awaitable[None]]
Deactivate = Callable[[bool], Awaitable[None]]  # drain: a graceful stop (True) or fenced (False)


class ActiveStandby:
    def __init__(self, lease: Lease, activate: Activate, deactivate: Deactivate) -> None:
        self.lease = lease
        self._activate = activate
        self._deactivate = deactivate
        self.active = False  # activated and holding the lease: ingesting
        self.terms = 0  # times this member became active
        self.fenced = 0  # terms that ended because the lease lapsed (not by a stop)
        self.first = asyncio.get_running_loop().create_future()  # the first activation done
        self._recheck = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        """The lease is ours within its TTL; checked on every input while active."""
        if self.lease.held:
            return True
        self._recheck.set()
        return False

    def start(self) -> ActiveStandby:
        self._task = asyncio.create_task(self._run(), name="reporter-lease")
        return self

    async def stop(self) -> None:
        """A graceful stop: drain, close, and release the lease so a standby takes over now."""
        self._stopping = True
        self._recheck.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if not self.first.done():
            self.first.cancel()

    async def _run(self) -> None:
        period = self.lease.ttl / 3
        announced = False
        try:
            while not self._stopping:
                if not await self._take():
                    if not announced:
                        log.info("standby: another member is active; taking over when its lease lapses",
                                 lease=self.lease.key, holder=await self._holder())  # fmt: skip
                        announced = True
                    await self._wait(period)
                    continue
                announced = False
                await self._term(period)
        except Exception as exc:
            if not self.first.done():
                self.first.set_exception(exc)  # open() raises it: the service fails to start
            else:
                log.exception("activation failed; this member stays inactive")
            raise
        finally:
            if self.lease.held:
                await self.lease.release()

    async def _term(self, period: float) -> None:
        """Active while the lease holds: activate beside the renewals (opening the store may
        wait for the previous holder's lock), deactivate when it lapses or on a stop."""
        self.terms += 1
        log.info("lease taken: active", lease=self.lease.key, member=self.lease.holder, term=self.terms)
        activating = asyncio.create_task(self._activate_now(), name="reporter-activate")
        lapsed = False
        try:
            while not self._stopping:
                await self._wait(period, activating)
                if activating.done() and activating.exception() is not None:
                    if not self.first.done():
                        activating.result()  # the first activation failed: the service fails to start
                    # A later one (JetStream electing a leader as the term opened): end this
                    # term and take the lease again for a new one.
                    log.warning("activation failed; ending the term and trying again",
                                error=repr(activating.exception()), term=self.terms)  # fmt: skip
                    break
                # A lapse ends the term even if the lease could be taken again: someone may
                # have held it meanwhile (and recreated the durables we are bound to).
                if not self.lease.held or (not self._stopping and not await self._take() and not self.lease.held):
                    lapsed = not self._stopping
                    break
        finally:
            if lapsed:
                self.fenced += 1
                log.error("lease lapsed: stopping ingestion at once, back to standby", lease=self.lease.key)
            with contextlib.suppress(Exception):  # a failed activation was logged above
                await cancel_all([activating])
            self.active = False
            # A drain can outlast the TTL: the lease is kept until the store is closed, so no
            # successor starts on the durables while this member still acknowledges.
            renewing = [asyncio.create_task(self._renew_every(period))] if self._stopping and not lapsed else []
            try:
                await self._deactivate(self._stopping)
            finally:
                await cancel_all(renewing)

    async def _activate_now(self) -> None:
        started = time.monotonic()
        await self._activate()
        self.active = True
        log.info("active: ingesting", seconds=round(time.monotonic() - started, 2), term=self.terms)
        if not self.first.done():
            self.first.set_result(None)

    async def _renew_every(self, period: float) -> None:
        while self.lease.held:
            await asyncio.sleep(period)
            await self._take()

    async def _take(self) -> bool:
        try:
            return await self.lease.try_take()
        except Exception as exc:  # NATS away or electing: not taken (held lapses by itself)
            log.warning("lease request failed", lease=self.lease.key, error=repr(exc))
            return False

    async def _holder(self) -> str | None:
        with contextlib.suppress(Exception):
            return await self.lease.current_holder()
        return None

    async def _wait(self, seconds: float, also: asyncio.Future[None] | None = None) -> None:
        """Sleep ``seconds``, or less if an input saw the lease lapse, a stop came, or
        ``also`` ended."""
        waits: list[asyncio.Future[object]] = [asyncio.ensure_future(self._recheck.wait())]
        if also is not None and not also.done():
            waits.append(also)  # type: ignore[arg-type]
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        await cancel_all([waits[0]])  # type: ignore[list-item]
        self._recheck.clear()
