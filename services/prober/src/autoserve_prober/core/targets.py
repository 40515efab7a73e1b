"""What to probe: targets from the config and from discovered containers, which of them
this shard owns, and how the set changes. A target's key is ``(app_name, instance_id)``:
one worker per key. ``Target`` itself is a probe's (``autoserve_probes``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from autoserve_config import AppSpec
from autoserve_probes import Target, TargetKey


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
    shard: int = 0,
    shards: int = 1,
) -> dict[TargetKey, Target]:
    """Every enabled target of every app that this shard owns."""
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
    if shards > 1:
        targets = {key: t for key, t in targets.items() if shard_of(key, shards) == shard}
    return targets


def diff(current: Mapping[TargetKey, Target], desired: Mapping[TargetKey, Target]) -> TargetChanges:
    return TargetChanges(
        added=tuple(t for key, t in desired.items() if key not in current),
        removed=tuple(key for key in current if key not in desired),
        changed=tuple(t for key, t in desired.items() if key in current and current[key] != t),
    )


def shard_of(key: TargetKey, shards: int) -> int:
    digest = hashlib.blake2b(f"{key[0]}/{key[1]}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards
