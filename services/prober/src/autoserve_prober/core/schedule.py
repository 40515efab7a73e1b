"""When each probe is due: kubelet-style start-up spread and a fixed-rate period.

Each target gets a stable phase inside its period, derived from its key, so thousands of
targets do not fire together. The phase is on the wall clock (``aligned_due``), a grid every
member of the prober shares: a restarted prober keeps the same rhythm, and a target that
moves to another member is probed in the slots it had (a consumer sees no burst and no gap). A probe that overruns its slot runs
the next one at once, late, and skips any slot that passed entirely. Due times sit on a 20 ms grid, so probes due together
run in one loop iteration: one wake-up, one NATS write and one read of acks per batch.
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


def aligned_due(now: float, initial_delay: float, period: float, key: str) -> float:
    """The first slot of ``key`` on the shared grid (wall clock: ``phase_offset`` past a
    multiple of the period) not before ``now + initial_delay``."""
    start = now + initial_delay
    due = first_due(math.floor(start / period) * period, 0.0, period, key)
    return due if due >= start else due + period


def catch_up_due(now: float, since: float, period: float, key: str) -> float:
    """The first slot of a target taken over from another member: its first slot on the
    grid at or after ``since`` (from when its slots were nobody's), or ``now`` when that
    one has passed: a missed slot is caught up once, late, never as a burst of several."""
    return max(now, aligned_due(since, 0.0, period, key))


def after_takeover(first: float, period: float, key: str) -> float:
    """The slot after a first probe due at ``first`` that may be off the grid (caught up
    late): back on the grid, at least half a period later, so targets taken over together
    spread again rather than fire together from then on."""
    return aligned_due(first, period / 2, period, key)


def next_due(due: float, period: float, now: float) -> tuple[float, int]:
    """The slot after ``due``, and how many slots were skipped to get there.

    Like Go's ticker (kubelet's), a probe that overran its slot is followed at once by the
    slot it overlapped, late but not lost: with ``timeout_seconds`` equal to the period, a
    timed-out probe is followed straight away, so two failures take two periods, not
    three. Only slots that passed entirely are skipped, never fired as a burst.
    """
    following = due + period
    if following > now:
        return following, 0
    missed = math.floor((now - following) / period)
    return following + missed * period, missed


TICK_SECONDS = 0.02


def on_tick(t: float, tick: float = TICK_SECONDS) -> float:
    """``t`` rounded up to the grid (never earlier than asked)."""
    return math.ceil(t / tick - 1e-6) * tick
