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

from dataclasses import dataclass, field


@dataclass(slots=True)
class _Bucket:
    index: int
    first_at: float
    counts: dict[str, int] = field(default_factory=dict)


class BucketWindow:
    def __init__(self, window_seconds: float, buckets: int = 60) -> None:
        self.window_seconds = window_seconds
        self._width = window_seconds / buckets
        self._buckets = buckets
        self._slots: list[_Bucket | None] = [None] * buckets
        self._newest = -1  # the highest bucket index seen; the window ends there
        self._totals: dict[str, int] = {}

    def add(self, at: float, key: str, n: int = 1) -> None:
        index = self._advance(at)
        slot = index % self._buckets
        bucket = self._slots[slot]
        if bucket is None:
            bucket = self._slots[slot] = _Bucket(index, at)
        elif at < bucket.first_at:
            bucket.first_at = at
        bucket.counts[key] = bucket.counts.get(key, 0) + n
        self._totals[key] = self._totals.get(key, 0) + n

    def count(self, now: float, key: str) -> int:
        index = self._advance(now)
        if index == self._newest:
            return self._totals.get(key, 0)
        return sum(b.counts.get(key, 0) for b in self._live(index))

    def first_at(self, now: float) -> float | None:
        times = [b.first_at for b in self._live(self._advance(now))]
        return min(times) if times else None

    def _advance(self, at: float) -> int:
        """Move the window's end to ``at`` if that is later, dropping the buckets that
        leave it; the bucket index of ``at``. A time a whole window before the end means
        the clock stepped back (or one event came from the future): start over from it,
        or the window would stay blind until real time caught up."""
        index = int(at // self._width)
        if index <= self._newest - self._buckets:
            self._slots = [None] * self._buckets
            self._totals = {}
            self._newest = index
        elif index > self._newest:
            keep_from = index - self._buckets + 1
            for slot, bucket in enumerate(self._slots):
                if bucket is not None and bucket.index < keep_from:
                    for key, n in bucket.counts.items():
                        self._totals[key] -= n
                    self._slots[slot] = None
            self._newest = index
        return index

    def _live(self, index: int) -> list[_Bucket]:
        oldest = index - self._buckets + 1
        return [b for b in self._slots if b is not None and oldest <= b.index <= index]
