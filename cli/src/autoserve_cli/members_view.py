"""The members part of ``autoserve status``: each service's live members, the host each
runs on, what each owns and when each last renewed its membership.

A pure core: ``cluster_status.read_members`` reads the records from the members bucket;
this turns them into a rich table, with the time passed in.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table

from autoserve_runtime.ownership import MemberRecord


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.1f}s ago" if seconds < 60 else f"{seconds / 60:.0f}m ago"


def members_table(records: Iterable[MemberRecord], now: float) -> Table:
    """One row per member, by service then member; a member whose last renewal is older than
    its TTL is shown as lapsing (its key is about to expire, or it was paused)."""
    rows = sorted(records, key=lambda r: (r.service, r.member))
    services = len({r.service for r in rows})
    table = Table(title="Members", caption=f"{len(rows)} members of {services} services")
    for column in ("service", "member", "host", "owns", "last seen", "up since"):
        table.add_column(column)
    for r in rows:
        seen = now - r.renewed_at
        late = seen > r.ttl_seconds
        table.add_row(
            r.service, r.member, f"{r.host} (pid {r.pid})", r.owns or "[dim]-[/]",
            f"[red]{_age(seen)} (lapsing)[/]" if late else _age(seen), _age(now - r.started_at),
        )  # fmt: skip
    return table


def lines(count: int) -> int:
    """How many terminal lines the table takes (the live view leaves room for it)."""
    return count + 6 if count else 0
