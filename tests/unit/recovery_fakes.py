"""In-memory fakes of recovery's ports (``autoserve_recovery.ports``), shared by the unit tests
of its parts: the work feed, the action runner and the rolling restart. Each keeps a log of
what it was asked, in order, so a test reads as a sequence of inputs and what came out."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import time
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from autoserve_config import AppSpec, DockerDiscovery, HealthCheckConfig, Instance, RecoveryConfig
from autoserve_events import Event, FailureDetected, FailureType, HealthChanged, RecoveryExecuted, encode
from autoserve_recovery.core import RecoveryState
from autoserve_recovery.leases import InstanceLeases
from autoserve_recovery.ports import ClaimHeld, Member, Outcome, RecoveryError
from autoserve_runtime import PullStats

_ids = itertools.count(1)
REPLICA = "r1"


# -- events and specs -----------------------------------------------------------------------


def failure(
    instance: str = "web-1", kind: FailureType = FailureType.CONTAINER_STOPPED, app: str = "web", **fields: object
) -> FailureDetected:
    return FailureDetected(event_id=f"f{next(_ids)}", failure_type=kind, instance_id=instance, app_name=app,
                           severity="high", message="down", timestamp=time.time(), consecutive_count=3,
                           **fields)  # type: ignore[arg-type]  # fmt: skip


def health(instance: str, healthy: bool, app: str = "web", at: float | None = None) -> HealthChanged:
    return HealthChanged(event_id=f"h{next(_ids)}", instance_id=instance, app_name=app, healthy=healthy,
                         previous=not healthy, consecutive=3, reason="", timestamp=at or time.time())  # fmt: skip


def spec(*instances: str, docker: bool = False, **recovery: object) -> AppSpec:
    """An app of ``instances`` on 127.0.0.1 (ports 8001, 8002, ...)."""
    return AppSpec(
        health_check=HealthCheckConfig(port=8000, period_seconds=0.01),
        instances=[Instance(id=i, host="127.0.0.1", port=8001 + n) for n, i in enumerate(instances)],
        docker=DockerDiscovery(label="app=web") if docker else None,
        recovery=RecoveryConfig(**recovery),  # type: ignore[arg-type]
    )


# -- the bus --------------------------------------------------------------------------------


@dataclass
class FakeMsg:
    """A work input as nats-py hands it: what was done with it is in ``replies``."""

    data: bytes
    seq: int
    delivered: int = 1
    subject: str = "autoserve.event.failure.web.web-1"
    replies: list[tuple[str, float | None]] = field(default_factory=list)

    @classmethod
    def of(cls, event: Event | bytes, seq: int, delivered: int = 1) -> FakeMsg:
        return cls(event if isinstance(event, bytes) else encode(event), seq, delivered)

    @property
    def metadata(self) -> Msg.Metadata:
        return Msg.Metadata(
            sequence=Msg.Metadata.SequencePair(consumer=self.seq, stream=self.seq), num_pending=0,
            num_delivered=self.delivered, timestamp=datetime.datetime.now(datetime.UTC),
            stream="AUTOSERVE_EVENTS", consumer="autoserve-recovery",
        )  # fmt: skip

    async def ack(self) -> None:
        self.replies.append(("ack", None))

    async def nak(self, delay: float | None = None) -> None:
        self.replies.append(("nak", delay))

    async def in_progress(self) -> None:
        self.replies.append(("in_progress", None))


class FakeSource:
    """The pull subscription: each ``put`` is what one fetch returns; a fetch with nothing
    to hand out ends its (short) long poll with nats-py's timeout."""

    def __init__(self) -> None:
        self._batches: asyncio.Queue[list[FakeMsg]] = asyncio.Queue()

    def put(self, *msgs: FakeMsg) -> None:
        self._batches.put_nowait(list(msgs))

    async def fetch(self, batch: int = 1, timeout: float | None = 5) -> list[FakeMsg]:
        import nats.errors

        try:
            return await asyncio.wait_for(self._batches.get(), 0.01)
        except TimeoutError:
            raise nats.errors.TimeoutError from None


class FakeCounts:
    def __init__(self) -> None:
        self.stats = PullStats()

    def acked(self, seq: int) -> None:
        self.stats.acked_seq = max(self.stats.acked_seq, seq)


class FakeDeadLetters:
    def __init__(self) -> None:
        self.letters: list[tuple[str, bytes, dict[str, str]]] = []

    def submit_raw(
        self, subject: str, payload: bytes, headers: dict[str, str], *, track: bool = False
    ) -> asyncio.Future[bool] | None:
        self.letters.append((subject, payload, headers))
        done = asyncio.get_running_loop().create_future()
        done.set_result(True)
        return done if track else None

    async def room(self) -> None:  # never full: nothing waits
        return None


class FakeFold:
    """The state fold as the parts read it: always caught up unless told otherwise."""

    def __init__(self, state: RecoveryState | None = None) -> None:
        self.state = state or RecoveryState()
        self.folded_up_to: int | None = None  # None: everything

    async def caught_up(self, seq: int, timeout: float) -> bool:
        return self.folded_up_to is None or seq <= self.folded_up_to

    async def await_healthy(self, app_name: str, instance_id: str, timeout: float) -> bool:
        return bool(self.state.health.get(app_name, {}).get(instance_id))


class FakeRecords:
    """The record step: every event stored at once (unless ``failing``), recorded ones folded."""

    def __init__(self, state: RecoveryState) -> None:
        self.state = state
        self.published: list[Event] = []
        self.announced: list[Event] = []
        self.failing = False

    async def publish(self, event: Event) -> None:
        if self.failing:
            raise RecoveryError(f"could not store {type(event).__name__} {event.event_id}")
        self.published.append(event)

    def announce(self, event: Event) -> None:
        self.announced.append(event)

    async def record(self, event: RecoveryExecuted) -> None:
        await self.publish(event)
        self.state.apply(event)

    async def last_seq(self, app_name: str, *instance_ids: str) -> int:
        return 0

    @property
    def executed(self) -> list[RecoveryExecuted]:
        return [e for e in self.published if isinstance(e, RecoveryExecuted)]

    def done(self) -> list[tuple[str, str, bool]]:
        """(strategy or operation, instance, success) of each record, in order."""
        return [(str(e.details.get("operation") or e.strategy), e.instance_id, e.success) for e in self.executed]


# -- claims ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeLease:
    owner: str
    until: float
    cause: str = ""
    done: bool = False
    action: str = ""
    since: float = 0.0


class FakeClaims:
    """The KV claims' rules in a dict: a key is taken if free, finished-and-reusable, expired,
    or already this owner's; a finished action claim is never taken again."""

    def __init__(self, owner: str = REPLICA, lease_seconds: float = 15.0) -> None:
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.leases: dict[str, FakeLease] = {}
        self.log: list[tuple[str, str]] = []  # (what, key)

    def hold(self, key: str, owner: str, *, action: str = "", since: float = 0.0, expired: bool = False) -> None:
        """Another replica's claim (``expired``: that replica died)."""
        until = time.time() + (-1 if expired else self.lease_seconds)
        self.leases[key] = FakeLease(owner, until, action=action, since=since)

    async def acquire(
        self, key: str, cause: str, *, reusable: bool = False, action: str = ""
    ) -> tuple[int, FakeLease | None] | None:
        held = self.leases.get(key)
        if held is not None:
            if held.done and not reusable:
                return None
            if not held.done and held.until > time.time() and held.owner != self.owner:
                return None
        self.leases[key] = FakeLease(self.owner, time.time() + self.lease_seconds, cause, action=action,
                                     since=time.time())  # fmt: skip
        self.log.append(("acquire", key))
        return 1, held

    async def claim_action(self, key: str, cause: str, action: str) -> tuple[int, FakeLease | None] | None:
        claim = await self.acquire(key, cause, action=action)
        if claim is None and not (held := self.leases[key]).done:
            raise ClaimHeld(key, held.owner, held.until)
        return claim

    async def renew(self, key: str, cause: str) -> None:
        self.log.append(("renew", key))

    async def finish(self, key: str, cause: str) -> None:
        held = self.leases[key]
        if held.owner == self.owner:
            self.leases[key] = FakeLease(held.owner, held.until, cause, True, held.action, held.since)
            self.log.append(("finish", key))

    def finished(self, key: str) -> bool:
        return key in self.leases and self.leases[key].done


# -- what acts on instances -----------------------------------------------------------------


@dataclass
class FakeRuntime:
    """A runtime whose instances are names; ``errors`` and ``delays`` script an action by
    instance, ``done_before`` what a crashed replica already did."""

    name: str = "fake"
    running: list[str] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)
    errors: dict[str, Exception] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    done_before: Outcome | None = None

    def owns(self, app_name: str, instance_id: str) -> bool:
        return instance_id in self.running

    async def _do(self, action: str, instance_id: str, timeout: float | None = None) -> Outcome:
        """As a runtime does: within ``timeout`` (``TimeoutError``), or failing as scripted."""
        self.calls.append((action, instance_id))
        await asyncio.wait_for(asyncio.sleep(self.delays.get(instance_id, 0)), timeout)
        if instance_id in self.errors:
            raise self.errors[instance_id]
        return Outcome({action: instance_id})

    async def restart(self, app_name: str, instance_id: str, timeout: float) -> Outcome:
        return await self._do("restart", instance_id, timeout)

    async def recreate(self, app_name: str, instance_id: str, timeout: float) -> Outcome:
        return await self._do("recreate", instance_id, timeout)

    async def replace(self, app_name: str, instance_id: str, timeout: float, healthy, cause: str = "") -> Outcome:  # type: ignore[no-untyped-def]
        return await self._do("replace", instance_id, timeout)

    async def scale_out(
        self, app_name: str, instance_id: str, max_replicas: int, timeout: float, cause: str = ""
    ) -> Outcome:
        self.running.append(f"{instance_id}-copy")
        return await self._do("scale_out", instance_id, timeout)

    async def took_effect(
        self, app_name: str, instance_id: str, lineage: str, strategy: str, since: float, cause: str
    ) -> Outcome | None:
        self.calls.append(("took_effect", instance_id))
        return self.done_before

    async def stop(self, app_name: str, instance_id: str, timeout: float) -> Outcome:
        return await self._do("stop", instance_id, timeout)

    async def instances(self, app_name: str) -> list[str]:
        return list(self.running)

    async def members(self, app_name: str) -> list[Member]:
        return [Member(i, "127.0.0.1", 9000 + n) for n, i in enumerate(self.running)]


class FakeRuntimes:
    """Every instance on the one runtime, the app's members from its spec and the runtime."""

    def __init__(self, runtime: FakeRuntime | None) -> None:
        self.runtime = runtime

    def runtime_for(self, app_name: str, instance_id: str, spec: AppSpec) -> FakeRuntime:
        if self.runtime is None:
            raise RecoveryError(f"instance {instance_id!r} of {app_name!r} has no runtime")
        return self.runtime

    async def members(self, app_name: str, spec: AppSpec) -> list[Member]:
        listed = [Member(i.id, i.host, i.port or spec.health_check.port) for i in spec.instances]
        extra = await self.runtime.members(app_name) if self.runtime and spec.docker else []
        return listed + extra

    async def lineage(self, app_name: str, instance_id: str, spec: AppSpec) -> str | None:
        return None


class FakeLB:
    """The upstream as a set of servers marked down; ``failing`` reloads fail."""

    def __init__(self, managed: bool = True) -> None:
        self.managed = managed
        self.down: set[str] = set()
        self.members: list[str] = []
        self.log: list[tuple[str | None, bool]] = []
        self.failing = False

    def manages(self, app_name: str) -> bool:
        return self.managed

    async def set_down(
        self, app_name: str, members: list[Member], instance_id: str | None, down: bool
    ) -> dict[str, object]:
        self.log.append((instance_id, down))
        if self.failing:
            raise RecoveryError("nginx reload failed (1): test")
        self.members = [m.instance_id for m in members]
        if instance_id is not None:
            (self.down.add if down else self.down.discard)(instance_id)
        return {"down": sorted(self.down)}


class FakeHealth:
    """The app's health check: ``failing`` members fail it (``answers`` gives up at once)."""

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.checked: list[str] = []

    async def check(self, app_name: str, member: Member, spec: AppSpec) -> str | None:
        self.checked.append(member.instance_id)
        return "Unexpected status code: 503" if member.instance_id in self.failing else None

    async def answers(self, app_name: str, member: Member, spec: AppSpec, deadline: float) -> str | None:
        return await self.check(app_name, member, spec)


# -- the parts' common ground ---------------------------------------------------------------


class FakeParts:
    """What the action runner and the rolling restart stand on, over fakes, for one app
    ``web`` of ``instances``: the state and its fold, the record step, the claims, one
    runtime, the LB (unless ``lb`` is False) and the instance leases."""

    def __init__(self, *instances: str, lb: bool = True, lease_seconds: float = 15.0, **recovery: object) -> None:
        self.state = RecoveryState()
        self.fold = FakeFold(self.state)
        self.records = FakeRecords(self.state)
        self.claims = FakeClaims(lease_seconds=lease_seconds)
        self.runtime = FakeRuntime(running=list(instances))
        self.runtimes = FakeRuntimes(self.runtime)
        self.lb = FakeLB() if lb else None
        self.apps = {"web": spec(*instances, **recovery)}
        self.leases = InstanceLeases(self.claims, self.fold, self.records, lease_seconds)
