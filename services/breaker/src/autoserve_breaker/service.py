"""The breaker's composition root: the config watch, the replay, the handlers and the timer
around the pure core, on the service host.

Start-up is the replay: (1) every breaker's last transition and trial count, from the
breaker events in AUTOSERVE_EVENTS; (2) probe results after each breaker's last transition,
from AUTOSERVE_PROBES up to the durable consumer's ack floor; then live. Only then does it
answer ``allow``, so a restarted breaker answers exactly as before, open waits included.

Every process is a member of the breaker service (``autoserve_runtime.membership``): it
decides for the breakers that rendezvous hashing of ``app/instance`` over the live members
gives it, and answers ``allow`` for all of them. When the members change, the breakers it
gains are rebuilt from the log before it decides for them (``takeover``); while its lease
may have lapsed it decides nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog

from autoserve_events import (
    APPS_BUCKET,
    BREAKER_ALLOW_RPC,
    BREAKER_OVERRIDE_RPC,
    BREAKER_REPORT_WILDCARD,
    BreakerStateChanged,
    BreakerTrialAdmitted,
    ProbeCompleted,
    durables,
)
from autoserve_runtime import Admission, ConsumerSpec, follow_apps
from autoserve_runtime.host import Consume, Host, HostedService, Plan, Rpc, Watch
from autoserve_runtime.membership import MEMBER_SLOTS, slot_durable
from autoserve_runtime.ownership import owner_of
from autoserve_runtime.timer import DueTimer

from .adapters.follow import BreakerEventFollower
from .adapters.handlers import SERVICE, Handlers
from .adapters.outbox import Outbox
from .adapters.rebuild import replay_probes
from .core.breakers import Breakers, Owns

log = structlog.get_logger("autoserve.breaker.service")

ALLOW_QUEUE = "autoserve-breaker"  # members share allow requests
REPLAY_SECONDS = durables.BREAKER_REPLAY_SECONDS


def breaker_key(app_name: str, instance_id: str) -> str:
    """The key a breaker is owned by, among the members."""
    return f"{app_name}/{instance_id}"


def owned_by(member: str, members: frozenset[str]) -> Owns:
    return lambda app, instance: owner_of(breaker_key(app, instance), members) == member


class BreakerService(HostedService):
    name = SERVICE
    member_slots = MEMBER_SLOTS  # each member needs a probe durable of its own

    def __init__(self, nats_url: str, *, member: str | None = None, replay_seconds: float = REPLAY_SECONDS):
        super().__init__(nats_url)
        if member is not None:
            self.member = member
        self.replay_seconds = replay_seconds
        self.core = Breakers(may_decide=self._may_decide)
        self.handlers: Handlers | None = None
        self.outbox: Outbox | None = None
        self.reowned = 0  # ownership changes taken in (breakers gained or lost)
        self.rebuilt_probes = 0  # probes those rebuilds folded
        self._admission = Admission()
        self._members: frozenset[str] | None = None  # the view ownership was last computed from; None: fenced
        self._changed = asyncio.Event()
        self._start_floor = 0
        self._lapses = 0  # the membership's lapses the ownership was last computed after

    def _may_decide(self) -> bool:
        """Not while fenced, and not after a lapse until the takeover task has rebuilt what
        it owns: between the two, a resumed member would decide from a stale state."""
        membership = self.membership
        return membership is None or (not membership.fenced and membership.lapses == self._lapses)

    @property
    def durable(self) -> str:
        slot = self.membership.slot if self.membership is not None else None
        return slot_durable(SERVICE, slot)

    @property
    def consumer_spec(self) -> ConsumerSpec:
        return ConsumerSpec.of(durables.BREAKER, self.durable)

    def owns_what(self) -> str:
        return f"{self.core.owned_count()} breakers"

    async def open(self, host: Host) -> None:
        assert host.nc is not None and self.membership is not None
        self.outbox = Outbox(host.publisher, self.core, self.core.resync)
        self.handlers = Handlers(host.nc, self.core, host.publisher, self.outbox)
        self._members = self._view()
        self.core.reown(self._owns_in(self._members))  # the start-up replay rebuilds them all
        self.membership.on_change.append(self._changed.set)

    def plan(self) -> Plan:
        assert self.handlers is not None
        return Plan(
            watches=[Watch(APPS_BUCKET, follow_apps, self._on_apps)],
            consumes=[Consume(self.consumer_spec, self._fold_probe, lambda: self.replay_seconds, self._admission)],
            rpcs=[
                Rpc(BREAKER_REPORT_WILDCARD, self.handlers.on_report, unbounded=True),
                Rpc(BREAKER_OVERRIDE_RPC, self.handlers.on_override),
                Rpc(BREAKER_ALLOW_RPC, self.handlers.on_allow, queue=ALLOW_QUEUE),
            ],
        )

    def _on_apps(self, apps: dict, _written_at: float | None) -> None:
        self.core.set_apps(apps)
        self._admission.update(apps)

    def _fold_probe(self, event: ProbeCompleted) -> list[asyncio.Future[bool]]:
        """The consumer acks a probe once the transitions it caused are stored (or refused)."""
        assert self.outbox is not None
        return [self.outbox.submit(change) for change in self.core.probe(event)]

    def _follow(self, event: BreakerStateChanged | BreakerTrialAdmitted, seq: int) -> bool:
        applied = self.core.follow(event, seq)
        if self.outbox is not None and isinstance(event, BreakerStateChanged):
            self.outbox.logged((event.app_name, event.instance_id))
        return applied

    async def prepare(self, host: Host) -> None:
        """Each breaker's last transition first: the probe replay folds on top of it."""
        follower = BreakerEventFollower(host.js, self._follow)
        self.replayed["breaker-events"] = await follower.start()
        host.closing(follower.stop)

    async def started(self, host: Host) -> None:
        assert self.handlers is not None
        # Waits are short: a trial's timeout is measured in seconds and nothing wakes the timer.
        timer = DueTimer(SERVICE, self.handlers.tick, min_wait=0.005, max_wait=0.25)
        host.spawn(timer.run(), "breaker-timer")
        assert self.consumer is not None
        self._start_floor = await self.consumer.ack_floor()  # the start-up replay's end, at least
        host.spawn(self._follow_members(host), "breaker-members")

    # -- ownership ----------------------------------------------------------------------

    def _view(self) -> frozenset[str] | None:
        membership = self.membership
        assert membership is not None
        return None if membership.fenced else membership.members | {membership.member}

    def _owns_in(self, members: frozenset[str] | None) -> Owns:
        if members is None:
            return lambda app, instance: False
        assert self.membership is not None
        return owned_by(self.membership.member, members)

    async def _follow_members(self, host: Host) -> None:
        """One ownership change at a time: each rebuild finishes before the next is computed."""
        assert self.membership is not None
        while True:
            # Woken by a change, and every TTL anyway: a lapse that no change announced still
            # ends in a rebuild, not in a member that decides nothing for ever.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.membership.ttl)
            self._changed.clear()
            lapses, view = self.membership.lapses, self._view()
            # After a lapse nothing it held is trusted: everything it owns now is gained.
            before = self._members if lapses == self._lapses else None
            if view == before:
                continue
            self._lapses = lapses
            await self._reown(host, before, view)

    async def _reown(self, host: Host, before: frozenset[str] | None, after: frozenset[str] | None) -> None:
        assert self.consumer is not None and self.membership is not None and self.handlers is not None
        owns, owned_before = self._owns_in(after), self._owns_in(before)
        self._members = after
        self.reowned += 1
        if after is None:
            self.core.reown(owns)
            log.warning("fenced: deciding for no breaker until the membership lease is renewed")
            return
        if before is not None and before <= after:
            # Members only joined: rendezvous hashing moves keys to them, never to us.
            self.core.reown(owns)
            log.info("breakers handed over", members=sorted(after), owned=self.core.owned_count())
            return
        gained = lambda app, instance: owns(app, instance) and not owned_before(app, instance)  # noqa: E731
        # Up to what the live consumer has taken; what it takes from now on is held back.
        until = max(self.consumer.highest_seq, self._start_floor)
        self.core.reown(owns, gained)
        started = time.monotonic()
        history = self.core.history_seconds(self.replay_seconds)  # what can still count, not 15 min
        since = time.time() - history
        try:
            folded = await replay_probes(host.js, since, until, self._replay_fold, self._admission, gained)
        except Exception:
            log.exception("takeover replay failed; deciding from the last transitions alone")
            folded = 0
        self.rebuilt_probes += folded
        self.handlers.publish(self.core.rebuilt())
        log.info("breakers taken over", members=sorted(after), owned=self.core.owned_count(),
                 probes_replayed=folded, history_seconds=history, up_to_seq=until,
                 seconds=round(time.monotonic() - started, 3))  # fmt: skip

    def _replay_fold(self, event: ProbeCompleted) -> None:
        assert self.handlers is not None
        self.handlers.publish(self.core.replay_probe(event))

    def stopped(self) -> dict[str, Any]:
        published = self.publisher.stats.acked if self.publisher else 0
        return {
            "member": self.membership.member if self.membership else None,
            "states": self.core.states(),
            "published": published,
            "reowned": self.reowned,
            "refused": self.outbox.refused if self.outbox else 0,
        }
