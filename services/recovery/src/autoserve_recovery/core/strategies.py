"""The strategy map: the seed's ``_build_strategy_map``, split into traffic and remediation.

The seed stops at the first successful strategy, and ``REMOVE_FROM_LB`` comes first and
always succeeds, so it never restarts anything (DESIGN.md, "where the seed is wrong" 3).
Here every listed traffic action runs, and then one remediation, chosen by escalation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from autoserve_events import FailureType, RecoveryStrategy

S = RecoveryStrategy
F = FailureType

TRAFFIC = frozenset({S.REMOVE_FROM_LB, S.DRAIN_INSTANCE})
# Escalation order: each rung costs more and disturbs more than the one before.
LADDER: tuple[RecoveryStrategy, ...] = (S.RESTART_CONTAINER, S.RECREATE_CONTAINER, S.REPLACE_INSTANCE, S.SCALE_OUT)
REMEDIATION = frozenset({*LADDER, S.ROLLING_RESTART})

# The seed's map. Beyond it: a stopped container is restarted first (what Docker's own
# restart policy does, and the cheapest way back), and the failure types the seed left
# unmapped but that a restart fixes get the health-check treatment.
DEFAULT_STRATEGY_MAP: dict[FailureType, tuple[RecoveryStrategy, ...]] = {
    F.HEALTH_CHECK_FAILED: (S.REMOVE_FROM_LB, S.RESTART_CONTAINER, S.RECREATE_CONTAINER),
    F.HEALTH_CHECK_TIMEOUT: (S.REMOVE_FROM_LB, S.RESTART_CONTAINER),
    F.HIGH_RESPONSE_TIME: (S.REMOVE_FROM_LB, S.SCALE_OUT, S.RESTART_CONTAINER),
    F.HIGH_RESOURCE_USAGE: (S.SCALE_OUT, S.RESTART_CONTAINER, S.REPLACE_INSTANCE),
    F.CONTAINER_STOPPED: (S.RESTART_CONTAINER, S.RECREATE_CONTAINER, S.REPLACE_INSTANCE),
    F.CONTAINER_OOM_KILLED: (S.REPLACE_INSTANCE, S.SCALE_OUT),
    F.NETWORK_UNREACHABLE: (S.REMOVE_FROM_LB, S.RECREATE_CONTAINER),
    F.PORT_NOT_LISTENING: (S.REMOVE_FROM_LB, S.RESTART_CONTAINER),
    F.APPLICATION_STARTUP_FAILED: (S.RESTART_CONTAINER, S.RECREATE_CONTAINER),
    F.APPLICATION_DEADLOCK: (S.REMOVE_FROM_LB, S.RESTART_CONTAINER),
}


def strategy_map(overrides: Mapping[str, Iterable[str]]) -> dict[FailureType, tuple[RecoveryStrategy, ...]]:
    """The defaults with an app's ``recovery.strategies`` replacing whole entries
    (validated by autoserve_config, so every value here is a known one)."""
    merged = dict(DEFAULT_STRATEGY_MAP)
    for failure_type, strategies in overrides.items():
        merged[FailureType(failure_type)] = tuple(RecoveryStrategy(s) for s in strategies)
    return merged


def traffic_steps(strategies: Iterable[RecoveryStrategy]) -> tuple[RecoveryStrategy, ...]:
    return tuple(s for s in strategies if s in TRAFFIC)


@dataclass(frozen=True)
class Capabilities:
    """The remediations an instance's runtime implements (Docker: all; a local process
    has no image to recreate from nor a port of its own to give a replacement)."""

    runtime: str
    remediations: frozenset[RecoveryStrategy]


def remediation_ladder(
    strategies: Iterable[RecoveryStrategy], escalate: bool, capabilities: Capabilities | None = None
) -> tuple[RecoveryStrategy, ...]:
    """The listed remediations in order, then (with ``escalate``) the rungs of ``LADDER``
    above the highest one listed: restart -> recreate -> replace -> scale out. With
    ``capabilities`` the ladder ends where the runtime does: rungs it cannot do are left
    out, and a list of nothing but those becomes the highest rung it can do."""
    listed = tuple(s for s in strategies if s in REMEDIATION)
    ladder = listed
    if escalate and listed:
        top = max((LADDER.index(s) for s in listed if s in LADDER), default=-1)
        ladder = listed + tuple(s for s in LADDER[top + 1 :] if s not in listed)
    if capabilities is None:
        return ladder
    possible = tuple(s for s in ladder if s in capabilities.remediations)
    if possible or not ladder:
        return possible
    return tuple(s for s in reversed(LADDER) if s in capabilities.remediations)[:1]


def rank(strategy: RecoveryStrategy) -> int:
    """Position on the escalation ladder; a rolling restart counts as a restart."""
    return 0 if strategy is S.ROLLING_RESTART else LADDER.index(strategy)
