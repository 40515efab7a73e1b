"""``autoserve run prober``: one prober process, or several (``--workers``), each a member."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

from autoserve_runtime import endpoint_for, serve
from autoserve_runtime.observability import SHARD_PORT_STEP

from .service import ProberService


def run(nats_url: str, *, shard: int = 0, shards: int = 1, docker: bool | None = None) -> int:
    service = ProberService(nats_url, shard=shard, shards=shards, docker=docker)
    return serve(f"prober-{shard}" if shards > 1 else "prober", service.run)


def run_service(args: argparse.Namespace) -> int:
    """``autoserve run prober [--workers N] [--docker|--no-docker]``."""
    if args.shard:
        shard, _, shards = args.shard.partition("/")
        return run(args.nats_url, shard=int(shard), shards=int(shards), docker=args.docker)
    return run_sharded(args.nats_url, args.workers, docker=args.docker)


def run_sharded(nats_url: str, workers: int, docker: bool | None = None) -> int:
    """``workers`` processes, each a member of the prober (``<member>-w<i>``): targets are
    split among them, and any other members, by ownership. ``--shard I/N`` only names a
    child (its member, its client, its /metrics port); it no longer decides what it owns."""
    if workers <= 1:
        return run(nats_url, docker=docker)
    command = [sys.executable, "-m", "autoserve_cli.main", "run", "prober", "--nats-url", nats_url]
    if docker is not None:
        command.append("--docker" if docker else "--no-docker")
    children = [subprocess.Popen([*command, "--shard", f"{i}/{workers}", *_metrics_flags(i)]) for i in range(workers)]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)


def _metrics_flags(shard: int) -> list[str]:
    """Each shard serves /metrics on its own port: the prober's, plus 100 per shard."""
    endpoint = endpoint_for("prober")
    port = endpoint.port + SHARD_PORT_STEP * shard if endpoint.port else 0
    return ["--metrics-host", endpoint.host, "--metrics-port", str(port)]
