"""Instance leases ``i.<app>.<slot>``: one action at a time on an instance, within this
replica (a lock) and across replicas (a claim with a deadline). Whoever takes one first
catches up with the instance's last ``RecoveryExecuted`` (another replica may have just
acted on it), so what it decides next sees what was done. While actions run the lease and
the input's ack deadline are renewed; a crash lets both expire, and another replica takes
the incident over."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, RetryError, retry_if_result, stop_after_delay, wait_fixed

from autoserve_runtime import cancel_all

from .ports import ClaimStore, Fold, KeepAlive, Records

CATCH_UP_SECONDS = 5.0  # for the fold to reach the instance's last record
RETAKE_PAUSE = 0.1  # between tries for a lease another replica holds (it is acting)


@dataclass(frozen=True)
class Held:
    key: str
    cause: str


class LeaseBusy(Exception):
    """A lease not had within the time given: ``by_replica`` another replica held it, else
    an action of this replica did."""

    def __init__(self, by_replica: bool) -> None:
        super().__init__("leased by another replica" if by_replica else "busy with another action")
        self.by_replica = by_replica


@dataclass(eq=False)
class InstanceLeases:
    claims: ClaimStore
    fold: Fold
    records: Records
    lease_seconds: float
    _locks: dict[tuple[str, str], asyncio.Lock] = field(init=False, default_factory=lambda: defaultdict(asyncio.Lock))

    def _slot(self, app_name: str, instance_id: str) -> tuple[tuple[str, str], str]:
        lineage = self.fold.state.instance(app_name, instance_id).lineage
        return (app_name, lineage), f"i.{app_name}.{lineage}"

    async def _catch_up(self, app_name: str, instance_id: str) -> None:
        lineage = self.fold.state.instance(app_name, instance_id).lineage
        await self.fold.caught_up(await self.records.last_seq(app_name, instance_id, lineage), CATCH_UP_SECONDS)

    @contextlib.asynccontextmanager
    async def hold(self, app_name: str, instance_id: str, cause: str) -> AsyncIterator[Held | None]:
        """The instance's lease, caught up, or None at once if another replica holds it."""
        slot, key = self._slot(app_name, instance_id)
        async with self._locks[slot]:
            if await self.claims.acquire(key, cause, reusable=True) is None:
                yield None
                return
            try:
                await self._catch_up(app_name, instance_id)
                yield Held(key, cause)
            finally:
                await self.claims.finish(key, cause)

    @contextlib.asynccontextmanager
    async def waited(self, app_name: str, instance_id: str, cause: str, within: float) -> AsyncIterator[Held]:
        """The instance's lease, waited for (its own action may be running) up to ``within``
        for this replica's lock and as long again for another replica's claim, renewed
        while held; ``LeaseBusy`` if not had in time."""
        slot, key = self._slot(app_name, instance_id)
        try:
            await asyncio.wait_for(self._locks[slot].acquire(), within)
        except TimeoutError:
            raise LeaseBusy(by_replica=False) from None
        try:
            retrying = AsyncRetrying(
                stop=stop_after_delay(within), wait=wait_fixed(RETAKE_PAUSE), retry=retry_if_result(lambda c: c is None)
            )
            try:
                await retrying(self.claims.acquire, key, cause, reusable=True)
            except RetryError:
                raise LeaseBusy(by_replica=True) from None
            try:
                held = Held(key, cause)
                async with self.renewing(held):
                    yield held
            finally:
                await self.claims.finish(key, cause)
        finally:
            self._locks[slot].release()

    @contextlib.asynccontextmanager
    async def renewing(self, held: Held, keep_alive: KeepAlive | None = None) -> AsyncIterator[None]:
        """The lease (and, with ``keep_alive``, the input's ack deadline) kept alive."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.lease_seconds / 3)
                with contextlib.suppress(Exception):
                    await self.claims.renew(held.key, held.cause)
                if keep_alive is not None:
                    with contextlib.suppress(Exception):
                        await keep_alive()

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            await cancel_all([task])
