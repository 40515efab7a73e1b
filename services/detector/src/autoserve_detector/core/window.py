"""A sliding time window of counts, in fixed buckets so memory stays bounded.

Each instance keeps ``buckets`` slots whatever its probe rate: 10,000 instances probed
every second over a 10-minute window cost 10,000 x 60 small counters, not 6 million
timestamps. The window's edge moves a bucket at a time (10 s for a 10-minute window).

Running totals are kept as buckets enter and leave, so the per-probe question "how many
failed in the window" costs a dict lookup, not a sum over 60 buckets. Time comes from the
events and may step back a little (a late probe): a query for an earlier time than the
newest bucket is answered by summing the buckets live at that time; a step back of a
whole window or more restarts the window there.
"""

from __future__ import annotations

from array import array

EMPTY = -(2**62)  # a slot that holds no bucket


class BucketWindow:
    """Per-slot arrays of machine numbers, not an object per bucket: a window allocates
    nothing that lives on as it slides, and the cycle collector has nothing in it to
    traverse. A detector's state (thousands of instances, each with windows 60 buckets
    long) used to make every full collection slow and frequent: the detector's latency
    spikes (139-172 ms a collection at 5,000 instances; see ``bench/RESULTS.md``)."""

    __slots__ = (
        "_buckets",
        "_counts",
        "_earliest",
        "_first",
        "_index",
        "_newest",
        "_totals",
        "_width",
        "window_seconds",
    )

    def __init__(self, window_seconds: float, buckets: int = 60) -> None:
        self.window_seconds = window_seconds
        self._width = window_seconds / buckets
        self._buckets = buckets
        self._index = array("q", [EMPTY]) * buckets  # the bucket each slot holds
        self._first = array("d", [0.0]) * buckets  # the earliest time added to each slot
        self._counts: dict[str, array[int]] = {}  # key -> its count in each slot
        self._totals: dict[str, int] = {}
        self._newest = -1  # the highest bucket index seen; the window ends there
        self._earliest: float | None = None  # first_at(newest) when known: asked on every failure

    def add(self, at: float, key: str, n: int = 1) -> None:
        index = self._advance(at)
        slot = index % self._buckets
        if self._index[slot] != index:
            self._clear(slot)
            self._index[slot] = index
            self._first[slot] = at
        elif at < self._first[slot]:
            self._first[slot] = at
        if self._earliest is not None and at < self._earliest:
            self._earliest = at
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = array("q", [0]) * self._buckets
        counts[slot] += n
        self._totals[key] = self._totals.get(key, 0) + n

    def count(self, now: float, key: str) -> int:
        index = self._advance(now)
        if index == self._newest:
            return self._totals.get(key, 0)
        counts = self._counts.get(key)
        return sum(counts[slot] for slot in self._live(index)) if counts else 0

    def first_at(self, now: float) -> float | None:
        index = self._advance(now)
        if index == self._newest and self._earliest is not None:
            return self._earliest
        earliest = min((self._first[slot] for slot in self._live(index)), default=None)
        if index == self._newest:
            self._earliest = earliest
        return earliest

    def _advance(self, at: float) -> int:
        """Move the window's end to ``at`` if that is later, dropping the buckets that
        leave it; the bucket index of ``at``. A time a whole window before the end means
        the clock stepped back (or one event came from the future): start over from it,
        or the window would stay blind until real time caught up."""
        index = int(at // self._width)
        if index <= self._newest - self._buckets:
            self._index = array("q", [EMPTY]) * self._buckets
            self._counts = {}
            self._totals = {}
            self._earliest = None
            self._newest = index
        elif index > self._newest:
            keep_from = index - self._buckets + 1
            for slot, held in enumerate(self._index):
                if held != EMPTY and held < keep_from:
                    self._clear(slot)
            self._newest = index
        return index

    def _clear(self, slot: int) -> None:
        for key, counts in self._counts.items():
            if counts[slot]:
                self._totals[key] -= counts[slot]
                counts[slot] = 0
        self._index[slot] = EMPTY
        self._earliest = None

    def _live(self, index: int) -> list[int]:
        oldest = index - self._buckets + 1
        return [slot for slot, held in enumerate(self._index) if oldest <= held <= index]
