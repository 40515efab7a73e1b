"""Reading the NATS cluster for ``autoserve status``: each stream's and bucket's
``ClusterInfo`` from its leader, and each node's name from the INFO line it greets a client
with. The rows and tables are ``cluster_view``'s (pure); this is its adapter."""

from __future__ import annotations

import asyncio
import contextlib
import json
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from autoserve_events import stream_specs
from autoserve_runtime.bus import seed_urls
from autoserve_runtime.ownership import MemberRecord, decode_record
from autoserve_runtime.provisioning import MEMBERS_BUCKET, bucket_configs

from . import cluster_view
from .cluster_view import ClusterView, StreamRow

REFRESH_SECONDS = 2.0  # the live view's
INFO_TIMEOUT_SECONDS = 1.0
NATS_PORT = 4222


def cluster_streams() -> list[str]:
    """Every stream the system keeps: the event streams, and each KV bucket's own."""
    return [spec.name for spec in stream_specs()] + [f"KV_{bucket.bucket}" for bucket in bucket_configs()]


async def read_cluster(nc: Client, seeds: str) -> ClusterView | None:
    """The cluster behind this connection, or None on a single server (nothing to show)."""
    info = nc._server_info  # the server's INFO: its name, its cluster's, every node's client address
    if not info.get("cluster"):
        return None
    js = nc.jetstream(timeout=3)
    streams = [await _stream_row(js, name) for name in cluster_streams()]
    addresses = sorted({*(address(seed) for seed in seed_urls(seeds)), *(info.get("connect_urls") or ())})
    names = await asyncio.gather(*(server_name(a) for a in addresses))
    answers = dict(zip(addresses, names, strict=True))
    return cluster_view.cluster_view(info["cluster"], streams, answers, info.get("server_name"))


async def _stream_row(js: JetStreamContext, name: str) -> StreamRow:
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        return cluster_view.unanswered(name, "missing")
    except (nats.errors.Error, TimeoutError):  # no leader to answer: an election, or no quorum
        return cluster_view.unanswered(name, "no answer")
    return cluster_view.stream_row(name, info.cluster)


async def read_members(js: JetStreamContext) -> list[MemberRecord]:
    """Every live member's last record: the member keys ``<service>.<member>`` of the members
    bucket that hold a value now (leases and progress marks are not members; an expired or
    deleted key's last entry is a marker, not a record)."""
    stream, prefix = f"KV_{MEMBERS_BUCKET}", f"$KV.{MEMBERS_BUCKET}."
    records: list[MemberRecord] = []
    # The bucket's leader may be in an election (a node just died): the table is left out
    # of this reading rather than failing the whole status.
    with contextlib.suppress(nats.errors.Error, TimeoutError):
        info = await js.stream_info(stream, subjects_filter=f"{prefix}>")
        for subject in sorted(info.state.subjects or {}):
            if subject.removeprefix(prefix).split(".")[0] in ("lease", "progress"):
                continue
            with contextlib.suppress(NotFoundError):
                msg = await js.get_msg(stream, subject=subject)
                if record := decode_record(msg.data or b""):
                    records.append(record)
    return records


def address(url: str) -> str:
    """A seed URL as the server lists client addresses (``connect_urls``): ``host:port``."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host = parts.hostname or "127.0.0.1"
    return f"[{host}]:{parts.port or NATS_PORT}" if ":" in host else f"{host}:{parts.port or NATS_PORT}"


async def server_name(host_port: str) -> str | None:
    """The name in the INFO line a NATS server sends as soon as a client connects (before
    any credential or TLS), or None when nothing answers in time."""
    host, _, port = host_port.rpartition(":")
    writer = None
    try:
        opening = asyncio.open_connection(host.strip("[]"), int(port))
        reader, writer = await asyncio.wait_for(opening, INFO_TIMEOUT_SECONDS)
        line = await asyncio.wait_for(reader.readline(), INFO_TIMEOUT_SECONDS)
        if not line.startswith(b"INFO "):
            return None
        return json.loads(line[5:]).get("server_name") or None
    except (OSError, TimeoutError, ValueError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class ClusterWatch:
    """The live view's cluster, read again every few seconds (``view`` is None on a single
    server, and keeps the last reading while a read fails)."""

    def __init__(self, nc: Client, seeds: str) -> None:
        self.nc, self.seeds = nc, seeds
        self.view: ClusterView | None = None
        self.members: list[MemberRecord] = []

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
                self.members = await read_members(self.nc.jetstream(timeout=3))
                self.view = await read_cluster(self.nc, self.seeds)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REFRESH_SECONDS)
