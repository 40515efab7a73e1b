"""The event contract: golden fixtures decode forever, evolution rules hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoserve_events import (
    EVENT_TYPES,
    BreakerStateChanged,
    ErrorKind,
    FailureDetected,
    FailureType,
    MalformedEvent,
    ProbeCompleted,
    RecoveryStrategy,
    codec,
    decode,
    encode,
    headers_for,
    register_upcaster,
    subject,
    subject_for,
)

GOLDEN = Path(__file__).parent.parent / "golden"
FIXTURES = sorted(GOLDEN.glob("v*/*.json"))


def test_every_event_type_has_a_golden_fixture() -> None:
    assert {p.stem for p in GOLDEN.glob("v1/*.json")} == set(EVENT_TYPES)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden_fixture_decodes_to_its_type(path: Path) -> None:
    raw = json.loads(path.read_text())
    event = decode(path.read_bytes())
    assert type(event).__name__ == raw["type"] == path.stem
    assert event.event_id == raw["event_id"]
    # Re-encoding keeps every field the fixture has.
    assert {k: v for k, v in json.loads(encode(event)).items() if k in raw} == raw


def test_golden_fields_use_the_seed_vocabulary() -> None:
    probe = decode((GOLDEN / "v1/ProbeCompleted.json").read_bytes())
    assert isinstance(probe, ProbeCompleted)
    assert (probe.check_type, probe.is_healthy, probe.error_kind) == ("http", False, ErrorKind.TIMEOUT)
    failure = decode((GOLDEN / "v1/FailureDetected.json").read_bytes())
    assert isinstance(failure, FailureDetected)
    assert failure.failure_type is FailureType.HEALTH_CHECK_TIMEOUT
    assert failure.cause_event_id == probe.event_id


def test_unknown_fields_are_ignored() -> None:
    raw = json.loads((GOLDEN / "v1/BreakerStateChanged.json").read_text())
    raw["added_in_a_later_release"] = {"nested": [1, 2]}
    event = decode(json.dumps(raw).encode())
    assert isinstance(event, BreakerStateChanged)
    assert event.state == "open"


@pytest.mark.parametrize("field", ["instance_id", "app_name", "is_healthy", "response_time_ms", "timestamp"])
def test_a_missing_required_field_is_an_error(field: str) -> None:
    raw = json.loads((GOLDEN / "v1/ProbeCompleted.json").read_text())
    del raw[field]
    with pytest.raises(MalformedEvent, match=field):
        decode(json.dumps(raw).encode())


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "not an event"),
        (b"[1, 2]", "not an event"),
        (b'{"type": "Nope"}', "unknown event type 'Nope'"),
        (b'{"schema_version": 1}', "unknown event type ''"),
        (b'{"type": "ProbeCompleted", "schema_version": 99}', "newer than this reader"),
    ],
)
def test_malformed_payloads_name_the_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(MalformedEvent, match=reason):
        decode(payload)


def test_a_wrong_type_is_an_error() -> None:
    raw = json.loads((GOLDEN / "v1/RecoveryExecuted.json").read_text())
    raw["strategy"] = "pray"
    with pytest.raises(MalformedEvent, match="strategy"):
        decode(json.dumps(raw).encode())


def test_events_are_frozen_and_carry_an_envelope() -> None:
    event = ProbeCompleted(
        instance_id="i-1", app_name="web", check_type="tcp", is_healthy=True, response_time_ms=1.0, timestamp=1.0
    )
    assert len(event.event_id) == 32
    assert event.schema_version == 1
    assert event.emitted_at > 0
    with pytest.raises(AttributeError):
        event.is_healthy = False  # type: ignore[misc]
    assert headers_for(event) == {"Nats-Msg-Id": event.event_id}
    assert decode(encode(event)) == event


def test_upcaster_hook_brings_an_old_version_to_the_current_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend ProbeCompleted is at v2, where v1's ``error`` was split out: the hook runs on v1 data."""
    monkeypatch.setitem(codec.CURRENT_VERSIONS, "ProbeCompleted", 2)
    monkeypatch.setattr(codec, "_UPCASTERS", {})

    def v1_to_v2(raw: dict) -> dict:
        return {**raw, "error": f"[v1] {raw['error']}"}

    register_upcaster("ProbeCompleted", 1, v1_to_v2)
    event = decode((GOLDEN / "v1/ProbeCompleted.json").read_bytes())
    assert isinstance(event, ProbeCompleted)
    assert event.schema_version == 2
    assert event.error == "[v1] Request timeout: no response within 2s"


def test_a_version_without_an_upcaster_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(codec.CURRENT_VERSIONS, "ProbeCompleted", 2)
    monkeypatch.setattr(codec, "_UPCASTERS", {})
    with pytest.raises(MalformedEvent, match="no upcaster from schema_version 1"):
        decode((GOLDEN / "v1/ProbeCompleted.json").read_bytes())


def test_seed_enums_are_complete() -> None:
    assert len(FailureType) == 15
    assert len(RecoveryStrategy) == 10
    assert FailureType("container_oom_killed") is FailureType.CONTAINER_OOM_KILLED


def test_subjects_follow_the_contract() -> None:
    probe = decode((GOLDEN / "v1/ProbeCompleted.json").read_bytes())
    assert subject_for(probe) == "autoserve.probe.completed.web.web-1"
    assert subject(FailureDetected, "web", "web-1") == "autoserve.event.failure.web.web-1"
    assert subject(BreakerStateChanged, "a_b", "c-d") == "autoserve.event.breaker.a_b.c-d"


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "a*", ">", "x" * 129, "é"])
def test_subject_tokens_are_validated(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid subject token"):
        subject(ProbeCompleted, bad, "i-1")
