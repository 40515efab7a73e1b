"""What to probe: targets from the config and from discovered containers, which of them
this member owns, and how the set changes. A target's key is ``(app_name, instance_id)``:
one worker per key. ``Target`` itself is a probe's (``autoserve_probes``).

Ownership is rendezvous hashing of ``"<app>/<instance>"`` over the prober's live members
(``autoserve_runtime.ownership``): a member joining or leaving moves only its share.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from autoserve_config import AppSpec
from autoserve_probes import Target, TargetKey
from autoserve_runtime.ownership import owner_of


@dataclass(frozen=True)
class Container:
    """What discovery needs to know of a running container."""

    container_id: str
    app_name: str
    ip: str | None  # its address on its network; None with network_mode=host
    port_label: int | None  # the container's ``autoserve.port`` label


@dataclass(frozen=True)
class TargetChanges:
    added: tuple[Target, ...]
    removed: tuple[TargetKey, ...]
    changed: tuple[Target, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def short_id(container_id: str) -> str:
    return container_id[:12]


def desired_targets(
    apps: Mapping[str, AppSpec],
    containers: Mapping[str, Container] | None = None,
) -> dict[TargetKey, Target]:
    """Every enabled target of every app, of every member (``Owners`` picks this one's)."""
    targets: dict[TargetKey, Target] = {}
    for app_name, spec in apps.items():
        check = spec.health_check
        if not check.enabled:
            continue
        for instance in spec.instances:
            target = Target(app_name, instance.id, instance.host, instance.port or check.port, check)
            targets[target.key] = target
    for container in (containers or {}).values():
        spec = apps.get(container.app_name)
        if spec is None or spec.docker is None or not spec.health_check.enabled:
            continue
        port = spec.docker.port or container.port_label or spec.health_check.port
        target = Target(
            container.app_name,
            short_id(container.container_id),
            container.ip or "127.0.0.1",
            port,
            spec.health_check,
            source="docker",
            container_id=container.container_id,
        )
        targets[target.key] = target
    return targets


def diff(current: Mapping[TargetKey, Target], desired: Mapping[TargetKey, Target]) -> TargetChanges:
    return TargetChanges(
        added=tuple(t for key, t in desired.items() if key not in current),
        removed=tuple(key for key in current if key not in desired),
        changed=tuple(t for key, t in desired.items() if key in current and current[key] != t),
    )


def target_name(key: TargetKey) -> str:
    """The key ownership hashes (and the schedule's phase): ``"<app>/<instance>"``."""
    return f"{key[0]}/{key[1]}"


def taken_over(
    desired: Collection[TargetKey], running: Collection[TargetKey], known: Collection[TargetKey]
) -> set[TargetKey]:
    """Targets this member gains that existed before (in ``known``, the last reconcile's
    targets of every member): another member was probing them. New targets and a first
    start are not taken over: they start on their phase."""
    return {key for key in desired if key not in running and key in known}


HANDOVER_GRACE_SECONDS = 0.25  # beyond how long the news of a graceful leave takes to arrive


def takeover_since(
    departed: Collection[str], heard: Mapping[str, float], now: float, wall_now: float, ttl: float
) -> float:
    """From when (wall clock) the slots of the targets taken over now were nobody's: a slot
    since then is caught up at once (``schedule.catch_up_due``).

    A member that stopped gracefully renewed its key within a heartbeat (a third of the
    TTL) of leaving, and probed its targets until it left, a moment ago: only a slot within
    ``HANDOVER_GRACE_SECONDS`` may have been missed, and the others keep their slots on the
    shared grid, once per period. One that died (SIGKILL, a pause, a cut) was last heard
    at least a TTL ago: its targets have missed slots, and are probed at once (0: since
    ever). Targets regained after this member's own lease lapsed follow the first rule:
    the others that took them over probe them until they see it back, and a zombie's
    probe beside theirs is what fencing avoids (a lapse too short for the others to take
    over leaves a gap of the lapse and a period, within 2 periods + TTL). ``heard``: when
    (monotonic, ``now``) each member's last renewal arrived, as last seen."""
    if any(now - heard.get(member, float("-inf")) > ttl * 2 / 3 for member in departed):
        return 0.0
    return wall_now - HANDOVER_GRACE_SECONDS


@dataclass
class Owners:
    """Who owns each target among ``members``: rendezvous hashing, remembered until the
    members change (a reconcile of 100,000 targets would otherwise hash each one per member
    again on every config or container change).

    While fenced (its lease may have lapsed) a member owns nothing, unless it was alone in
    its last view: then nobody can have taken its targets over, and a prober cut off from
    NATS goes on probing and buffering, as one prober always did. A member that is
    stopping owns nothing: it has handed its targets over."""

    member: str
    _members: frozenset[str] = field(default=frozenset(), init=False)
    _owner: dict[TargetKey, str | None] = field(default_factory=dict, init=False)

    def owns(self, key: TargetKey, members: frozenset[str], *, fenced: bool, stopping: bool = False) -> bool:
        alive = members | {self.member}
        if stopping:
            return False
        if fenced:
            return alive == {self.member}
        if alive != self._members:
            self._members, self._owner = alive, {}
        owner = self._owner.get(key, "")
        if owner == "":
            owner = self._owner[key] = owner_of(target_name(key), alive)
        return owner == self.member
