"""``autoserve run alerter``: the alerting service in the foreground."""

from __future__ import annotations

import argparse

from autoserve_runtime import serve

from .service import AlerterService


def run(nats_url: str) -> int:
    return serve("alerter", AlerterService(nats_url).run)


def run_service(args: argparse.Namespace) -> int:
    return run(args.nats_url)
