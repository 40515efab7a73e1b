"""One shared encoder and decoder for every event, with the schema upcaster hook.

The fast path decodes straight into the typed union. A message written at an older
``schema_version`` is decoded to a dict, passed through the registered upcasters one
version at a time, then converted. Unknown fields are ignored (forward compatible);
a missing required field or a wrong type raises ``MalformedEvent``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from .catalogue import EVENT_TYPES, SCHEMA_VERSION, AnyEvent, Event

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)
_header_decoder = msgspec.json.Decoder()


class _Header(msgspec.Struct):
    type: str = ""
    schema_version: int = 1


_peek = msgspec.json.Decoder(_Header)

# (event type name, from_version) -> function that returns the dict at from_version + 1
_UPCASTERS: dict[tuple[str, int], Upcaster] = {}
CURRENT_VERSIONS: dict[str, int] = {name: SCHEMA_VERSION for name in EVENT_TYPES}


class MalformedEvent(ValueError):
    """The bytes are not a valid event of the catalogue; the reason says why."""


def register_upcaster(type_name: str, from_version: int, upcaster: Upcaster) -> None:
    if type_name not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type_name!r}")
    _UPCASTERS[(type_name, from_version)] = upcaster


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes) -> AnyEvent:
    try:
        header = _peek.decode(data)
    except msgspec.DecodeError as exc:
        raise MalformedEvent(f"not an event: {exc}") from None
    if header.type not in EVENT_TYPES:
        raise MalformedEvent(f"unknown event type {header.type!r}")
    current = CURRENT_VERSIONS[header.type]
    if header.schema_version > current:
        raise MalformedEvent(
            f"{header.type} schema_version {header.schema_version} is newer than this "
            f"reader's {current}; upgrade the consumer"
        )
    try:
        if header.schema_version == current:
            return _decoder.decode(data)
        return _upcast(header.type, header.schema_version, current, _header_decoder.decode(data))
    except msgspec.DecodeError as exc:
        raise MalformedEvent(f"{header.type}: {exc}") from None


def _upcast(type_name: str, version: int, current: int, raw: dict[str, Any]) -> AnyEvent:
    while version < current:
        upcaster = _UPCASTERS.get((type_name, version))
        if upcaster is None:
            raise MalformedEvent(f"{type_name}: no upcaster from schema_version {version}")
        raw = upcaster(raw)
        version += 1
    raw["schema_version"] = current
    try:
        return msgspec.convert(raw, AnyEvent)
    except msgspec.ValidationError as exc:
        raise MalformedEvent(f"{type_name}: {exc}") from None


def headers_for(event: Event) -> dict[str, str]:
    """NATS headers for a publish: ``Nats-Msg-Id`` lets JetStream drop a retried duplicate."""
    return {"Nats-Msg-Id": event.event_id}
