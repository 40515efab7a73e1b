"""When each probe is due: kubelet-style start-up spread and a fixed-rate period.

Each target gets a stable phase inside its period, derived from its key, so thousands of
targets do not fire together, and a restarted prober keeps the same rhythm (a consumer
sees no burst and no gap). A probe that overruns its slot skips the slots it missed
instead of firing them in a burst.
"""

from __future__ import annotations

import hashlib
import math


def phase_offset(key: str, period: float) -> float:
    """A stable offset in ``[0, period)`` spread uniformly over keys."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * period


def first_due(now: float, initial_delay: float, period: float, key: str) -> float:
    """The first probe waits ``initial_delay``, then a stable share of one period."""
    return now + initial_delay + phase_offset(key, period)


def next_due(due: float, period: float, now: float) -> tuple[float, int]:
    """The next slot after ``due`` that is not already past, and how many slots were missed."""
    following = due + period
    if following > now:
        return following, 0
    missed = math.floor((now - following) / period) + 1
    return following + missed * period, missed
