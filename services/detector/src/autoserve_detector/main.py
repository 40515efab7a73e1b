"""``autoserve run detector``."""

from __future__ import annotations

import argparse

from autoserve_runtime import serve

from .service import DetectorService


def run_service(args: argparse.Namespace) -> int:
    return serve("detector", DetectorService(args.nats_url).run)
