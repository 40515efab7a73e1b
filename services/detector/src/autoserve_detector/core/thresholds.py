"""Flap damping, as kubelet's prober worker does it.

A run counts consecutive identical results; an opposite result starts a new run of 1.
Health changes only when a run reaches its threshold: ``failure_threshold`` failures make
an instance unhealthy, ``success_threshold`` successes make it healthy. An instance starts
unknown (``None``), neither healthy nor unhealthy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Transition:
    previous: bool | None
    healthy: bool
    run: int


@dataclass(slots=True)
class HealthRun:
    healthy: bool | None = None
    last_result: bool | None = None
    run: int = 0

    def observe(self, success: bool, failure_threshold: int, success_threshold: int) -> Transition | None:
        """Fold one result in; the transition it causes, if any."""
        self.run = self.run + 1 if success == self.last_result else 1
        self.last_result = success
        threshold = success_threshold if success else failure_threshold
        if self.healthy is success or self.run < threshold:
            return None
        previous, self.healthy = self.healthy, success
        return Transition(previous, success, self.run)

    @property
    def consecutive_failures(self) -> int:
        return self.run if self.last_result is False else 0
