"""The detector's composition root: configuration from KV, partitions, replay, live.

Every process is a member of the detector (``autoserve_runtime.membership``); instances are
split into 64 partitions, each folded by one member (``core/partitions.py``,
``adapters/partitioned.py``). Each member reads every input through a durable of its own
(its member slot's: slot 0 keeps the historic ``autoserve-detector``) and skips those of
partitions it does not own. A partition a member gains (at its start too) is rebuilt by
replaying the last ``failure_rate_window_minutes`` of AUTOSERVE_PROBES, publishing only
the outputs of inputs above the partition's floor (those below were published). So a
restart, or a takeover, in the middle of an incident gives the same counts it would have
given without it, and no transition is published twice. One member works as the single
detector did.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from autoserve_config import AppSpec, DetectorConfig
from autoserve_events import APPS_BUCKET, SETTINGS_BUCKET, durables
from autoserve_runtime import Admission, ConsumerSpec, follow_apps, follow_detector_settings
from autoserve_runtime.host import Consume, Host, HostedService, Plan, Watch
from autoserve_runtime.membership import MEMBER_SLOTS, slot_durable

from .adapters.partitioned import PartitionedDetector, Wiring
from .adapters.slot import DurableSlot
from .core.detector import AppThresholds, Detector

CONSUMER = ConsumerSpec.of(durables.DETECTOR)


def consumer_spec(slot: int | None) -> ConsumerSpec:
    """The durable of a member slot. Slot 0 is the historic one; another slot's starts at
    its creation: the rebuild's replay brings the window, and floors say what is published."""
    if not slot:
        return CONSUMER
    return replace(ConsumerSpec.of(durables.DETECTOR, slot_durable(CONSUMER.durable, slot)), start_seconds_ago=0.0)


def thresholds(apps: dict[str, AppSpec]) -> dict[str, AppThresholds]:
    return {
        name: AppThresholds(
            failure_threshold=spec.health_check.failure_threshold,
            success_threshold=spec.health_check.success_threshold,
            period_seconds=spec.health_check.period_seconds,
        )
        for name, spec in apps.items()
    }


class DetectorService(HostedService):
    name = "detector"
    publisher_buffer = 200_000
    # Not the membership's slots (member_slots): ours wait for a dead holder's slot
    # (adapters/slot.py), so a detector restarted after a crash keeps its durable.

    def __init__(self, nats_url: str) -> None:
        super().__init__(nats_url)
        self.detector = Detector()
        self._settings = DetectorConfig()
        self._apps: dict[str, AppThresholds] = {}
        self._admission = Admission()
        self.partitioned = PartitionedDetector(self.detector, self._admission)
        self.spec = CONSUMER
        self.slot: DurableSlot | None = None

    async def open(self, host: Host) -> None:
        assert self.membership is not None
        membership = self.membership
        self.slot = DurableSlot(host.js, membership.member, membership.ttl, MEMBER_SLOTS, CONSUMER.stream,
                                lambda k: consumer_spec(k).durable, lambda: membership.alone)  # fmt: skip
        await self.slot.take()
        host.closing(self.slot.release)
        host.spawn(self.slot.keep(self.partitioned.on_change), "detector-slot")

    def plan(self) -> Plan:
        self.spec = consumer_spec(self.slot.slot if self.slot else None)
        return Plan(
            watches=[
                Watch(APPS_BUCKET, follow_apps, self._on_apps),
                Watch(SETTINGS_BUCKET, follow_detector_settings, self._on_settings, required=False),
            ],
            # No replay by the host: the partitions' rebuilds replay (they need each input's sequence).
            consumes=[Consume(self.spec, self.partitioned.fold, None, self._admission)],
            config_wait=None,  # thresholds are the apps' own: no verdict before they are known
        )

    async def prepare(self, host: Host) -> None:
        assert self.publisher is not None and self.membership is not None and self.slot is not None
        wiring = Wiring(host.js, self.publisher, self.membership, self.slot, self.spec, lambda: self.consumer,
                        host.stopping)  # fmt: skip
        host.closing(self.partitioned.write_final_floors)  # after the consumer's last acks
        await self.partitioned.start(wiring)
        host.spawn(self.partitioned.run_rebuilds(), "detector-rebuilds")
        host.spawn(self.partitioned.write_floors(), "detector-floors")

    async def started(self, host: Host) -> None:
        """Ready once the state is rebuilt, as when the host replayed before going live."""
        replayed = self.replayed[self.spec.durable] = await self.partitioned.rebuilt_at_start()
        if self.consumer is not None:
            self.consumer.stats.replayed = replayed

    def owns_what(self) -> str:
        return self.partitioned.describe()

    def _on_apps(self, apps: dict[str, AppSpec], _written_at: float | None) -> None:
        self._apps = thresholds(apps)
        self._admission.update(apps)
        self.detector.configure(self._settings, self._apps)

    def _on_settings(self, settings: DetectorConfig) -> None:
        self._settings = settings
        self.detector.configure(settings, self._apps)

    def stopped(self) -> dict[str, Any]:
        counts = {"instances": len(self.detector.instances), "skipped": self.partitioned.skipped,
                  "takeovers": self.partitioned.takeovers}  # fmt: skip
        return counts | (vars(self.consumer.stats) if self.consumer else {})
