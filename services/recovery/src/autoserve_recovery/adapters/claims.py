"""At-most-once claims in the KV bucket ``autoserve-recovery-claims``.

``f.<failure event_id>.<action>``: created (create fails if the key exists) by the one
replica that runs that action for that failure, *before* it acts, with the action and
the time it began (``since``). ``i.<app>.<instance>``: a lease that serialises actions
on one instance across replicas. Both carry an owner and a lease deadline; the owner
renews while it works. A replica that finds an expired lease takes it over with a
compare-and-set on the revision it read, so of several candidates exactly one wins,
and an incident whose owner crashed is picked up once the lease runs out. The lease it
replaced tells the successor what was begun and when, so it can check whether the
action already happened before doing it again.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import msgspec
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from ..ports import ClaimHeld

CLAIMS_BUCKET = "autoserve-recovery-claims"


class Lease(msgspec.Struct, frozen=True):
    owner: str
    until: float
    cause: str = ""
    done: bool = False
    action: str = ""  # what the owner is about to do (an action claim)
    since: float = 0.0  # when it was claimed: anything the action did is after this


async def claims_bucket(js: JetStreamContext, max_age_seconds: float = 86_400) -> KeyValue:
    try:
        return await js.key_value(CLAIMS_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(
                bucket=CLAIMS_BUCKET,
                description="AutoServe recovery: at-most-once claims and instance leases",
                history=1,
                ttl=max_age_seconds,  # a claim outlives any redelivery of its failure
                storage=StorageType.FILE,
            )
        )


@dataclass(eq=False)
class Claims:
    kv: KeyValue
    owner: str
    lease_seconds: float
    # key -> (revision, lease) of what this replica last wrote: renewals and the finish
    # update that revision, whoever took the lease and whenever it was renewed since.
    _mine: dict[str, tuple[int, Lease]] = field(init=False, default_factory=dict)

    def _lease(self, key: str, cause: str, done: bool = False, action: str | None = None) -> Lease:
        """A new lease (``action`` given: a fresh claim), or the held one renewed."""
        now = time.time()
        held = self._mine[key][1] if key in self._mine else None
        if action is not None or held is None:
            held = Lease(self.owner, 0.0, cause, action=action or "", since=now)
        return Lease(self.owner, now + self.lease_seconds, cause, done, held.action, held.since)

    async def _write(self, key: str, lease: Lease, last: int | None) -> int:
        value = msgspec.json.encode(lease)
        revision = await (self.kv.create(key, value) if last is None else self.kv.update(key, value, last=last))
        if lease.done:
            self._mine.pop(key, None)
        else:
            self._mine[key] = (revision, lease)
        return revision

    async def acquire(
        self, key: str, cause: str, *, reusable: bool = False, action: str = ""
    ) -> tuple[int, Lease | None] | None:
        """Take ``key``: (revision, the lease it replaced or None), or None if someone holds
        it. A finished claim is taken again only if ``reusable`` (an instance lease); a
        finished action claim never is: that action was done."""
        try:
            return await self._write(key, self._lease(key, cause, action=action), None), None
        except KeyWrongLastSequenceError:
            pass
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None  # deleted in between: the next attempt creates it
        held = msgspec.json.decode(entry.value or b"{}", type=Lease)
        if held.done and not reusable:
            return None
        if not held.done and held.until > time.time() and held.owner != self.owner:
            return None
        try:
            return await self._write(key, self._lease(key, cause, action=action), entry.revision), held
        except KeyWrongLastSequenceError:
            return None  # another replica took it first

    async def claim_action(self, key: str, cause: str, action: str) -> tuple[int, Lease | None] | None:
        """An action claim, as ``acquire``; None only when that action was done. One another
        replica holds raises ``ClaimHeld``: the caller holds the instance's lease (or acts
        on nothing), so that owner is gone or finishing, and the input must not be dropped."""
        claim = await self.acquire(key, cause, action=action)
        if claim is None and (held := await self.peek(key)) is not None and not held.done:
            raise ClaimHeld(key, held.owner, held.until)
        return claim

    async def peek(self, key: str) -> Lease | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value or b"{}", type=Lease)

    async def renew(self, key: str, cause: str) -> None:
        """Extend a lease this replica holds (taken by ``acquire``)."""
        await self._write(key, self._lease(key, cause), self._mine[key][0])

    async def finish(self, key: str, cause: str) -> None:
        """Mark done: the work is recorded in the stream, nobody takes it over. (If another
        replica took the lease over meanwhile, the update fails and its lease stands.)"""
        if (mine := self._mine.get(key)) is not None:
            with contextlib.suppress(KeyWrongLastSequenceError):
                await self._write(key, self._lease(key, cause, done=True), mine[0])
        self._mine.pop(key, None)
