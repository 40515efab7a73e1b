"""``python -m bench.gc_pause``: a detector's state after a full 10-minute window, and what
one full collection of this process's heap costs. Prints JSON; read by bench/detector.py."""

from __future__ import annotations

import gc
import json
import time

from autoserve_detector.core.detector import AppThresholds, Detector

from bench.detector import probe


def full_collection() -> tuple[int, float]:
    """Objects the collector tracks, and the fastest of 5 full collections in ms."""
    gc.collect()
    pauses = []
    for _ in range(5):
        started = time.perf_counter()
        gc.collect()
        pauses.append((time.perf_counter() - started) * 1000)
    return len(gc.get_objects()), min(pauses)


def measure(instances: int = 5000, now: float = 1_800_000_000.0) -> dict[str, float]:
    """The heap before and after one detector folds 10 minutes of probes, every instance
    every 10 s (a new bucket each time): what its state adds to a full collection."""
    tracked_before, pause_before = full_collection()
    detector = Detector(apps={"bench": AppThresholds(failure_threshold=3, success_threshold=1, period_seconds=10)})
    for second in range(0, 600, 10):
        for n in range(instances):
            detector.apply(probe(n + second // 10 * instances, instances, now + second))
    tracked, pause = full_collection()
    return {"instances": instances, "state_objects": tracked - tracked_before, "pause_before_ms": pause_before,
            "pause_ms": pause}  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(measure()))
