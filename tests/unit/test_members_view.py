"""The members table of ``autoserve status``, from records and a clock passed in."""

from __future__ import annotations

from rich.console import Console

from autoserve_cli.members_view import members_table
from autoserve_runtime.ownership import MemberRecord


def record(service: str, member: str, renewed_at: float, owns: str = "") -> MemberRecord:
    return MemberRecord(service=service, member=member, host="node-1", pid=42, started_at=0.0,
                        renewed_at=renewed_at, ttl_seconds=5.0, owns=owns)  # fmt: skip


def rendered(records: list[MemberRecord], now: float) -> str:
    console = Console(width=200, record=True)
    console.print(members_table(records, now))
    return console.export_text()


def test_members_are_listed_by_service_with_what_they_own_and_when_last_seen() -> None:
    out = rendered([record("prober", "b", 99.0, "150 targets"), record("detector", "a", 98.0)], now=100.0)
    assert "2 members of 2 services" in out
    assert out.index("detector") < out.index("prober")
    assert "node-1 (pid 42)" in out and "150 targets" in out and "1.0s ago" in out and "2.0s ago" in out


def test_a_member_not_renewed_within_its_ttl_is_shown_as_lapsing() -> None:
    out = rendered([record("prober", "a", 90.0)], now=100.0)
    assert "10.0s ago (lapsing)" in out
