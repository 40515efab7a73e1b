"""Idempotency keys a receiver has taken: the receiving half of at-least-once delivery.

The alerter sends each notification at least once, every copy with the same key (the
notification id). A receiver that remembers the keys it took drops the copies: a retry
after a lost answer, or the re-send of the member that took over a group from one that died
between sending and logging. Pure and bounded: the newest ``capacity`` keys are kept, far
more than are sent within any repeat's reach (a re-send comes within a TTL and a retry_for).
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_CAPACITY = 100_000


class SeenKeys:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[str, None] = OrderedDict()
        self.repeats = 0  # copies dropped

    def first(self, key: str) -> bool:
        """True the first time ``key`` is seen (take it); False for a repeat (drop it)."""
        if key in self._keys:
            self.repeats += 1
            return False
        self._keys[key] = None
        if len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        return True

    def forget(self, key: str) -> None:
        """The first copy could not be handled: take the next one."""
        self._keys.pop(key, None)

    def __len__(self) -> int:
        return len(self._keys)
