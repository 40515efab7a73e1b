"""A sliding time window of counts, in fixed buckets so memory stays bounded.

Each instance keeps ``buckets`` slots whatever its probe rate: 10,000 instances probed
every second over a 10-minute window cost 10,000 x 60 small counters, not 6 million
timestamps. The window's edge moves a bucket at a time (10 s for a 10-minute window).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Bucket:
    index: int
    counts: Counter[str] = field(default_factory=Counter)
    first_at: float | None = None


class BucketWindow:
    def __init__(self, window_seconds: float, buckets: int = 60) -> None:
        self.window_seconds = window_seconds
        self._width = window_seconds / buckets
        self._slots: list[_Bucket | None] = [None] * buckets
        self._buckets = buckets

    def add(self, at: float, key: str, n: int = 1) -> None:
        index = int(at // self._width)
        slot = index % self._buckets
        bucket = self._slots[slot]
        if bucket is None or bucket.index != index:
            bucket = self._slots[slot] = _Bucket(index)
        bucket.counts[key] += n
        if bucket.first_at is None or at < bucket.first_at:
            bucket.first_at = at

    def _live(self, now: float) -> list[_Bucket]:
        newest = int(now // self._width)
        oldest = newest - self._buckets + 1
        return [b for b in self._slots if b is not None and oldest <= b.index <= newest]

    def count(self, now: float, key: str) -> int:
        return sum(b.counts[key] for b in self._live(now))

    def totals(self, now: float) -> Counter[str]:
        total: Counter[str] = Counter()
        for bucket in self._live(now):
            total.update(bucket.counts)
        return total

    def first_at(self, now: float) -> float | None:
        times = [b.first_at for b in self._live(now) if b.first_at is not None]
        return min(times) if times else None
