"""The cluster part of ``autoserve status``: which NATS nodes answer, which node leads each
stream and KV bucket, and how each replica follows.

A pure core: the adapter (``cluster_status``) reads each stream's ``ClusterInfo`` and each node's
INFO line; this turns them into rows and rich tables, with no I/O and no clock (a replica's
``active`` is already an age: the leader's nanoseconds since it last heard from it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from nats.js.api import ClusterInfo, PeerInfo
from rich.table import Table

# Raft followers answer the leader's heartbeats about once a second: a replica not heard
# from for this long is silent, whatever its last ``current`` said (the leader keeps
# calling a SIGKILLed peer current for some ten seconds).
SILENT_AFTER_SECONDS = 5.0


class State(StrEnum):
    LEADER = "leader"
    CURRENT = "current"
    BEHIND = "behind"  # heard from, not caught up yet (lag: how many entries)
    SILENT = "silent"
    OFFLINE = "offline"  # the cluster says so


@dataclass(frozen=True)
class Copy:
    """One node's copy of one stream."""

    node: str
    state: State
    lag: int = 0
    heard: float | None = None  # seconds since the leader heard from it; None for the leader


@dataclass(frozen=True)
class StreamRow:
    name: str
    leader: str | None
    copies: tuple[Copy, ...] = ()
    problem: str | None = None  # missing, or no answer (no leader to give one)


@dataclass(frozen=True)
class NodeRow:
    name: str
    url: str | None  # its client address, when its INFO answered
    reachable: bool
    connected: bool  # this command's own connection goes through it
    leads: tuple[str, ...]


@dataclass(frozen=True)
class ClusterView:
    name: str
    nodes: tuple[NodeRow, ...]
    streams: tuple[StreamRow, ...]
    silent_urls: tuple[str, ...] = ()  # client addresses that gave no INFO


def copy_of(peer: PeerInfo) -> Copy:
    heard = (peer.active or 0) / 1e9
    if peer.offline:
        state = State.OFFLINE
    elif heard > SILENT_AFTER_SECONDS:
        state = State.SILENT
    else:
        state = State.CURRENT if peer.current else State.BEHIND
    return Copy(peer.name or "?", state, peer.lag or 0, heard)


def stream_row(name: str, cluster: ClusterInfo | None) -> StreamRow:
    """A stream as its leader described it: the leader first, then each replica."""
    if cluster is None or not cluster.leader:
        return StreamRow(name, None, problem="no leader")
    leader = Copy(cluster.leader, State.LEADER)
    return StreamRow(name, cluster.leader, (leader, *(copy_of(p) for p in cluster.replicas or ())))


def unanswered(name: str, problem: str) -> StreamRow:
    return StreamRow(name, None, problem=problem)


def cluster_view(
    name: str, streams: Iterable[StreamRow], answers: Mapping[str, str | None], connected: str | None
) -> ClusterView:
    """``answers``: each client address probed, and the server name its INFO gave (None: no
    answer). A node is reachable when its INFO answered, or, when no address of it is known,
    when the cluster heard from it lately (it leads, or a leader heard it within the limit)."""
    streams = tuple(streams)
    url_of = {node: url for url, node in answers.items() if node}
    heard = {c.node for s in streams for c in s.copies if c.state in (State.LEADER, State.CURRENT, State.BEHIND)}
    names = sorted(set(url_of) | {c.node for s in streams for c in s.copies} | ({connected} if connected else set()))
    nodes = tuple(
        NodeRow(
            name=node,
            url=url_of.get(node),
            reachable=node in url_of or node in heard or node == connected,
            connected=node == connected,
            leads=tuple(s.name for s in streams if s.leader == node),
        )
        for node in names
    )
    return ClusterView(name, nodes, streams, tuple(sorted(url for url, node in answers.items() if not node)))


# -- rendering ------------------------------------------------------------------------------

_STYLE = {
    State.LEADER: "[bold green]leader[/]",
    State.CURRENT: "[green]current[/]",
    State.BEHIND: "[yellow]behind[/]",
    State.SILENT: "[red]silent[/]",
    State.OFFLINE: "[red]offline[/]",
}


def copy_text(copy: Copy | None) -> str:
    """One cell: the state, the lag when there is one, and when the leader last heard it."""
    if copy is None:
        return "[dim]-[/]"
    text = _STYLE[copy.state]
    if copy.lag:
        text += f" lag {copy.lag}"
    if copy.heard is not None:
        text += f" · {copy.heard:.1f}s ago"
    return text


def tables(view: ClusterView) -> tuple[Table, Table]:
    """The nodes, then one row per stream and bucket with one column per node."""
    reachable = sum(node.reachable for node in view.nodes)
    caption = f"{reachable} of {len(view.nodes)} nodes reachable"
    if view.silent_urls:
        caption += " · no answer from " + ", ".join(view.silent_urls)
    nodes = Table(title=f"NATS cluster {view.name}", caption=caption)
    for column in ("node", "client address", "reachable", "leads"):
        nodes.add_column(column)
    for node in view.nodes:
        name = node.name + (" (this connection)" if node.connected else "")
        nodes.add_row(name, node.url or "[dim]-[/]", "[green]yes[/]" if node.reachable else "[red]no[/]",
                      ", ".join(node.leads) or "[dim]-[/]")  # fmt: skip
    streams = Table(title="Streams and KV buckets: leader and replicas")
    streams.add_column("stream")
    streams.add_column("leader")
    for node in view.nodes:
        streams.add_column(node.name)
    for stream in view.streams:
        copies = {c.node: c for c in stream.copies}
        leader = stream.leader or f"[red]{stream.problem or 'none'}[/]"
        streams.add_row(stream.name, leader, *(copy_text(copies.get(node.name)) for node in view.nodes))
    return nodes, streams


def lines(view: ClusterView | None) -> int:
    """How many terminal lines ``tables`` takes (the live view leaves room for them)."""
    if view is None:
        return 0
    return len(view.nodes) + len(view.streams) + 12  # titles, headers, borders, caption
