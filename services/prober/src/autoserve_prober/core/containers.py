"""Docker engine payloads turned into ``ContainerObserved`` events. Pure: the adapter
passes the engine's JSON in, with the app it belongs to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autoserve_events import ContainerObserved, derived_event_id

from .targets import short_id

# health_status arrives as "health_status: healthy"; the rest are plain actions.
OBSERVED_ACTIONS = frozenset({"start", "restart", "die", "oom", "stop", "kill", "health_status"})


def observation_from_event(
    app_name: str, event: Mapping[str, Any], restart_count: int | None = None
) -> ContainerObserved | None:
    action = str(event.get("Action", ""))
    name = action.split(":", 1)[0]
    if name not in OBSERVED_ACTIONS:
        return None
    actor = event.get("Actor") or {}
    container_id = str(actor.get("ID") or event.get("id", ""))
    attributes = actor.get("Attributes") or {}
    exit_code = attributes.get("exitCode")
    time_nano = event.get("timeNano") or 0
    return ContainerObserved(
        event_id=derived_event_id(container_id, action, time_nano),  # the same from every shard
        instance_id=short_id(container_id),
        app_name=app_name,
        container_id=container_id,
        event=action,
        timestamp=int(time_nano) / 1e9 if time_nano else 0.0,
        exit_code=int(exit_code) if exit_code is not None and str(exit_code).lstrip("-").isdigit() else None,
        restart_count=restart_count,
    )


def usage_from_stats(stats: Mapping[str, Any]) -> tuple[float | None, float | None, int | None]:
    """CPU %, memory % and memory bytes, computed as ``docker stats`` does."""
    cpu, pre = stats.get("cpu_stats") or {}, stats.get("precpu_stats") or {}
    cpu_delta = (cpu.get("cpu_usage") or {}).get("total_usage", 0) - (pre.get("cpu_usage") or {}).get("total_usage", 0)
    system_delta = cpu.get("system_cpu_usage", 0) - pre.get("system_cpu_usage", 0)
    online = cpu.get("online_cpus") or len((cpu.get("cpu_usage") or {}).get("percpu_usage") or []) or 1
    cpu_percent = round(cpu_delta / system_delta * online * 100, 2) if system_delta > 0 and cpu_delta >= 0 else None
    memory = stats.get("memory_stats") or {}
    usage, limit = memory.get("usage"), memory.get("limit")
    if usage is None or not limit:
        return cpu_percent, None, None
    # Page cache is reclaimable: docker stats leaves it out (cgroup v2: inactive_file).
    details = memory.get("stats") or {}
    used = usage - details.get("inactive_file", details.get("total_inactive_file", 0))
    return cpu_percent, round(used / limit * 100, 2), int(used)


def stats_observation(app_name: str, container_id: str, stats: Mapping[str, Any], at: float) -> ContainerObserved:
    cpu_percent, memory_percent, memory_bytes = usage_from_stats(stats)
    return ContainerObserved(
        event_id=derived_event_id(container_id, "stats", int(at)),
        instance_id=short_id(container_id),
        app_name=app_name,
        container_id=container_id,
        event="stats",
        timestamp=at,
        cpu_percent=cpu_percent,
        memory_percent=memory_percent,
        memory_usage_bytes=memory_bytes,
    )
