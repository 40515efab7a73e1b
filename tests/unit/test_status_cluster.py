"""The cluster part of ``autoserve status`` (``cluster_view``): stream infos and node answers
into rows and tables, without NATS."""

from __future__ import annotations

from nats.js.api import ClusterInfo, PeerInfo
from rich.console import Console

from autoserve_cli.cluster_status import address
from autoserve_cli.cluster_view import (
    Copy,
    State,
    cluster_view,
    copy_text,
    lines,
    stream_row,
    tables,
    unanswered,
)

SECOND = 1_000_000_000  # PeerInfo.active is in nanoseconds


def peer(name: str, *, current: bool = True, heard: float = 0.2, lag: int | None = None, offline=None) -> PeerInfo:
    return PeerInfo(name=name, current=current, offline=offline, active=int(heard * SECOND), lag=lag)


def info(leader: str | None, *peers: PeerInfo) -> ClusterInfo:
    return ClusterInfo(leader=leader, name="nats", replicas=list(peers))


def test_a_stream_row_names_its_leader_and_each_replica_state() -> None:
    row = stream_row(
        "AUTOSERVE_PROBES",
        info("nats-2", peer("nats-1"), peer("nats-3", current=False, lag=42, heard=0.5)),
    )
    assert row.leader == "nats-2" and row.problem is None
    assert row.copies == (
        Copy("nats-2", State.LEADER),
        Copy("nats-1", State.CURRENT, 0, 0.2),
        Copy("nats-3", State.BEHIND, 42, 0.5),
    )


def test_a_replica_the_leader_has_not_heard_from_is_silent_even_while_still_called_current() -> None:
    # nats-server keeps a SIGKILLed peer "current" for some ten seconds: the age tells.
    row = stream_row("S", info("nats-1", peer("nats-2", heard=8.0), peer("nats-3", offline=True, current=False)))
    states = {c.node: c.state for c in row.copies}
    assert states == {"nats-1": State.LEADER, "nats-2": State.SILENT, "nats-3": State.OFFLINE}


def test_a_stream_without_a_leader_says_so() -> None:
    assert stream_row("S", info(None)).problem == "no leader"
    assert stream_row("S", None).leader is None


def test_nodes_come_from_their_info_answers_and_from_the_streams() -> None:
    streams = [
        stream_row("AUTOSERVE_PROBES", info("nats-1", peer("nats-2"), peer("nats-3", heard=20.0))),
        stream_row("KV_autoserve-apps", info("nats-2", peer("nats-1"), peer("nats-3", heard=20.0))),
        unanswered("AUTOSERVE_EVENTS", "no answer"),
    ]
    answers = {"127.0.0.1:4001": "nats-1", "127.0.0.1:4002": "nats-2", "127.0.0.1:4003": None}
    view = cluster_view("nats", streams, answers, connected="nats-2")
    nodes = {n.name: n for n in view.nodes}
    assert list(nodes) == ["nats-1", "nats-2", "nats-3"]
    assert nodes["nats-1"].url == "127.0.0.1:4001" and nodes["nats-1"].leads == ("AUTOSERVE_PROBES",)
    assert nodes["nats-2"].connected and nodes["nats-2"].leads == ("KV_autoserve-apps",)
    # nats-3: no INFO under any address, and silent to every leader.
    assert not nodes["nats-3"].reachable and nodes["nats-3"].url is None
    assert [n.name for n in view.nodes if n.reachable] == ["nats-1", "nats-2"]
    assert view.silent_urls == ("127.0.0.1:4003",)


def test_a_node_whose_address_is_not_reachable_from_here_counts_when_the_cluster_hears_it() -> None:
    # Compose or Kubernetes: the servers gossip addresses only their own network reaches.
    streams = [stream_row("S", info("nats-1", peer("nats-2"), peer("nats-3")))]
    view = cluster_view("nats", streams, {"nats-1:4222": None, "nats-2:4222": None}, connected="nats-1")
    assert all(node.reachable for node in view.nodes)


def test_the_tables_show_a_column_per_node_and_every_stream() -> None:
    streams = [
        stream_row("AUTOSERVE_PROBES", info("nats-1", peer("nats-2", lag=3, current=False), peer("nats-3"))),
        unanswered("KV_autoserve-apps", "missing"),
    ]
    view = cluster_view("nats", streams, {"127.0.0.1:4001": "nats-1"}, connected="nats-1")
    console = Console(width=200, record=True)
    console.print(*tables(view))
    text = console.export_text()
    assert "NATS cluster nats" in text and "3 of 3 nodes reachable" in text
    assert "nats-1 (this connection)" in text
    probes = next(line for line in text.splitlines() if line.startswith("│ AUTOSERVE_PROBES"))
    assert [cell.strip() for cell in probes.strip("│ ").split("│")] == [
        "AUTOSERVE_PROBES", "nats-1", "leader", "behind lag 3 · 0.2s ago", "current · 0.2s ago"
    ]  # fmt: skip
    assert "missing" in next(line for line in text.splitlines() if line.startswith("│ KV_autoserve-apps"))
    assert lines(view) >= len(text.splitlines()) and lines(None) == 0


def test_a_cell_without_a_copy_is_a_dash() -> None:
    assert copy_text(None) == "[dim]-[/]"
    assert copy_text(Copy("n", State.SILENT, 0, 12.0)) == "[red]silent[/] · 12.0s ago"


def test_seed_urls_become_the_addresses_the_servers_gossip() -> None:
    assert address("nats://127.0.0.1:4222") == "127.0.0.1:4222"
    assert address("tls://nats-1") == "nats-1:4222"
    assert address("nats://user@[::1]:5000") == "[::1]:5000"
    assert address("127.0.0.1:4001") == "127.0.0.1:4001"
