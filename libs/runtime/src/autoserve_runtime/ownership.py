"""Who owns what among a service's live members: a pure fold over the members bucket.

Each member of a service writes its record under ``<service>.<member>`` in the members
bucket with a per-key TTL, and renews it well within the TTL. A member that stops deletes
its key; one that dies stops renewing, and JetStream expires the key (the bucket's
``limit_marker_ttl`` makes the expiry visible to watchers). Ownership is rendezvous
hashing over the members alive in that view, so a member joining or leaving moves only
its own share of the keys (1/N of them), never the rest.

Every member folds the same entries, so every member computes the same owner for a key
once their views agree; while a change is on its way they may disagree for a moment
(a moved key can be worked twice, never left unowned for longer than the change takes).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

MEMBER_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class MemberRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What a member says of itself on every renewal (``autoserve status`` shows it)."""

    service: str
    member: str
    host: str
    pid: int
    started_at: float  # wall clock, seconds
    renewed_at: float  # wall clock of this renewal
    ttl_seconds: float
    owns: str = ""  # what it owns, in words: "112 targets", "active", "21 partitions"


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(MemberRecord)


def encode_record(record: MemberRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes) -> MemberRecord | None:
    """None for a value that is not a member record (never fatal: the key is ignored)."""
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def member_name(text: str) -> str:
    """A member name from a host name or an operator's choice: one KV key token."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", text).strip("-")[:64]
    if not MEMBER_PATTERN.match(name):
        raise ValueError(f"member name {text!r}: expected 1-64 characters of [A-Za-z0-9_-]")
    return name


def weight(member: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{member}\x00{key}".encode(), digest_size=8).digest(), "big")


def owner_of(key: str, members: Iterable[str]) -> str | None:
    """Rendezvous (highest random weight) hashing: the member with the largest weight for
    ``key``. Removing a member moves only the keys it owned; adding one takes about 1/N of
    the keys, each from whichever member had it."""
    best, best_weight = None, -1
    for member in members:
        w = weight(member, key)
        if w > best_weight or (w == best_weight and best is not None and member < best):
            best, best_weight = member, w
    return best


@dataclass
class MemberView:
    """The live members of one service. ``heard`` is when (monotonic, this process) each
    member's last record arrived: a member not heard from within its TTL plus ``grace`` is
    dropped here even if its expiry marker never arrives (the watcher was reset)."""

    records: dict[str, MemberRecord] = field(default_factory=dict)
    heard: dict[str, float] = field(default_factory=dict)

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self.records)

    def put(self, record: MemberRecord, now: float) -> bool:
        """A renewal or a join; True when the set of members changed."""
        joined = record.member not in self.records
        self.records[record.member] = record
        self.heard[record.member] = now
        return joined

    def remove(self, member: str) -> bool:
        """A delete (it left) or an expiry marker (it died); True when it was a member."""
        self.heard.pop(member, None)
        return self.records.pop(member, None) is not None

    def expire(self, now: float, grace: float, keep: str = "") -> list[str]:
        """Drop the members not heard from within their TTL plus ``grace`` (never ``keep``,
        this process itself); the ones dropped."""
        gone = [m for m, record in self.records.items()
                if m != keep and now - self.heard[m] > record.ttl_seconds + grace]  # fmt: skip
        for member in gone:
            self.remove(member)
        return gone
