"""Breaker messages that are not events: outcome reports and the allow/override RPCs.

They travel on plain NATS subjects outside every stream (a report must be cheap to send;
JetStream's publish ack would race an RPC reply). A malformed one raises
``MalformedMessage`` naming the field and the value, so the breaker can reply with it or
dead-letter it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, get_args

import msgspec

from .subjects import is_valid_name

OverrideAction = Literal["open", "close", "reset"]
MAX_MESSAGE_BYTES = 4096


class MalformedMessage(ValueError):
    """Not a valid breaker message; the text names the field and the value."""


class BreakerReport(msgspec.Struct, frozen=True):
    """One request outcome, published to ``autoserve.breaker.report.<app>.<instance>``."""

    success: bool
    duration_ms: float = 0.0


class AllowRequest(msgspec.Struct, frozen=True):
    app_name: str
    instance_id: str


class AllowReply(msgspec.Struct, frozen=True, omit_defaults=True):
    allow: bool
    state: str  # closed | open | half_open; "error" when the request was malformed
    known: bool = True  # False: no breaker for this instance, the default answered
    error: str | None = None


class OverrideRequest(msgspec.Struct, frozen=True):
    app_name: str
    instance_id: str
    action: OverrideAction
    requested_by: str = ""


class OverrideReply(msgspec.Struct, frozen=True, omit_defaults=True):
    ok: bool
    state: str = ""
    forced: bool = False
    event_id: str | None = None
    error: str | None = None


_encoder = msgspec.json.Encoder()
_report = msgspec.json.Decoder(BreakerReport)
_allow = msgspec.json.Decoder(AllowRequest)
_allow_reply = msgspec.json.Decoder(AllowReply)
_override = msgspec.json.Decoder(OverrideRequest)
_override_reply = msgspec.json.Decoder(OverrideReply)
_raw = msgspec.json.Decoder()
_AT = re.compile(r" - at `\$\.([A-Za-z_]+)`")


def encode_message(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def _explain(exc: msgspec.DecodeError, data: bytes, what: str) -> MalformedMessage:
    """msgspec says ``Expected `bool`, got `str` - at `$.success```; say which value too."""
    text = str(exc).replace("`", "")
    if (missing := re.search(r"missing required field (\w+)", text)) is not None:
        return MalformedMessage(f"{what}.{missing.group(1)}: required")
    match = _AT.search(str(exc))
    if match is None:
        return MalformedMessage(f"{what}: {text}"[:500])
    field = match.group(1)
    detail = _AT.sub("", str(exc)).replace("`", "")
    try:
        raw: Any = _raw.decode(data)
        value = f", got {raw[field]!r}" if isinstance(raw, dict) and field in raw else ""
    except msgspec.DecodeError:
        value = ""
    detail = re.sub(r", got [a-z]+$", "", detail) if value else detail
    if detail.startswith("Invalid enum value"):
        detail = f"must be one of {', '.join(map(repr, get_args(OverrideAction)))}"
    return MalformedMessage(f"{what}.{field}: {detail[:1].lower()}{detail[1:]}{value}"[:500])


def _check_size(data: bytes, what: str) -> None:
    if len(data) > MAX_MESSAGE_BYTES:
        raise MalformedMessage(f"{what}: {len(data)} bytes, more than {MAX_MESSAGE_BYTES}")


def _check_names(what: str, app_name: str, instance_id: str) -> None:
    for field, value in (("app_name", app_name), ("instance_id", instance_id)):
        if not is_valid_name(value):
            raise MalformedMessage(f"{what}.{field}: {value!r} is not a name of 1-128 characters of [A-Za-z0-9_-]")


def decode_report(data: bytes) -> BreakerReport:
    _check_size(data, "report")
    try:
        report = _report.decode(data)
    except msgspec.DecodeError as exc:
        raise _explain(exc, data, "report") from None
    if not (report.duration_ms >= 0 and math.isfinite(report.duration_ms)):
        raise MalformedMessage(f"report.duration_ms: must be a finite number >= 0, got {report.duration_ms!r}")
    return report


def decode_allow_request(data: bytes) -> AllowRequest:
    _check_size(data, "allow request")
    try:
        request = _allow.decode(data)
    except msgspec.DecodeError as exc:
        raise _explain(exc, data, "allow request") from None
    _check_names("allow request", request.app_name, request.instance_id)
    return request


def decode_allow_reply(data: bytes) -> AllowReply:
    return _allow_reply.decode(data)


def decode_override_request(data: bytes) -> OverrideRequest:
    _check_size(data, "override request")
    try:
        request = _override.decode(data)
    except msgspec.DecodeError as exc:
        raise _explain(exc, data, "override request") from None
    _check_names("override request", request.app_name, request.instance_id)
    return request


def decode_override_reply(data: bytes) -> OverrideReply:
    return _override_reply.decode(data)
