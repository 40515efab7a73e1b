"""The partitions' floors on the members bucket, and the window read a rebuild replays.

``progress.detector.p<n>`` holds, as ASCII digits, the stream sequence up to which every
input of partition n has had its outputs stored. Only the partition's owner writes it
(the detector's credential may write ``progress.detector.>`` and nothing else there).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from autoserve_runtime import subscribe_from
from autoserve_runtime.feed import position
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


async def read_window(
    js: JetStreamContext,
    stream: str,
    subject: str,
    since: float,
    until_seq: int,
    on_message: Callable[[int, Msg], bool],
    idle_timeout: float = 5.0,
) -> bool:
    """Hand ``on_message(seq, msg)`` every message on ``subject`` from wall time ``since``
    up to stream sequence ``until_seq``, in order; it returns False to stop early. True if
    the read got there (or to the stream's end); False if it was stopped, or nothing came
    for ``idle_timeout`` (JetStream away). Folds in the delivery callback, as
    ``EventConsumer.replay`` does (a ``next_msg`` per message measured at half the speed)."""
    if until_seq <= 0:
        return True
    done = asyncio.Event()
    last_delivery = time.monotonic()
    reached = False

    async def deliver(msg: Msg) -> None:
        nonlocal last_delivery, reached
        last_delivery = time.monotonic()
        if done.is_set():
            return
        seq, pending = position(msg)
        if seq > until_seq:
            reached = True
        elif not on_message(seq, msg):
            pass
        elif seq >= until_seq or pending == 0:
            reached = True
        else:
            return
        done.set()

    sub = await subscribe_from(js, stream, [subject], deliver, since=since)
    try:
        info = await sub.consumer_info()
        if info.num_pending == 0 and not info.delivered.consumer_seq:
            return True  # nothing stored in range: do not wait for a message that won't come
        while not done.is_set() and time.monotonic() - last_delivery < idle_timeout:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)
    finally:
        await sub.unsubscribe()
    return reached
