"""Which durable this detector member reads through: a slot lease (``lease.detector.slot<k>``).

Each member needs a durable of its own (every member reads every input), and two members
must never share one. Slot 0 is the historic ``autoserve-detector``, so one detector
works as before, and a detector restarted after a crash should get slot 0 back rather
than a fresh durable: its lease is still held by the dead process for up to the TTL. The
sign that a holder is dead is its durable's push subscription: the server drops it the
moment the holder's connection closes. So a member waits, up to the TTL, for the lease of
a slot whose durable has no subscriber; the membership's own slots (``member_slots``)
would take the next free slot at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from autoserve_runtime.membership import EXPIRY_GRACE_SECONDS, LOAD_TIMEOUT_SECONDS, Lease

log = structlog.get_logger("autoserve.detector")


class DurableSlot:
    def __init__(
        self,
        js: JetStreamContext,
        member: str,
        ttl: float,
        slots: int,
        stream: str,
        durable: Callable[[int], str],
        alone: Callable[[], bool] = lambda: False,
    ) -> None:
        self._js = js
        self._alone = alone  # the membership's: alone, a late renewal keeps the slot (Lease)
        self._member = member
        self.ttl = ttl
        self._slots = slots
        self._stream = stream
        self._durable = durable
        self.slot: int | None = None
        self.lost = False  # another member took our slot while we were paused: its durable is theirs
        self._lease: Lease | None = None

    @property
    def held(self) -> bool:
        return self._lease is not None and self._lease.held and not self.lost

    async def take(self) -> int:
        """The lowest slot free, or freed within the TTL by a holder that is gone."""
        started = time.monotonic()
        while True:
            waiting_for_dead = False
            for slot in range(self._slots):
                lease = Lease(self._js, f"detector.slot{slot}", self._member, self.ttl, self._alone)
                if await lease.try_take():
                    self.slot, self._lease = slot, lease
                    log.info("durable slot taken", slot=slot, durable=self._durable(slot),
                             waited=round(time.monotonic() - started, 3))  # fmt: skip
                    return slot
                if time.monotonic() - started < self.ttl + EXPIRY_GRACE_SECONDS and not await self._bound(slot):
                    waiting_for_dead = True  # its holder is gone: the lease lapses within the TTL
                    break
            if not waiting_for_dead and time.monotonic() - started > LOAD_TIMEOUT_SECONDS:
                raise RuntimeError(f"detector: all {self._slots} durable slots are held; "
                                   f"at most {self._slots} members can run at once")  # fmt: skip
            await asyncio.sleep(min(0.5, self.ttl / 4))

    async def _bound(self, slot: int) -> bool:
        """Its durable has a subscriber (or does not exist yet: its holder is starting)."""
        try:
            info = await self._js.consumer_info(self._stream, self._durable(slot))
        except NotFoundError:
            return True
        return bool(info.push_bound)

    async def keep(self, on_change: Callable[[], None]) -> None:
        """Renew every third of the TTL; tell ``on_change`` when holding it changes."""
        was = self.held
        while True:
            await asyncio.sleep(self.ttl / 3)
            if self._lease is not None and not self.lost:
                try:
                    await self._renew(self._lease)
                except Exception as exc:  # NATS away: held lapses by itself after the TTL
                    log.warning("durable slot renewal failed", error=repr(exc))
            if self.held != was:
                was = self.held
                on_change()

    async def _renew(self, lease: Lease) -> None:
        if await lease.try_take():
            return
        # Refused: after a pause past the TTL, our own key may still be there until the
        # server expires it (then the next renewal takes it again). Lost only to another.
        holder = await lease.current_holder()
        if holder not in (None, self._member):
            self.lost = True
            log.error("durable slot lost to another member; folding nothing from now on",
                      slot=self.slot, holder=holder)  # fmt: skip

    async def release(self) -> None:
        if self._lease is not None and not self.lost:
            with contextlib.suppress(Exception):
                await self._lease.release()
