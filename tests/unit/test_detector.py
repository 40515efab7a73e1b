"""The detector fold: the seed's classification and severity tables, the failure types the
seed never detected, windows, restart-loop counting, and replay determinism."""

from __future__ import annotations

import itertools

import pytest
from autoserve_detector.core.classify import classify_probe_failure, is_critical, severity_of
from autoserve_detector.core.detector import AppThresholds, Detector
from autoserve_detector.core.window import BucketWindow
from hypothesis import given, settings
from hypothesis import strategies as st

from autoserve_config import DetectorConfig
from autoserve_events import ContainerObserved, ErrorKind, FailureDetected, FailureType, HealthChanged, ProbeCompleted

_ids = itertools.count()


def probe(t: float, healthy: bool = True, *, app: str = "web", instance: str = "w-1", error: str | None = None,
          kind: ErrorKind | None = None, status: int | None = 200, ms: float = 5.0) -> ProbeCompleted:  # fmt: skip
    if not healthy and error is None and kind is None:
        kind, error, status = ErrorKind.UNEXPECTED_STATUS, "Unexpected status code: 500", 500
    return ProbeCompleted(
        event_id=f"p{next(_ids)}", instance_id=instance, app_name=app, check_type="http", is_healthy=healthy,
        response_time_ms=ms, timestamp=t, scheduled_at=t, status_code=status if healthy or status else None,
        error=error, error_kind=kind,
    )  # fmt: skip


def container(t: float, event: str, **fields: object) -> ContainerObserved:
    return ContainerObserved(event_id=f"c{next(_ids)}", instance_id="abc123def456", app_name="web",
                             container_id="abc123def456" + "0" * 52, event=event, timestamp=t, **fields)  # fmt: skip


def failures(events: list, failure_type: FailureType | None = None) -> list[FailureDetected]:
    return [
        e for e in events if isinstance(e, FailureDetected) and (failure_type is None or e.failure_type is failure_type)
    ]


def feed(detector: Detector, inputs: list) -> list:
    return [out for event in inputs for out in detector.apply(event)]


def detector(**settings: object) -> Detector:
    return Detector(
        DetectorConfig(**settings), {"web": AppThresholds(failure_threshold=3, success_threshold=1, period_seconds=1)}
    )


# The seed's _classify_health_failure on texts, and the precise mapping from error_kind.
CLASSIFY = [
    (dict(error="Request timeout"), FailureType.HEALTH_CHECK_TIMEOUT),
    (dict(error="Connection error: reset"), FailureType.NETWORK_UNREACHABLE),
    (dict(error="Connection refused"), FailureType.PORT_NOT_LISTENING),
    (dict(error="dns lookup failed"), FailureType.DNS_RESOLUTION_FAILED),
    (dict(error="Something odd"), FailureType.HEALTH_CHECK_ERROR),
    (dict(error=None, status=503), FailureType.HEALTH_CHECK_FAILED),
    (dict(kind=ErrorKind.TIMEOUT, error="x"), FailureType.HEALTH_CHECK_TIMEOUT),
    (dict(kind=ErrorKind.CONNECTION_REFUSED, error="x"), FailureType.PORT_NOT_LISTENING),
    (dict(kind=ErrorKind.CONNECTION_ERROR, error="x"), FailureType.NETWORK_UNREACHABLE),
    (dict(kind=ErrorKind.DNS, error="x"), FailureType.DNS_RESOLUTION_FAILED),
    (dict(kind=ErrorKind.TLS, error="x"), FailureType.HEALTH_CHECK_ERROR),
    (dict(kind=ErrorKind.UNEXPECTED_STATUS, error="x"), FailureType.HEALTH_CHECK_FAILED),
    (dict(kind=ErrorKind.UNEXPECTED_RESPONSE, error="x"), FailureType.HEALTH_CHECK_FAILED),
    (dict(kind=ErrorKind.REDIRECT_BLOCKED, error="x"), FailureType.HEALTH_CHECK_ERROR),
]


@pytest.mark.parametrize(("fields", "expected"), CLASSIFY)
def test_classification(fields: dict, expected: FailureType) -> None:
    assert classify_probe_failure(probe(0, False, **fields)) is expected


def test_every_error_kind_is_classified() -> None:
    for kind in ErrorKind:
        assert isinstance(classify_probe_failure(probe(0, False, kind=kind, error="x")), FailureType)


SEVERITY = [
    (FailureType.CONTAINER_STOPPED, "critical"),
    (FailureType.CONTAINER_OOM_KILLED, "critical"),
    (FailureType.APPLICATION_STARTUP_FAILED, "high"),
    (FailureType.CONTAINER_RESTART_LOOP, "high"),
    (FailureType.HEALTH_CHECK_TIMEOUT, "medium"),
    (FailureType.HIGH_RESPONSE_TIME, "medium"),
    (FailureType.HEALTH_CHECK_FAILED, "low"),
    (FailureType.PORT_NOT_LISTENING, "low"),
]


@pytest.mark.parametrize(("failure_type", "severity"), SEVERITY)
def test_seed_severity_table(failure_type: FailureType, severity: str) -> None:
    assert severity_of(failure_type) == severity


def test_seed_is_critical() -> None:
    assert is_critical(FailureType.APPLICATION_STARTUP_FAILED, "high", 1)
    assert is_critical(FailureType.HEALTH_CHECK_FAILED, "critical", 1)
    assert is_critical(FailureType.HEALTH_CHECK_FAILED, "low", 5)
    assert not is_critical(FailureType.HEALTH_CHECK_FAILED, "low", 4)


def test_a_failing_instance_sequence() -> None:
    """Step by step: failures count up, health changes at the threshold, a success resets."""
    d = detector()
    steps = [
        (probe(0), ["HealthChanged(True)"]),
        (probe(1, False), ["health_check_failed 1/1"]),
        (probe(2, False), ["health_check_failed 2/2"]),
        (probe(3, False), ["HealthChanged(False)", "health_check_failed 3/3"]),
        (probe(4, False, kind=ErrorKind.TIMEOUT, error="Request timeout", status=None), ["health_check_timeout 4/1"]),
        (probe(5), ["HealthChanged(True)"]),
        (probe(6, False), ["health_check_failed 1/4"]),  # consecutive reset; total in window goes on
    ]
    for event, expected in steps:
        summary = []
        for out in d.apply(event):
            if isinstance(out, HealthChanged):
                summary.append(f"HealthChanged({out.healthy})")
            else:
                summary.append(f"{out.failure_type.value} {out.consecutive_count}/{out.total_count}")
        assert summary == expected, event.timestamp


def test_failure_fields() -> None:
    d = detector()
    outs = feed(d, [probe(10, False), probe(11, False)])
    failure = failures(outs)[-1]
    assert (failure.severity, failure.is_critical, failure.first_occurrence) == ("low", False, 10)
    assert failure.cause_event_id is not None and failure.details["status_code"] == 500
    assert failure.details["error_kind"] == "unexpected_status"


def test_health_changes_carry_previous_and_reason() -> None:
    outs = feed(detector(), [probe(0), probe(1, False), probe(2, False), probe(3, False)])
    changes = [o for o in outs if isinstance(o, HealthChanged)]
    assert [(c.previous, c.healthy, c.consecutive) for c in changes] == [(None, True, 1), (True, False, 3)]
    assert changes[1].reason == "3 consecutive failed probes (failure_threshold 3): Unexpected status code: 500"


def test_high_response_time() -> None:
    d = detector(max_response_time_ms=100)
    outs = feed(d, [probe(0, ms=50), probe(1, ms=150), probe(2, ms=250), probe(3, ms=20)])
    slow = failures(outs, FailureType.HIGH_RESPONSE_TIME)
    assert [(s.consecutive_count, s.severity, s.details["response_time_ms"]) for s in slow] == [
        (1, "medium", 150),
        (2, "medium", 250),
    ]
    # A timed-out probe is a timeout, not also a slow response.
    assert not failures(
        d.apply(probe(4, False, kind=ErrorKind.TIMEOUT, error="Request timeout", status=None, ms=2000)),
        FailureType.HIGH_RESPONSE_TIME,
    )


def test_high_error_rate_is_repeated_once_a_minute_while_it_lasts_and_rearmed_when_it_falls() -> None:
    d = detector(max_error_rate_percent=20, min_probes_for_error_rate=10, failure_rate_window_minutes=1)
    feed(d, [probe(t) for t in range(8)])
    reported = [
        t
        for t in range(8, 200)
        if failures(d.apply(probe(t, healthy=t % 3 == 0)), FailureType.HIGH_ERROR_RATE)  # 2 in 3 failing
    ]
    assert reported == [11, 71, 131, 191]  # the crossing, then every 60 s of event time
    feed(d, [probe(t) for t in range(200, 260)])  # the minute's window fills with successes: re-armed
    assert failures(d.apply(probe(260, False)), FailureType.HIGH_ERROR_RATE) == []
    assert failures(feed(d, [probe(t, False) for t in range(261, 280)]), FailureType.HIGH_ERROR_RATE)


def test_high_error_rate_is_reported_once_per_crossing() -> None:
    d = detector(max_error_rate_percent=20, min_probes_for_error_rate=10)
    outs = feed(d, [probe(t) for t in range(8)] + [probe(8, False), probe(9, False)])  # 2/10 = 20 %: not over
    assert not failures(outs, FailureType.HIGH_ERROR_RATE)
    outs = feed(d, [probe(10, False), probe(11, False)])  # 4/12 = 33 %
    rate = failures(outs, FailureType.HIGH_ERROR_RATE)
    assert len(rate) == 1 and rate[0].details["error_rate_percent"] == pytest.approx(27.27, abs=0.01)
    assert rate[0].details["failed"] == 3


def test_window_expiry_forgets_old_failures() -> None:
    d = detector(failure_rate_window_minutes=1)
    feed(d, [probe(0, False), probe(1, False)])
    outs = d.apply(probe(200, False))  # minutes later
    assert failures(outs)[0].total_count == 1
    assert failures(outs)[0].first_occurrence == 200


def test_application_startup_failed() -> None:
    d = detector()  # failure_threshold 3, period 1
    outs = feed(d, [probe(t, False) for t in (0, 1, 2, 3, 4, 5)])
    startup = failures(outs, FailureType.APPLICATION_STARTUP_FAILED)
    assert len(startup) == 1 and startup[0].timestamp == 3
    assert (startup[0].severity, startup[0].is_critical) == ("high", True)
    # An instance that was ever healthy is not a start-up failure.
    d = detector()
    assert not failures(
        feed(d, [probe(0), *[probe(t, False) for t in range(1, 9)]]), FailureType.APPLICATION_STARTUP_FAILED
    )


def test_container_stopped_and_oom() -> None:
    d = detector()
    oom = failures(d.apply(container(0, "oom")))[0]
    stopped = failures(d.apply(container(0.1, "die", exit_code=137)))[0]
    assert (oom.failure_type, oom.severity, oom.is_critical) == (FailureType.CONTAINER_OOM_KILLED, "critical", True)
    assert (stopped.failure_type, stopped.details["exit_code"]) == (FailureType.CONTAINER_STOPPED, 137)
    assert stopped.message == "Container abc123def456 stopped (exit code 137)"


def test_restart_loop_counts_restarts_in_the_window() -> None:
    d = detector(max_restart_count=2, failure_rate_window_minutes=1)
    inputs = [container(0, "start")]  # the first start is not a restart
    for t in (1, 2, 3):
        inputs += [container(t, "die", exit_code=1), container(t + 0.1, "start")]
    outs = feed(d, inputs)
    loops = failures(outs, FailureType.CONTAINER_RESTART_LOOP)
    assert len(loops) == 1 and loops[0].details["restarts"] == 3 and loops[0].severity == "high"
    # More restarts while still looping: reported once; after the window, re-armed.
    assert not failures(
        feed(d, [container(4, "die", exit_code=1), container(4.1, "start")]), FailureType.CONTAINER_RESTART_LOOP
    )
    assert not failures(feed(d, [container(200, "restart")]), FailureType.CONTAINER_RESTART_LOOP)


def test_resource_usage_follows_the_seed_rules() -> None:
    d = detector(max_cpu_percent=90, max_memory_percent=90)
    outs = d.apply(container(0, "stats", cpu_percent=95.0, memory_percent=97.0, memory_usage_bytes=1000))
    by_metric = {f.details["metric"]: f for f in failures(outs, FailureType.HIGH_RESOURCE_USAGE)}
    assert by_metric["cpu"].severity == "medium" and by_metric["memory"].severity == "high"
    assert by_metric["memory"].details["memory_bytes"] == 1000
    assert by_metric["cpu"].event_id != by_metric["memory"].event_id
    outs = d.apply(container(1, "stats", cpu_percent=10.0, memory_percent=92.0))
    assert [(f.details["metric"], f.severity, f.consecutive_count) for f in failures(outs)] == [("memory", "medium", 2)]


def test_replay_gives_the_same_outputs_with_the_same_ids() -> None:
    """The fold is deterministic: a restarted detector that replays reaches the same state."""
    inputs = [probe(t, t % 7 not in (3, 4, 5)) for t in range(40)] + [container(41, "die", exit_code=1)]
    first, second = detector(), detector()
    assert [e.event_id for e in feed(first, inputs)] == [e.event_id for e in feed(second, inputs)]
    # Restart in the middle: rebuild from the first half, then continue.
    restarted = detector()
    feed(restarted, inputs[:25])
    tail_fresh = feed(first := detector(), inputs)[-5:]
    assert [e.event_id for e in feed(restarted, inputs[25:])][-5:] == [e.event_id for e in tail_fresh]


def test_bucket_window_counts_and_forgets() -> None:
    window = BucketWindow(60, buckets=6)
    for t in range(0, 60, 5):
        window.add(t, "x")
    assert window.count(59, "x") == 12
    assert window.count(75, "x") == 8  # buckets before [20, 30) have left
    assert window.first_at(75) == 20
    assert window.count(500, "x") == 0 and window.first_at(500) is None


class _NaiveWindow:
    """The oracle: every add kept until the newest time seen moves a whole window past it."""

    def __init__(self, width: float, buckets: int) -> None:
        self.width, self.buckets, self.newest, self.adds = width, buckets, -1, []

    def _advance(self, at: float) -> int:
        index = int(at // self.width)
        if index <= self.newest - self.buckets:  # the clock stepped back a whole window: start over
            self.newest, self.adds = index, []
        self.newest = max(self.newest, index)
        self.adds = [(i, t, k) for i, t, k in self.adds if i > self.newest - self.buckets]
        return index

    def add(self, at: float, key: str) -> None:
        index = self._advance(at)
        self.adds.append((index, at, key))

    def live(self, now: float) -> list[tuple[int, float, str]]:
        index = self._advance(now)
        return [a for a in self.adds if index - self.buckets < a[0] <= index]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["add", "count", "first"]), st.floats(-70, 15), st.sampled_from(["ok", "failed"])),
        max_size=80,
    )
)
def test_bucket_window_matches_naive_oracle(ops: list[tuple[str, float, str]]) -> None:
    """Time moves forward with late arrivals and the odd step back past the window;
    running totals must equal a recount."""
    window, oracle = BucketWindow(60, buckets=6), _NaiveWindow(10, 6)
    now = 0.0
    for op, step, key in ops:
        now = max(0.0, now + step)
        if op == "add":
            window.add(now, key)
            oracle.add(now, key)
        elif op == "count":
            assert window.count(now, key) == sum(1 for a in oracle.live(now) if a[2] == key)
        else:
            times = [a[1] for a in oracle.live(now)]
            assert window.first_at(now) == (min(times) if times else None)


def test_bucket_window_recovers_from_a_probe_from_the_future() -> None:
    """One probe stamped an hour ahead must not blind the window until real time catches up."""
    window = BucketWindow(60, buckets=6)
    window.add(3600, "failed")
    for t in (10, 11, 12):
        window.add(t, "failed")
    assert window.count(12, "failed") == 3
