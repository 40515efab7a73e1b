"""Breaker messages: reports and RPC requests decode cheaply; bad ones name field and value."""

from __future__ import annotations

import pytest

from autoserve_breaker.main import parse_replica
from autoserve_breaker.service import owned_by
from autoserve_events import (
    AllowReply,
    MalformedMessage,
    breaker_report,
    decode_allow_reply,
    decode_allow_request,
    decode_override_reply,
    decode_override_request,
    decode_report,
    encode_message,
    stream_specs,
)
from autoserve_events.subjects import BREAKER_ALLOW_RPC, BREAKER_OVERRIDE_RPC, BREAKER_REPORT_WILDCARD


def test_a_report_is_two_fields() -> None:
    report = decode_report(b'{"success": false, "duration_ms": 12.5}')
    assert (report.success, report.duration_ms) == (False, 12.5)
    assert decode_report(b'{"success": true}').duration_ms == 0.0


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'{"success": "yes"}', "report.success: expected bool, got 'yes'"),
        (b'{"duration_ms": 3}', "report.success: required"),
        (b'{"success": true, "duration_ms": -1}', "report.duration_ms: must be a finite number >= 0, got -1.0"),
        (b'{"success": true, "duration_ms": "fast"}', "report.duration_ms: expected float, got 'fast'"),
        (b"not json", "report: JSON is malformed"),
        (b"x" * 5000, "report: 5000 bytes, more than 4096"),
    ],
)
def test_a_malformed_report_names_the_field_and_value(payload: bytes, message: str) -> None:
    with pytest.raises(MalformedMessage, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        decode_report(payload)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'{"app_name": "web"}', "allow request.instance_id: required"),
        (b'{"app_name": "web", "instance_id": "a.b"}', "allow request.instance_id: 'a.b' is not a name"),
        (b'{"app_name": 7, "instance_id": "x"}', "allow request.app_name: expected str, got 7"),
    ],
)
def test_a_malformed_allow_request_names_the_field_and_value(payload: bytes, message: str) -> None:
    with pytest.raises(MalformedMessage, match="^" + message):
        decode_allow_request(payload)


def test_an_override_action_is_checked() -> None:
    with pytest.raises(
        MalformedMessage, match=r"override request\.action: must be one of 'open', 'close', 'reset', got 'explode'"
    ):
        decode_override_request(b'{"app_name": "web", "instance_id": "w", "action": "explode"}')


def test_the_allow_reply_is_the_contract_and_nothing_more() -> None:
    assert encode_message(AllowReply(allow=True, state="closed")) == b'{"allow":true,"state":"closed"}'
    assert decode_allow_reply(b'{"allow":false,"state":"open","known":false}').known is False


def test_a_malformed_reply_names_the_field_and_value_as_a_request_does() -> None:
    with pytest.raises(MalformedMessage, match=r"^allow reply\.allow: expected bool, got 'yes'"):
        decode_allow_reply(b'{"allow": "yes", "state": "open"}')
    with pytest.raises(MalformedMessage, match=r"^override reply\.ok: required"):
        decode_override_reply(b'{"state": "open"}')


def test_report_and_rpc_subjects_are_outside_every_stream() -> None:
    """A stored RPC subject would race JetStream's publish ack against the reply."""
    stream_prefixes = [s.rstrip(">") for spec in stream_specs() for s in spec.subjects]
    for subject in (BREAKER_ALLOW_RPC, BREAKER_OVERRIDE_RPC, BREAKER_REPORT_WILDCARD, breaker_report("web", "w-1")):
        assert not any(subject.startswith(prefix) for prefix in stream_prefixes), subject


def test_members_split_the_breakers_stably() -> None:
    keys = [("web", f"web-{i}") for i in range(300)]
    members = frozenset({"a", "b", "c"})
    owners = [[m for m in sorted(members) if owned_by(m, members)(*key)] for key in keys]
    assert all(len(o) == 1 for o in owners), "each breaker has exactly one owner"
    assert owners == [[m for m in sorted(members) if owned_by(m, members)(*key)] for key in keys]
    assert all([o[0] for o in owners].count(m) > 60 for m in members)


@pytest.mark.parametrize("text", ["2/2", "x/2", "1", "0/0", "-1/2"])
def test_a_bad_replica_option_is_explained(text: str) -> None:
    with pytest.raises(ValueError, match=f"--replica: expected I/N.*got {text!r}"):
        parse_replica(text)
    assert parse_replica("1/3") == (1, 3)
    assert parse_replica(None) == (0, 1)
