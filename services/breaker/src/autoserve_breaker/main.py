"""``autoserve run breaker``: one breaker member in the foreground."""

from __future__ import annotations

import argparse
import sys

from autoserve_runtime import serve

from .service import BreakerService


def parse_replica(text: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N); None -> the only replica. Still checked: a deployment that passes
    ``--replica`` learns that it is ignored, not that it is malformed."""
    if not text:
        return 0, 1
    index, sep, count = text.partition("/")
    try:
        replica, replicas = int(index), int(count)
    except ValueError:
        raise ValueError(f"--replica: expected I/N such as 0/2, got {text!r}") from None
    if not sep or replicas < 1 or not 0 <= replica < replicas:
        raise ValueError(f"--replica: expected I/N with 0 <= I < N, got {text!r}")
    return replica, replicas


REPLICA_IGNORED = (
    "--replica (AUTOSERVE_BREAKER_REPLICA) is deprecated and ignored: breaker members share the "
    "breakers by membership (AUTOSERVE_MEMBER names a member); it will be removed in the next release"
)


def run(nats_url: str) -> int:
    service = BreakerService(nats_url)
    return serve("breaker", service.run)


def run_service(args: argparse.Namespace) -> int:
    """``autoserve run breaker``: decisions for this member's share of the breakers, answers for all."""
    text = getattr(args, "replica", None)
    if text:
        parse_replica(text)
        print(f"autoserve run breaker: warning: {REPLICA_IGNORED}", file=sys.stderr, flush=True)
    return run(args.nats_url)
