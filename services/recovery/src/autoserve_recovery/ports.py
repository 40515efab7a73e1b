"""The ports of recovery's parts: what each part needs from outside itself, as protocols.

The adapters (``adapters/``: Docker, local processes, nginx, the health check, the KV
claims) and the bus (``feeds.py``, ``records.py``, nats-py's messages) implement them; the
unit tests fake them in memory. The values they speak (``Member``, ``Outcome``) and the
error an action fails with (``RecoveryError``) live here too, so no part imports an adapter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from autoserve_config import AppSpec
from autoserve_events import Event, FailureDetected, RecoveryExecuted
from autoserve_runtime import PullStats

from .core import RecoveryState

# (app, instance id, timeout) -> became healthy in time; answered from HealthChanged events.
AwaitHealthy = Callable[[str, str, float], Awaitable[bool]]
KeepAlive = Callable[[], Awaitable[object]]  # tells JetStream the input is still worked on


class RecoveryError(Exception):
    """An action that could not be done, with a message an operator can act on."""


class ClaimHeld(Exception):
    """An action claim another replica still holds while this one holds the instance's
    lease: its owner died after its instance lease ran out and before its action claim
    did. Not done, so not dropped: the input is looked at again once the claim runs out."""

    def __init__(self, key: str, owner: str, until: float) -> None:
        super().__init__(f"{key} is held by {owner} until {until:.3f}")
        self.retry_in = max(0.05, until - time.time())


@dataclass(frozen=True)
class Member:
    """One upstream server of an app: what the LB routes to."""

    instance_id: str
    host: str
    port: int


@dataclass
class Outcome:
    details: dict[str, object] = field(default_factory=dict)


# -- what acts on instances ----------------------------------------------------------------


class Runtime(Protocol):
    """What a runtime can do to an instance, whatever runs it (Docker, a local process).
    One that cannot do every rung also has ``capabilities: Capabilities`` (the local
    process runtime); ``AppPolicy.for_runtime`` ends the escalation there."""

    name: str

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


class Runtimes(Protocol):
    """Which runtime runs an instance, and what the LB routes to (``runtimes.py``)."""

    def runtime_for(self, app_name: str, instance_id: str, spec: AppSpec) -> Runtime:
        """Raises ``RecoveryError`` saying why none does."""

    async def members(self, app_name: str, spec: AppSpec) -> list[Member]: ...

    async def lineage(self, app_name: str, instance_id: str, spec: AppSpec) -> str | None:
        """The slot a container recovery created belongs to (None: not one of those)."""


class LoadBalancer(Protocol):
    """The app's upstream (``adapters/nginx.py``)."""

    def manages(self, app_name: str) -> bool: ...

    async def set_down(
        self, app_name: str, members: list[Member], instance_id: str | None, down: bool
    ) -> dict[str, object]: ...


class HealthCheck(Protocol):
    """The app's own health check run directly against one member (``adapters/health.py``):
    None when it passes, else the error."""

    async def check(self, app_name: str, member: Member, spec: AppSpec) -> str | None: ...

    async def answers(self, app_name: str, member: Member, spec: AppSpec, deadline: float) -> str | None: ...


# -- claims ---------------------------------------------------------------------------------


class HeldClaim(Protocol):
    """A claim another replica wrote before (``adapters/claims.Lease``)."""

    @property
    def owner(self) -> str: ...

    @property
    def action(self) -> str: ...

    @property
    def since(self) -> float: ...


Claim = tuple[int, HeldClaim | None]  # (revision, the claim it replaced)


class ClaimStore(Protocol):
    """At-most-once claims and instance leases (``adapters/claims.py``)."""

    async def acquire(self, key: str, cause: str, *, reusable: bool = False, action: str = "") -> Claim | None: ...

    async def claim_action(self, key: str, cause: str, action: str) -> Claim | None:
        """None when that action was done; ``ClaimHeld`` when another replica holds it."""

    async def renew(self, key: str, cause: str) -> None: ...

    async def finish(self, key: str, cause: str) -> None: ...


# -- the bus --------------------------------------------------------------------------------


class Fold(Protocol):
    """The state feed as the parts read it (``feeds.StateFold``)."""

    state: RecoveryState

    async def caught_up(self, seq: int, timeout: float) -> bool:
        """The fold has reached stream sequence ``seq`` (False: not within ``timeout``)."""

    async def await_healthy(self, app_name: str, instance_id: str, timeout: float) -> bool: ...


class Records(Protocol):
    """The record step (``records.py``): an event stored before the input is acknowledged."""

    async def publish(self, event: Event) -> None:
        """Stored in JetStream, or ``RecoveryError``."""

    def announce(self, event: Event) -> None:
        """Published without waiting for it to be stored (a panic announcement)."""

    async def record(self, event: RecoveryExecuted) -> None:
        """Stored, then folded here at once (the state feed brings it again, and is dropped)."""

    async def last_seq(self, app_name: str, *instance_ids: str) -> int:
        """The stream sequence of the last ``RecoveryExecuted`` of these instances (0: none)."""


# The app's spec as configured in KV now (None: not configured).
SpecOf = Callable[[str], AppSpec | None]
# The decide step's restore of a left-out member (cause, spec, instance): False if another
# replica holds the instance's lease.
Restore = Callable[[FailureDetected, AppSpec, str], Awaitable[bool]]


class Roll(Protocol):
    """The rolling restart (``rolling.RollingRestart.run``)."""

    async def __call__(self, cause: FailureDetected, runtime: Runtime, spec: AppSpec, timeout: float) -> Outcome: ...


# -- the work feed --------------------------------------------------------------------------


class WorkMessage(Protocol):
    """One input from the work durable (nats-py's ``Msg``)."""

    data: bytes
    subject: str

    @property
    def metadata(self) -> Any: ...  # ``Msg.Metadata``: sequence.stream, num_delivered, stream

    async def ack(self) -> None: ...

    async def nak(self, delay: float | None = None) -> None: ...

    async def in_progress(self) -> None: ...


class WorkSource(Protocol):
    """The bound pull subscription."""

    async def fetch(self, batch: int = 1, timeout: float | None = 5) -> list[Any]: ...


class WorkCounts(Protocol):
    """``autoserve_runtime.PullConsumer``: what ``/metrics`` reads of the work feed."""

    stats: PullStats

    def acked(self, seq: int) -> None: ...


class RawPublisher(Protocol):
    """``autoserve_runtime.EventPublisher`` as dead letters use it."""

    def submit_raw(
        self, subject: str, payload: bytes, headers: dict[str, str], *, track: bool = False
    ) -> asyncio.Future[bool] | None: ...

    async def room(self) -> None:
        """Return once the publisher takes more input (at once unless it is full)."""


# (input, keep-alive) -> None when done (acknowledge), else the delay to look at it again.
Handler = Callable[[Event, KeepAlive], Awaitable[float | None]]
