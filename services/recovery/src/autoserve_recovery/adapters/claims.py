"""At-most-once claims in the KV bucket ``autoserve-recovery-claims``.

``f.<failure event_id>``: created (create fails if the key exists) by the one replica
that acts on a failure. ``i.<app>.<instance>``: a lease that serialises actions on one
instance across replicas. Both carry an owner and a lease deadline; the owner renews
while it works. A replica that finds an expired lease takes it over with a
compare-and-set on the revision it read, so of several candidates exactly one wins,
and an incident whose owner crashed is picked up once the lease runs out.
"""

from __future__ import annotations

import contextlib
import time

import msgspec
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

CLAIMS_BUCKET = "autoserve-recovery-claims"


class Lease(msgspec.Struct, frozen=True):
    owner: str
    until: float
    cause: str = ""
    done: bool = False


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


class Claims:
    def __init__(self, kv: KeyValue, owner: str, lease_seconds: float) -> None:
        self.kv = kv
        self.owner = owner
        self.lease_seconds = lease_seconds

    def _lease(self, cause: str, done: bool = False) -> bytes:
        return msgspec.json.encode(Lease(self.owner, time.time() + self.lease_seconds, cause, done))

    async def acquire(self, key: str, cause: str, *, reusable: bool = False) -> tuple[int, Lease | None] | None:
        """Take ``key``: (revision, the lease it replaced or None), or None if someone holds
        it. A finished claim is taken again only if ``reusable`` (an instance lease); a
        finished action claim never is: that action was done."""
        try:
            return await self.kv.create(key, self._lease(cause)), None
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
            return await self.kv.update(key, self._lease(cause), last=entry.revision), held
        except KeyWrongLastSequenceError:
            return None  # another replica took it first

    async def peek(self, key: str) -> Lease | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value or b"{}", type=Lease)

    async def renew(self, key: str, revision: int, cause: str) -> int:
        return await self.kv.update(key, self._lease(cause), last=revision)

    async def finish(self, key: str, revision: int, cause: str) -> None:
        """Mark done: the work is recorded in the stream, nobody takes it over."""
        with contextlib.suppress(KeyWrongLastSequenceError):
            await self.kv.update(key, self._lease(cause, done=True), last=revision)
