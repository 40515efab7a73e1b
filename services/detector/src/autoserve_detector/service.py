"""The detector's composition root: configuration from KV, replay, then live consumption.

On start it folds the last ``failure_rate_window_minutes`` of AUTOSERVE_PROBES, up to the
durable consumer's ack floor, without publishing (those outputs were published before),
then consumes live from there. So a restart in the middle of an incident gives the same
counts it would have given without the restart, and no transition is published twice.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from autoserve_config import AppSpec, DetectorConfig
from autoserve_events import APPS_BUCKET, SETTINGS_BUCKET, durables
from autoserve_events.subjects import PROBES_WILDCARD
from autoserve_runtime import (
    Admission,
    ConsumerSpec,
    EventConsumer,
    EventPublisher,
    cancel_all,
    close_nats,
    connect,
    follow_apps,
    follow_detector_settings,
    provision,
)

from .core.detector import AppThresholds, Detector

log = structlog.get_logger("autoserve.detector")

CONSUMER = ConsumerSpec.of(durables.DETECTOR)


def thresholds(apps: dict[str, AppSpec]) -> dict[str, AppThresholds]:
    return {
        name: AppThresholds(
            failure_threshold=spec.health_check.failure_threshold,
            success_threshold=spec.health_check.success_threshold,
            period_seconds=spec.health_check.period_seconds,
        )
        for name, spec in apps.items()
    }


class DetectorService:
    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.detector = Detector()
        self.consumer: EventConsumer | None = None
        self.publisher: EventPublisher | None = None
        self.ready = asyncio.Event()
        self._settings = DetectorConfig()
        self._apps: dict[str, AppThresholds] = {}
        self._admission = Admission()
        self._apps_loaded = asyncio.Event()

    def _on_apps(self, apps: dict[str, AppSpec], _written_at: float | None) -> None:
        self._apps = thresholds(apps)
        self._admission.update(apps)
        self.detector.configure(self._settings, self._apps)
        self._apps_loaded.set()

    def _on_settings(self, settings: DetectorConfig) -> None:
        self._settings = settings
        self.detector.configure(settings, self._apps)

    async def run(self, stop: asyncio.Event) -> None:
        nc = await connect(self.nats_url, "autoserve-detector")
        js = nc.jetstream()
        await provision(js)
        watchers = [
            asyncio.create_task(follow_apps(await js.key_value(APPS_BUCKET), self._on_apps)),
            asyncio.create_task(follow_detector_settings(await js.key_value(SETTINGS_BUCKET), self._on_settings)),
        ]
        await self._apps_loaded.wait()
        self.publisher = EventPublisher(js, max_buffered=200_000).start()
        self.consumer = EventConsumer(
            js, self.publisher, CONSUMER, "detector", self.detector.apply, admit=self._admission
        )
        started = time.monotonic()
        floor = await self.consumer.ack_floor()
        since = time.time() - self.detector.window_seconds
        replayed = await self.consumer.replay(since, floor, PROBES_WILDCARD)
        log.info("state rebuilt", replayed=replayed, up_to_seq=floor, seconds=round(time.monotonic() - started, 3),
                 instances=len(self.detector.instances))  # fmt: skip
        await self.consumer.start()
        self.ready.set()
        log.info("detector started", nats=self.nats_url)
        try:
            await stop.wait()
        finally:
            log.info("detector stopping")
            await self.consumer.stop()
            await self.publisher.close()
            await cancel_all(watchers)
            await close_nats(nc)
            log.info("detector stopped", **vars(self.consumer.stats))
