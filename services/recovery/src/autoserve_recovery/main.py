"""``autoserve run recovery``. Settings come from the environment (host-local paths):
``AUTOSERVE_NGINX_UPSTREAM_DIR``, ``AUTOSERVE_NGINX_RELOAD``, ``AUTOSERVE_RECOVERY_REPLICA``,
``AUTOSERVE_RECOVERY_DOCKER``, ``AUTOSERVE_RECOVERY_MAX_ACTIONS_PER_MINUTE``,
``AUTOSERVE_RECOVERY_LEASE_SECONDS``, ``AUTOSERVE_RECOVERY_DRAIN_SECONDS``; local process
records under ``AUTOSERVE_DATA_DIR``."""

from __future__ import annotations

import argparse

from autoserve_runtime import serve

from .service import RecoveryService, RecoverySettings


def run_service(args: argparse.Namespace) -> int:
    try:
        settings = RecoverySettings.from_env()
    except ValueError as exc:  # a bad setting: say which, start nothing
        raise SystemExit(f"autoserve run recovery: {exc}") from None
    if getattr(args, "docker", None) is not None:
        settings = RecoverySettings(**{**vars(settings), "docker": args.docker})
    # The grace outlasts the drain: the actions still running when it ends are given back
    # (negatively acknowledged) by the service itself, before anything is cancelled.
    return serve("recovery", RecoveryService(args.nats_url, settings).run, grace_seconds=settings.drain_seconds + 3)
