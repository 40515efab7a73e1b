"""Every service's durable consumer, and where it starts reading when it is created.

``autoserve apply`` (and ``autoserve up``) creates them together with the streams, before
anything publishes, so no service misses the first events of a fresh system. A service
started against a stream without its durable creates it the same way. Where each starts:

- everything stored (the reporter: its tables are the record; inputs are deduplicated);
- its replay window back (detector, breaker): the state it folds anyway;
- from its creation on (recovery, alerter): they act, and a failure from days ago stored
  before they existed is history, not work.
"""

from __future__ import annotations

from dataclasses import dataclass

from .catalogue import FailureDetected, HealthChanged, ProbeCompleted
from .streams import EVENTS_STREAM, PROBES_STREAM
from .subjects import EVENTS_WILDCARD, PROBES_WILDCARD, wildcard

EVERYTHING = None
FROM_CREATION = 0.0
DETECTOR_WINDOW_SECONDS = 600.0  # DetectorConfig's default failure_rate_window_minutes
BREAKER_REPLAY_SECONDS = 900.0  # probes older than this do not count toward a breaker's state


@dataclass(frozen=True)
class DurableSpec:
    stream: str
    name: str
    filter_subjects: tuple[str, ...]
    # Seconds back from its creation: EVERYTHING (None) or FROM_CREATION (0) or a window.
    start_seconds_ago: float | None
    pull: bool = False  # pulled (shared work) rather than pushed in order


DETECTOR = DurableSpec(PROBES_STREAM, "autoserve-detector", (PROBES_WILDCARD,), DETECTOR_WINDOW_SECONDS)
# The breaker's durable kept its first name, "breaker": renaming it would replay a deployment.
BREAKER = DurableSpec(PROBES_STREAM, "breaker", (wildcard(ProbeCompleted),), BREAKER_REPLAY_SECONDS)
REPORTER_PROBES = DurableSpec(PROBES_STREAM, "autoserve-reporter-probes", (PROBES_WILDCARD,), EVERYTHING)
# Not autoserve.deadletter.>: the reporter's own letters would loop.
REPORTER_EVENTS = DurableSpec(EVENTS_STREAM, "autoserve-reporter-events", (EVENTS_WILDCARD,), EVERYTHING)
ALERTER = DurableSpec(EVENTS_STREAM, "autoserve-alerter", (EVENTS_WILDCARD,), FROM_CREATION)
RECOVERY_WORK = DurableSpec(
    EVENTS_STREAM, "autoserve-recovery", (wildcard(FailureDetected), wildcard(HealthChanged)), FROM_CREATION, pull=True
)


def durable_specs() -> tuple[DurableSpec, ...]:
    return (DETECTOR, BREAKER, REPORTER_PROBES, REPORTER_EVENTS, ALERTER, RECOVERY_WORK)
