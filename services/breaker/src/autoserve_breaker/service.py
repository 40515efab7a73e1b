"""The breaker's composition root: wires NATS, the config watch, the replay, the handlers
and the timer around the pure core, and stops them in order.

Start-up is the replay: (1) every breaker's last transition and trial count, from the
breaker events in AUTOSERVE_EVENTS; (2) probe results after each breaker's last transition,
from AUTOSERVE_PROBES up to the durable consumer's ack floor; then live. Only then does it
answer ``allow``, so a restarted breaker answers exactly as before, open waits included.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time

import structlog

from autoserve_events import (
    APPS_BUCKET,
    BREAKER_ALLOW_RPC,
    BREAKER_OVERRIDE_RPC,
    BREAKER_REPORT_WILDCARD,
    durables,
)
from autoserve_runtime import (
    Admission,
    ConsumerSpec,
    EventConsumer,
    EventPublisher,
    cancel_all,
    close_nats,
    connect,
    follow_apps,
    provision,
)

from .adapters.follow import BreakerEventFollower
from .adapters.handlers import SERVICE, Handlers
from .core.breakers import Breakers

log = structlog.get_logger("autoserve.breaker")

ALLOW_QUEUE = "autoserve-breaker"  # replicas share allow requests
REPLAY_SECONDS = durables.BREAKER_REPLAY_SECONDS
CONFIG_WAIT_SECONDS = 10.0


def replica_of(app_name: str, instance_id: str, replicas: int) -> int:
    """The replica that decides for this breaker: a stable hash, as the prober's shards."""
    digest = hashlib.blake2b(f"{app_name}/{instance_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % replicas


class BreakerService:
    def __init__(self, nats_url: str, *, replica: int = 0, replicas: int = 1, replay_seconds: float = REPLAY_SECONDS):
        if not 0 <= replica < replicas:
            raise ValueError(f"replica {replica} is not in 0..{replicas - 1}")
        self.nats_url = nats_url
        self.replica = replica
        self.replicas = replicas
        self.replay_seconds = replay_seconds
        self.core = Breakers(owns=self._owns)
        self.ready = asyncio.Event()
        self.handlers: Handlers | None = None
        self.consumer: EventConsumer | None = None
        self.publisher: EventPublisher | None = None
        self.follower: BreakerEventFollower | None = None
        self.replayed = {"breakers": 0, "probes": 0}

    def _owns(self, app_name: str, instance_id: str) -> bool:
        return self.replicas == 1 or replica_of(app_name, instance_id, self.replicas) == self.replica

    @property
    def durable(self) -> str:
        return SERVICE if self.replicas == 1 else f"{SERVICE}-{self.replica}-of-{self.replicas}"

    async def run(self, stop: asyncio.Event) -> None:
        nc = await connect(self.nats_url, f"autoserve-{self.durable}")
        js = nc.jetstream()
        await provision(js)
        self.publisher = publisher = EventPublisher(js).start()
        tasks: list[asyncio.Task[None]] = []
        subs = []
        try:
            configured = asyncio.Event()
            admission = Admission()

            def on_apps(apps: dict, _written_at: float | None) -> None:
                self.core.set_apps(apps)
                admission.update(apps)
                configured.set()

            kv = await js.key_value(APPS_BUCKET)
            tasks.append(asyncio.create_task(follow_apps(kv, on_apps), name="follow-apps"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(configured.wait(), CONFIG_WAIT_SECONDS)

            self.follower = BreakerEventFollower(js, self.core.follow)
            self.replayed["breakers"] = await self.follower.start()
            spec = ConsumerSpec.of(durables.BREAKER, self.durable)
            self.consumer = EventConsumer(js, publisher, spec, SERVICE, self.core.probe, admit=admission)
            floor = await self.consumer.ack_floor()
            self.replayed["probes"] = await self.consumer.replay(
                time.time() - self.replay_seconds, floor, spec.filter_subject
            )
            await self.consumer.start()

            self.handlers = handlers = Handlers(nc, self.core, publisher)
            subs.append(await nc.subscribe(BREAKER_REPORT_WILDCARD, cb=handlers.on_report, pending_msgs_limit=-1))
            subs.append(await nc.subscribe(BREAKER_OVERRIDE_RPC, cb=handlers.on_override))
            subs.append(await nc.subscribe(BREAKER_ALLOW_RPC, queue=ALLOW_QUEUE, cb=handlers.on_allow))
            await nc.flush()
            tasks.append(asyncio.create_task(handlers.tick_forever(), name="breaker-timer"))
            log.info(
                "breaker started",
                replica=self.replica,
                replicas=self.replicas,
                breakers=len(self.core.breakers),
                replayed=self.replayed,
                states=self.core.states(),
            )
            self.ready.set()
            await stop.wait()
        finally:
            log.info("breaker stopping")
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            await cancel_all(tasks)
            if self.consumer is not None:
                await self.consumer.stop()
            if self.follower is not None:
                with contextlib.suppress(Exception):
                    await self.follower.stop()
            await publisher.close()
            await close_nats(nc)
            log.info("breaker stopped", states=self.core.states(), published=publisher.stats.acked)
