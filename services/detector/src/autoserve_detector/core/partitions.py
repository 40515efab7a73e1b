"""Which detector member folds which instance, and which outputs it may publish: pure.

Instances fall into ``PARTITIONS`` fixed partitions by a stable hash of (app, instance);
the members own partitions (rendezvous hashing over the live members, ``p<n>`` keys), so
one member folds all of an instance's inputs, in stream order. Every member receives every
input; one of a partition it does not own is skipped (acknowledged, nothing folded).

The one rule for outputs: each partition has a *floor*, a stream sequence up to which every
input of it has had its outputs stored (its owner writes it, from its consumer's ack floor).
An input at or below the floor is folded silently; one above it is folded and its outputs
published. Output ids derive from input ids, so an output a previous owner already stored
is dropped by JetStream's duplicate window. The rule covers a start, a takeover from a dead
member, a member that joins, and a member resumed after its lease lapsed.

A partition this member gains is rebuilt first: the window is replayed (inputs of it up to
``up_to``, the last stream sequence this member had taken) while its live inputs wait, in
order; then it is live. While fenced (its lease may have lapsed) nothing is folded and
nothing is written: every input waits, and on unfencing the partitions it owns are rebuilt
as if taken over.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

PARTITIONS = 64

T = TypeVar("T")  # what the adapter keeps for an input that waits (the event and its ack)


def partition_of(app: str, instance: str, partitions: int = PARTITIONS) -> int:
    """Stable across processes and versions (unlike ``hash``): every member agrees."""
    digest = hashlib.blake2b(f"{app}\x00{instance}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


def partition_key(partition: int) -> str:
    """The ownership key of a partition (``membership.owns``)."""
    return f"p{partition}"


class Route(Enum):
    SKIP = "skip"  # not this member's (or already covered): acknowledge, fold nothing
    HOLD = "hold"  # its partition is being rebuilt, or this member is fenced: it waits
    SILENT = "silent"  # fold; its outputs are stored already (at or below the floor)
    PUBLISH = "publish"  # fold and publish its outputs


@dataclass
class Rebuild(Generic[T]):
    generation: int  # a partition lost and gained again is a new rebuild
    up_to: int  # the replay folds the partition's inputs up to this stream sequence
    floor: int = 0  # known once read, before the replay
    started: bool = False
    waiting: list[tuple[int, T]] = field(default_factory=list)  # (stream seq, input), in order


@dataclass
class Update(Generic[T]):
    gained: list[int] = field(default_factory=list)  # to rebuild
    lost: list[int] = field(default_factory=list)  # their state is dropped
    released: list[T] = field(default_factory=list)  # inputs to acknowledge now, folding nothing


class PartitionTable(Generic[T]):
    def __init__(self) -> None:
        self.live: dict[int, int] = {}  # partition -> floor
        self.rebuilding: dict[int, Rebuild[T]] = {}
        self.fenced = False
        self.known: dict[int, int] = {}  # the highest floor read or written, per partition
        # Partitions this process folded live until a fence, not rebuilt since: up to which sequence.
        self.live_at_fence: dict[int, int] = {}
        self._fence_queue: list[tuple[int, int, T]] = []  # (partition, seq, input) while fenced
        self._generation = 0

    @property
    def owned(self) -> set[int]:
        return set(self.live) | set(self.rebuilding)

    # -- ownership ------------------------------------------------------------------------

    def update(self, owned: Iterable[int], fenced: bool, position: int) -> Update[T]:
        """The members or the fencing changed. ``position``: the last stream sequence this
        member has taken; a partition gained is rebuilt up to it."""
        if fenced:
            return self._fence(position)
        owned = set(owned)
        unfencing, self.fenced = self.fenced, False
        update: Update[T] = Update(lost=sorted(self.owned - owned), gained=sorted(owned - self.owned))
        for partition in update.lost:
            self.live.pop(partition, None)
            rebuild = self.rebuilding.pop(partition, None)
            if rebuild is not None:  # the new owner folds them
                update.released += [item for _, item in rebuild.waiting]
        for partition in set(self.live_at_fence) - owned:  # another member folds it from now on
            del self.live_at_fence[partition]
        for partition in update.gained:
            self._generation += 1
            self.rebuilding[partition] = Rebuild(self._generation, position)
        if unfencing:
            # Every input that waited is at or below ``position``: the rebuild covers it.
            for partition, seq, item in self._fence_queue:
                rebuild = self.rebuilding.get(partition)
                if rebuild is None:
                    update.released.append(item)
                else:
                    rebuild.waiting.append((seq, item))
            self._fence_queue.clear()
        return update

    def _fence(self, position: int) -> Update[T]:
        if self.fenced:
            return Update()
        self.fenced = True
        update: Update[T] = Update(lost=sorted(self.owned))
        self.live_at_fence.update(dict.fromkeys(self.live, position))
        waiting = [(p, seq, item) for p, r in self.rebuilding.items() for seq, item in r.waiting]
        self._fence_queue = sorted(waiting, key=lambda w: w[1]) + self._fence_queue
        self.live.clear()
        self.rebuilding.clear()
        return update

    def release_fenced(self) -> list[T]:
        """Leaving: this process folds nothing more. What waited is acknowledged without
        outputs; the floors (``final_floors``) stay below it, so whoever folds next
        publishes its outputs."""
        items = [item for _, _, item in self._fence_queue]
        self._fence_queue.clear()
        return items

    # -- inputs ---------------------------------------------------------------------------

    def route(self, partition: int, seq: int) -> Route:
        """A live input (stream sequence ``seq``); on HOLD the adapter calls ``hold``."""
        if self.fenced:
            return Route.HOLD
        floor = self.live.get(partition)
        if floor is not None:
            return Route.SILENT if seq <= floor else Route.PUBLISH
        return Route.HOLD if partition in self.rebuilding else Route.SKIP

    def hold(self, partition: int, seq: int, item: T) -> None:
        if self.fenced:
            self._fence_queue.append((partition, seq, item))
        else:
            self.rebuilding[partition].waiting.append((seq, item))

    # -- rebuilding -----------------------------------------------------------------------

    def start_rebuilds(self) -> dict[int, Rebuild[T]]:
        """The rebuilds not yet under way: one replay of the window serves them all."""
        batch = {p: r for p, r in self.rebuilding.items() if not r.started}
        for rebuild in batch.values():
            rebuild.started = True
        return batch

    def retry(self, batch: dict[int, Rebuild[T]]) -> None:
        """A replay failed (NATS away): its rebuilds are started again by the next pass."""
        for partition, rebuild in batch.items():
            if self._current(partition, rebuild):
                rebuild.started = False

    def floor_read(self, partition: int, rebuild: Rebuild[T], floor: int) -> None:
        rebuild.floor = floor
        self.known[partition] = max(self.known.get(partition, 0), floor)

    def replay_route(self, partition: int, seq: int, batch: dict[int, Rebuild[T]]) -> Route:
        """An input the rebuild's replay reads: folded only if it is of a partition being
        rebuilt and not beyond the rebuild's ``up_to`` (later ones are live inputs)."""
        rebuild = batch.get(partition)
        if rebuild is None or seq > rebuild.up_to or not self._current(partition, rebuild):
            return Route.SKIP  # not rebuilt by this pass, a live input, or lost meanwhile
        return Route.SILENT if seq <= rebuild.floor else Route.PUBLISH

    def rebuilt(self, partition: int, rebuild: Rebuild[T]) -> list[tuple[Route, T]] | None:
        """The replay's outputs for ``partition`` are stored: it is live from now on. What
        waited, in order: SKIP (the replay covered it) or the route to fold it by. None if
        the rebuild is stale (lost, fenced, or gained again since)."""
        if not self._current(partition, rebuild):
            return None
        del self.rebuilding[partition]
        self.live[partition] = rebuild.floor
        self.live_at_fence.pop(partition, None)
        return [(self._after_rebuild(seq, rebuild), item) for seq, item in rebuild.waiting]

    @staticmethod
    def _after_rebuild(seq: int, rebuild: Rebuild[T]) -> Route:
        if seq <= rebuild.up_to:
            return Route.SKIP
        return Route.SILENT if seq <= rebuild.floor else Route.PUBLISH

    def _current(self, partition: int, rebuild: Rebuild[T]) -> bool:
        found = self.rebuilding.get(partition)
        return not self.fenced and found is not None and found.generation == rebuild.generation

    # -- floors ---------------------------------------------------------------------------

    def floors_due(self, acked: int) -> dict[int, int]:
        """The floors to write: ``acked`` (this member's ack floor: every input up to it has
        its outputs stored) for each live partition whose known floor is lower. A fenced
        member writes none."""
        if self.fenced:
            return {}
        return {p: acked for p in sorted(self.live) if acked > self.known.get(p, 0)}

    def floors_written(self, floors: dict[int, int]) -> None:
        for partition, floor in floors.items():
            self.known[partition] = max(self.known.get(partition, 0), floor)

    def final_floors(self, acked: int) -> dict[int, int]:
        """Leaving: for the partitions live when it stopped folding, the last input it took
        then (its outputs stored once ``acked`` reaches it), so a successor republishes
        nothing and a restart long after the duplicate window repeats nothing."""
        return {
            p: v for p, last in sorted(self.live_at_fence.items()) if (v := min(acked, last)) > self.known.get(p, 0)
        }
