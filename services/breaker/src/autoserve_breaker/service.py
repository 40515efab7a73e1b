"""The breaker's composition root: the config watch, the replay, the handlers and the timer
around the pure core, on the service host.

Start-up is the replay: (1) every breaker's last transition and trial count, from the
breaker events in AUTOSERVE_EVENTS; (2) probe results after each breaker's last transition,
from AUTOSERVE_PROBES up to the durable consumer's ack floor; then live. Only then does it
answer ``allow``, so a restarted breaker answers exactly as before, open waits included.
"""

from __future__ import annotations

import hashlib
from typing import Any

from autoserve_events import APPS_BUCKET, BREAKER_ALLOW_RPC, BREAKER_OVERRIDE_RPC, BREAKER_REPORT_WILDCARD, durables
from autoserve_runtime import Admission, ConsumerSpec, follow_apps
from autoserve_runtime.host import Consume, Host, HostedService, Plan, Rpc, Watch
from autoserve_runtime.timer import DueTimer

from .adapters.follow import BreakerEventFollower
from .adapters.handlers import SERVICE, Handlers
from .core.breakers import Breakers

ALLOW_QUEUE = "autoserve-breaker"  # replicas share allow requests
REPLAY_SECONDS = durables.BREAKER_REPLAY_SECONDS


def replica_of(app_name: str, instance_id: str, replicas: int) -> int:
    """The replica that decides for this breaker: a stable hash, as the prober's shards."""
    digest = hashlib.blake2b(f"{app_name}/{instance_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % replicas


class BreakerService(HostedService):
    name = SERVICE

    def __init__(self, nats_url: str, *, replica: int = 0, replicas: int = 1, replay_seconds: float = REPLAY_SECONDS):
        if not 0 <= replica < replicas:
            raise ValueError(f"replica {replica} is not in 0..{replicas - 1}")
        super().__init__(nats_url)
        self.replica = replica
        self.replicas = replicas
        self.replay_seconds = replay_seconds
        self.core = Breakers(owns=self._owns)
        self.handlers: Handlers | None = None
        self._admission = Admission()

    def _owns(self, app_name: str, instance_id: str) -> bool:
        return self.replicas == 1 or replica_of(app_name, instance_id, self.replicas) == self.replica

    @property
    def durable(self) -> str:
        return SERVICE if self.replicas == 1 else f"{SERVICE}-{self.replica}-of-{self.replicas}"

    @property
    def consumer_spec(self) -> ConsumerSpec:
        return ConsumerSpec.of(durables.BREAKER, self.durable)

    @property
    def client_name(self) -> str:
        return f"autoserve-{self.durable}"

    async def open(self, host: Host) -> None:
        assert host.nc is not None
        self.handlers = Handlers(host.nc, self.core, host.publisher)

    def plan(self) -> Plan:
        assert self.handlers is not None
        return Plan(
            watches=[Watch(APPS_BUCKET, follow_apps, self._on_apps)],
            consumes=[Consume(self.consumer_spec, self.core.probe, lambda: self.replay_seconds, self._admission)],
            rpcs=[
                Rpc(BREAKER_REPORT_WILDCARD, self.handlers.on_report, unbounded=True),
                Rpc(BREAKER_OVERRIDE_RPC, self.handlers.on_override),
                Rpc(BREAKER_ALLOW_RPC, self.handlers.on_allow, queue=ALLOW_QUEUE),
            ],
        )

    def _on_apps(self, apps: dict, _written_at: float | None) -> None:
        self.core.set_apps(apps)
        self._admission.update(apps)

    async def prepare(self, host: Host) -> None:
        """Each breaker's last transition first: the probe replay folds on top of it."""
        follower = BreakerEventFollower(host.js, self.core.follow)
        self.replayed["breaker-events"] = await follower.start()
        host.closing(follower.stop)

    async def started(self, host: Host) -> None:
        assert self.handlers is not None
        # Waits are short: a trial's timeout is measured in seconds and nothing wakes the timer.
        timer = DueTimer(SERVICE, self.handlers.tick, min_wait=0.005, max_wait=0.25)
        host.spawn(timer.run(), "breaker-timer")

    def stopped(self) -> dict[str, Any]:
        published = self.publisher.stats.acked if self.publisher else 0
        return {
            "replica": self.replica,
            "replicas": self.replicas,
            "states": self.core.states(),
            "published": published,
        }
