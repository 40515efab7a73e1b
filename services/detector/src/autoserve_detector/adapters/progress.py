"""The partitions' floors on the members bucket.

``progress.detector.p<n>`` holds, as ASCII digits, the stream sequence up to which every
input of partition n has had its outputs stored. Only the partition's owner writes it
(the detector's credential may write ``progress.detector.>`` and nothing else there).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from autoserve_runtime.provisioning import MEMBERS_BUCKET


def floor_key(partition: int) -> str:
    return f"progress.detector.p{partition}"


class Floors:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(MEMBERS_BUCKET)
        return self._kv

    async def read(self, partitions: Iterable[int]) -> dict[int, int]:
        """The floors written so far (a partition never written is absent)."""
        kv = await self._bucket()

        async def one(partition: int) -> tuple[int, int | None]:
            try:
                entry = await kv.get(floor_key(partition))
            except KeyNotFoundError:
                return partition, None
            try:
                return partition, int(entry.value or b"")
            except ValueError:
                return partition, None  # not ours: treated as never written

        found = await asyncio.gather(*(one(p) for p in partitions))
        return {p: floor for p, floor in found if floor is not None}

    async def write(self, floors: dict[int, int]) -> None:
        kv = await self._bucket()
        await asyncio.gather(*(kv.put(floor_key(p), str(floor).encode()) for p, floor in floors.items()))
