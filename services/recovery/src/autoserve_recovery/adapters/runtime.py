"""What a runtime can do to an instance, whatever runs it (Docker, a local process)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

# (app, instance id, timeout) -> became healthy in time; answered from HealthChanged events.
AwaitHealthy = Callable[[str, str, float], Awaitable[bool]]


class RecoveryError(Exception):
    """An action that could not be done, with a message an operator can act on."""


@dataclass(frozen=True)
class Member:
    """One upstream server of an app: what the LB routes to."""

    instance_id: str
    host: str
    port: int


@dataclass
class Outcome:
    details: dict[str, object] = field(default_factory=dict)


class Runtime(Protocol):
    name: str
    # A runtime that cannot do every rung also has ``capabilities: Capabilities`` (the local
    # process runtime); ``AppPolicy.for_runtime`` ends the escalation there.

    def owns(self, app_name: str, instance_id: str) -> bool: ...

    async def restart(self, app_name: str, instance_id: str, timeout: float) -> Outcome: ...

    async def recreate(self, app_name: str, instance_id: str, timeout: float) -> Outcome: ...

    async def replace(
        self, app_name: str, instance_id: str, timeout: float, healthy: AwaitHealthy, cause: str = ""
    ) -> Outcome: ...

    async def scale_out(
        self, app_name: str, instance_id: str, max_replicas: int, timeout: float, cause: str = ""
    ) -> Outcome: ...

    async def took_effect(
        self, app_name: str, instance_id: str, lineage: str, strategy: str, since: float, cause: str
    ) -> Outcome | None:
        """Whether an action a crashed replica began at ``since`` already happened."""

    async def stop(self, app_name: str, instance_id: str, timeout: float) -> Outcome: ...

    async def instances(self, app_name: str) -> list[str]: ...

    async def members(self, app_name: str) -> list[Member]: ...
