"""The services ``autoserve run`` and ``autoserve up`` know, in start order.

Each entry names a module with ``run_service(args: argparse.Namespace) -> int``, which
runs that one service in the foreground (``args`` carries ``nats_url`` and the ``run``
options). A service joins ``up`` by being listed here.
"""

from __future__ import annotations

SERVICES: dict[str, str] = {
    "prober": "autoserve_prober.main",
    "detector": "autoserve_detector.main",
    "breaker": "autoserve_breaker.main",
    "recovery": "autoserve_recovery.main",
    "reporter": "autoserve_reporter.main",
    "alerter": "autoserve_alerter.main",
}
