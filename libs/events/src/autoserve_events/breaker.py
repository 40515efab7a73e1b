"""Breaker messages that are not events: outcome reports and the allow/override RPCs.

They travel on plain NATS subjects outside every stream (a report must be cheap to send;
JetStream's publish ack would race an RPC reply). A malformed one raises
``MalformedMessage`` naming the field and the value, so the breaker can reply with it or
dead-letter it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args

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


Message = TypeVar("Message", BreakerReport, AllowRequest, AllowReply, OverrideRequest, OverrideReply)


def _check_duration(report: BreakerReport, what: str) -> None:
    if not (report.duration_ms >= 0 and math.isfinite(report.duration_ms)):
        raise MalformedMessage(f"{what}.duration_ms: must be a finite number >= 0, got {report.duration_ms!r}")


def _check_names(request: AllowRequest | OverrideRequest, what: str) -> None:
    for field, value in (("app_name", request.app_name), ("instance_id", request.instance_id)):
        if not is_valid_name(value):
            raise MalformedMessage(f"{what}.{field}: {value!r} is not a name of 1-128 characters of [A-Za-z0-9_-]")


# Each message: what an error calls it, its decoder, and what msgspec cannot check for us.
_KINDS: dict[type[msgspec.Struct], tuple[str, msgspec.json.Decoder[Any], Callable[[Any, str], None] | None]] = {
    BreakerReport: ("report", msgspec.json.Decoder(BreakerReport), _check_duration),
    AllowRequest: ("allow request", msgspec.json.Decoder(AllowRequest), _check_names),
    AllowReply: ("allow reply", msgspec.json.Decoder(AllowReply), None),
    OverrideRequest: ("override request", msgspec.json.Decoder(OverrideRequest), _check_names),
    OverrideReply: ("override reply", msgspec.json.Decoder(OverrideReply), None),
}
_encoder = msgspec.json.Encoder()
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


def decode_message(data: bytes, kind: type[Message]) -> Message:
    """One breaker message of type ``kind``. ``MalformedMessage`` names the field and the
    value when the message is too large, not of that type, or holds a value out of range
    (a negative duration, an app or instance that is not a name)."""
    what, decoder, check = _KINDS[kind]
    if len(data) > MAX_MESSAGE_BYTES:
        raise MalformedMessage(f"{what}: {len(data)} bytes, more than {MAX_MESSAGE_BYTES}")
    try:
        message: Message = decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise _explain(exc, data, what) from None
    if check is not None:
        check(message, what)
    return message


def decode_report(data: bytes) -> BreakerReport:
    return decode_message(data, BreakerReport)


def decode_allow_request(data: bytes) -> AllowRequest:
    return decode_message(data, AllowRequest)


def decode_allow_reply(data: bytes) -> AllowReply:
    return decode_message(data, AllowReply)


def decode_override_request(data: bytes) -> OverrideRequest:
    return decode_message(data, OverrideRequest)


def decode_override_reply(data: bytes) -> OverrideReply:
    return decode_message(data, OverrideReply)
