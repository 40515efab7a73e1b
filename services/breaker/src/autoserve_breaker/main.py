"""``autoserve run breaker [--replica I/N]``: one breaker replica in the foreground."""

from __future__ import annotations

import argparse

from autoserve_runtime import serve

from .service import BreakerService


def parse_replica(text: str | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N); None -> the only replica."""
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


def run(nats_url: str, *, replica: int = 0, replicas: int = 1) -> int:
    service = BreakerService(nats_url, replica=replica, replicas=replicas)
    return serve(f"breaker-{replica}" if replicas > 1 else "breaker", service.run)


def run_service(args: argparse.Namespace) -> int:
    """``autoserve run breaker [--replica I/N]``: decisions for 1/N of the breakers, answers for all."""
    replica, replicas = parse_replica(getattr(args, "replica", None))
    return run(args.nats_url, replica=replica, replicas=replicas)
