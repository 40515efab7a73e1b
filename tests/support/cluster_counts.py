"""Counting what a cluster run stored, after the faults: every ``ProbeCompleted`` the prober
had acknowledged is in AUTOSERVE_PROBES once, in ClickHouse once (asked of the reporter:
chDB has one owner), and the detector's outputs and counters are those of a replay from
scratch with its pure core."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from autoserve_detector.core.detector import Detector
from autoserve_detector.service import thresholds
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from autoserve_config import AppSpec, DetectorConfig
from autoserve_events import (
    EVENTS_STREAM,
    PROBES_STREAM,
    FailureDetected,
    HealthChanged,
    ProbeCompleted,
    decode,
)
from autoserve_events.subjects import EVENTS_WILDCARD, PROBES_WILDCARD

from .cluster import LOCALHOST, UNAVAILABLE, Services, sample
from .waiting import wait_for

DETECTOR_DURABLE = "autoserve-detector"
REPORTER_DURABLE = "autoserve-reporter-probes"


async def read_stream(js: JetStreamContext, stream: str, subject: str, on_message: Callable[[Msg], None]) -> int:
    """Every message of ``stream`` on ``subject``, oldest first (an ordered consumer), handed
    to ``on_message``; the number read."""
    info = await js.stream_info(stream, subjects_filter=subject)
    total = sum((info.state.subjects or {}).values())
    read = 0

    async def each(msg: Msg) -> None:
        nonlocal read
        read += 1
        on_message(msg)

    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, cb=each, pending_msgs_limit=-1,
                             pending_bytes_limit=-1)  # fmt: skip
    try:
        await wait_for(lambda: read >= total, 180, f"{total} messages of {stream} read back", every=0.2)
    finally:
        await sub.unsubscribe()
    return read


@dataclass
class ProbeLedger:
    """AUTOSERVE_PROBES read back, and the detector's core folded over it from scratch."""

    replay: Detector
    ids: Counter[str] = field(default_factory=Counter)
    per_instance: Counter[tuple[str, str]] = field(default_factory=Counter)
    mislabelled: int = 0  # a Nats-Msg-Id that is not the event's id
    outputs: Counter[str] = field(default_factory=Counter)  # the replay's, by event id
    output_types: Counter[str] = field(default_factory=Counter)

    def add(self, msg: Msg) -> None:
        event = decode(msg.data)
        assert isinstance(event, ProbeCompleted), event
        self.ids[event.event_id] += 1
        self.mislabelled += (msg.headers or {}).get("Nats-Msg-Id") != event.event_id
        self.per_instance[(event.app_name, event.instance_id)] += 1
        for output in self.replay.apply(event):
            self.outputs[output.event_id] += 1
            self.output_types[type(output).__name__] += 1

    @property
    def stored(self) -> int:
        return sum(self.ids.values())

    def per_app(self) -> Counter[str]:
        apps: Counter[str] = Counter()
        for (app, _), count in self.per_instance.items():
            apps[app] += count
        return apps


async def consumer_done(js: JetStreamContext, durable: str) -> bool:
    """The durable has delivered and had acknowledged everything stored."""
    try:
        info = await js.consumer_info(PROBES_STREAM, durable)
    except UNAVAILABLE:
        return False
    return info.num_pending == 0 and info.num_ack_pending == 0


async def quiet(nc: Client, services: Services, timeout: float = 120) -> None:
    """The load is off (the caller applied it disabled): the prober probes nothing and has
    nothing unacknowledged, and the detector and the reporter have handled every probe."""
    js = nc.jetstream()

    def prober_idle() -> bool:
        metrics = services.metrics("prober")
        return (
            sample(metrics, "autoserve_probe_targets") == 0
            and sample(metrics, "autoserve_publish_pending", service="prober") == 0
        )

    await wait_for(prober_idle, timeout, "the prober idle (no targets, nothing pending)", every=0.2)
    for durable in (DETECTOR_DURABLE, REPORTER_DURABLE):
        await wait_for(lambda d=durable: consumer_done(js, d), timeout, f"{durable} caught up", every=0.2)
    await wait_for(
        lambda: sample(services.metrics("detector"), "autoserve_publish_pending", service="detector") == 0,
        timeout, "the detector's outputs stored", every=0.2,
    )  # fmt: skip


def report(services: Services, app: str) -> dict:
    url = f"http://{LOCALHOST}:{services.reporter_port}/v1/apps/{app}/report?hours=1"
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.loads(reply.read())


def consumer_counters(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], service: str) -> dict[str, float]:
    """A service's durable-consumer counters on AUTOSERVE_PROBES, for a failure's message."""
    durable = {"detector": DETECTOR_DURABLE, "reporter": REPORTER_DURABLE}[service]
    names = ("received_total", "duplicates_total", "dead_lettered_total", "acked_sequence")
    return {name: sample(metrics, f"autoserve_consumer_{name}", service=service, consumer=durable) for name in names}


@dataclass
class Counts:
    """What one check counted: a line for the test's output."""

    probes: int
    detector_outputs: int
    acked: int

    def __str__(self) -> str:
        return f"{self.probes} probes stored once each, {self.acked} acked, {self.detector_outputs} detector outputs"


async def check_counts(nc: Client, services: Services, apps: dict[str, AppSpec]) -> Counts:
    """Every count the cluster tests hold the system to, once the load is off (``quiet``)."""
    await quiet(nc, services)
    js = nc.jetstream()
    ledger = ProbeLedger(Detector(DetectorConfig(), thresholds(apps)))
    await read_stream(js, PROBES_STREAM, PROBES_WILDCARD, ledger.add)

    # In the stream exactly once, each under its own id.
    doubled = {event_id: n for event_id, n in ledger.ids.items() if n > 1}
    assert not doubled, f"{len(doubled)} probes stored more than once, e.g. {list(doubled.items())[:5]}"
    assert ledger.mislabelled == 0, f"{ledger.mislabelled} probes stored under another Nats-Msg-Id"

    # The prober's counters: everything it submitted was acknowledged, and what it had
    # acknowledged is what the stream holds.
    prober = services.metrics("prober")
    acked = int(sample(prober, "autoserve_publish_stored_total", service="prober"))
    submitted = int(sample(prober, "autoserve_publish_submitted_total", service="prober"))
    rejected = int(sample(prober, "autoserve_publish_rejected_total", service="prober"))
    assert rejected == 0, f"JetStream rejected {rejected} of the prober's probes"
    assert submitted == acked, f"the prober submitted {submitted} probes and had {acked} acknowledged"
    assert ledger.stored == acked, f"the stream holds {ledger.stored} probes, the prober had {acked} acknowledged"

    # In ClickHouse exactly once: the reporter folded each stored probe once (live: it never
    # restarts here), and the report (read FINAL) counts each.
    reporter = services.metrics("reporter")
    folded = sample(reporter, "autoserve_events_in_total", service="reporter", type="ProbeCompleted")
    assert folded == ledger.stored, (
        f"the reporter folded {folded:g} probes, the stream holds {ledger.stored} "
        f"(consumer: {consumer_counters(reporter, 'reporter')})"
    )
    for app, count in ledger.per_app().items():
        shown = report(services, app)
        assert shown["total_health_checks"] == count, f"{app}: ClickHouse has {shown['total_health_checks']}, " \
            f"the stream {count}"  # fmt: skip
        in_clickhouse = {row["instance_id"]: row["total_health_checks"] for row in shown["instances"]}
        in_stream = {instance: n for (a, instance), n in ledger.per_instance.items() if a == app}
        assert in_clickhouse == in_stream, f"{app}: per instance, ClickHouse and the stream differ"

    # The detector: what it published, and what it counted, are a replay's from scratch.
    published: Counter[str] = Counter()
    published_types: Counter[str] = Counter()

    def detector_output(msg: Msg) -> None:
        event = decode(msg.data)
        if isinstance(event, HealthChanged | FailureDetected):
            published[event.event_id] += 1
            published_types[type(event).__name__] += 1

    await read_stream(js, EVENTS_STREAM, EVENTS_WILDCARD, detector_output)
    assert not {i: n for i, n in published.items() if n > 1}, "a detector output stored twice"
    assert set(published) == set(ledger.outputs), (
        f"the detector published {len(published)} events, a replay gives {len(ledger.outputs)}: "
        f"{len(set(published) - set(ledger.outputs))} not in the replay, "
        f"{len(set(ledger.outputs) - set(published))} missing"
    )
    detector = services.metrics("detector")
    folded = sample(detector, "autoserve_events_in_total", service="detector", type="ProbeCompleted")
    assert folded == ledger.stored, (
        f"the detector folded {folded:g} probes, the stream holds {ledger.stored} "
        f"(consumer: {consumer_counters(detector, 'detector')})"
    )
    for kind, count in ledger.output_types.items():
        counted = sample(detector, "autoserve_events_out_total", service="detector", type=kind)
        assert counted == count, f"the detector counted {counted:g} {kind}, a replay {count}"
    assert published_types == ledger.output_types
    return Counts(ledger.stored, len(published), acked)
