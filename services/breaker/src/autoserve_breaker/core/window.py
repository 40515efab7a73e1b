"""Sliding windows of call outcomes, as in resilience4j: the last N calls, or the last N seconds.

Both keep running totals, so reading the rates costs nothing however big the window.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple


class Counts(NamedTuple):
    calls: int
    failures: int
    slow: int


_PRESENT, _FAILED, _SLOW = 4, 1, 2


class CountWindow:
    """The last ``size`` outcomes, one byte each in a ring."""

    __slots__ = ("_index", "_ring", "calls", "failures", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self._ring = bytearray(size)
        self._index = 0
        self.calls = self.failures = self.slow = 0

    def record(self, failed: bool, slow: bool, now: float) -> None:
        old = self._ring[self._index]
        if old:
            self.calls -= 1
            self.failures -= old & _FAILED
            self.slow -= (old & _SLOW) >> 1
        self._ring[self._index] = _PRESENT | (_FAILED if failed else 0) | (_SLOW if slow else 0)
        self._index = (self._index + 1) % self.size
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def counts(self, now: float) -> Counts:
        return Counts(self.calls, self.failures, self.slow)


class TimeWindow:
    """Outcomes of the last ``size`` whole seconds: one bucket per second that saw a call."""

    __slots__ = ("_buckets", "_latest", "calls", "failures", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self._buckets: deque[list[int]] = deque()  # [second, calls, failures, slow], oldest first
        self._latest = 0
        self.calls = self.failures = self.slow = 0

    def record(self, failed: bool, slow: bool, now: float) -> None:
        second = int(now)
        self._expire(second)
        if second <= self._latest - self.size:
            return  # older than the window: it says nothing about the last ``size`` seconds
        buckets = self._buckets
        if not buckets or buckets[-1][0] < second:
            bucket = [second, 0, 0, 0]
            buckets.append(bucket)
        else:
            bucket = self._late_bucket(second)
        bucket[1] += 1
        bucket[2] += failed
        bucket[3] += slow
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def counts(self, now: float) -> Counts:
        self._expire(int(now))
        return Counts(self.calls, self.failures, self.slow)

    def _late_bucket(self, second: int) -> list[int]:
        """The bucket of an outcome that arrived after a newer one (scan bounded by ``size``)."""
        buckets = self._buckets
        for index in range(len(buckets) - 1, -1, -1):
            if buckets[index][0] == second:
                return buckets[index]
            if buckets[index][0] < second:
                buckets.insert(index + 1, [second, 0, 0, 0])
                return buckets[index + 1]
        buckets.appendleft([second, 0, 0, 0])
        return buckets[0]

    def _expire(self, second: int) -> None:
        if second <= self._latest:
            second = self._latest
        self._latest = second
        cutoff = second - self.size  # buckets at or before it are out of the window
        buckets = self._buckets
        while buckets and buckets[0][0] <= cutoff:
            _, calls, failures, slow = buckets.popleft()
            self.calls -= calls
            self.failures -= failures
            self.slow -= slow


Window = CountWindow | TimeWindow


def new_window(kind: str, size: int) -> Window:
    return TimeWindow(size) if kind == "time" else CountWindow(size)
