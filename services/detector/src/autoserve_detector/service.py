"""The detector's composition root: configuration from KV, replay, then live consumption.

On start it folds the last ``failure_rate_window_minutes`` of AUTOSERVE_PROBES, up to the
durable consumer's ack floor, without publishing (those outputs were published before),
then consumes live from there. So a restart in the middle of an incident gives the same
counts it would have given without the restart, and no transition is published twice.
"""

from __future__ import annotations

from typing import Any

from autoserve_config import AppSpec, DetectorConfig
from autoserve_events import APPS_BUCKET, SETTINGS_BUCKET, durables
from autoserve_runtime import Admission, ConsumerSpec, follow_apps, follow_detector_settings
from autoserve_runtime.host import Consume, HostedService, Plan, Watch

from .core.detector import AppThresholds, Detector

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


class DetectorService(HostedService):
    name = "detector"
    publisher_buffer = 200_000

    def __init__(self, nats_url: str) -> None:
        super().__init__(nats_url)
        self.detector = Detector()
        self._settings = DetectorConfig()
        self._apps: dict[str, AppThresholds] = {}
        self._admission = Admission()

    def plan(self) -> Plan:
        return Plan(
            watches=[
                Watch(APPS_BUCKET, follow_apps, self._on_apps),
                Watch(SETTINGS_BUCKET, follow_detector_settings, self._on_settings, required=False),
            ],
            consumes=[Consume(CONSUMER, self.detector.apply, lambda: self.detector.window_seconds, self._admission)],
            config_wait=None,  # thresholds are the apps' own: no verdict before they are known
        )

    def _on_apps(self, apps: dict[str, AppSpec], _written_at: float | None) -> None:
        self._apps = thresholds(apps)
        self._admission.update(apps)
        self.detector.configure(self._settings, self._apps)

    def _on_settings(self, settings: DetectorConfig) -> None:
        self._settings = settings
        self.detector.configure(settings, self._apps)

    def stopped(self) -> dict[str, Any]:
        return {"instances": len(self.detector.instances)} | (vars(self.consumer.stats) if self.consumer else {})
