"""Where an app's containers listen, and a port for a copy on host networking.

A replacement or an added replica runs beside the original, so on host networking it
cannot use the original's port: it gets a free 127.0.0.1 port, the lowest free one in
``docker.replica_ports`` (the same choice on every replica), or without a range one the
kernel picks. ``docker.port`` puts every container of the app on one port, so such an app
cannot have a copy on host networking.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

from autoserve_runtime import bindable, free_port

from ..ports import RecoveryError

PORT_LABEL = "autoserve.port"
KERNEL_TRIES = 20


@dataclass(frozen=True)
class PortPolicy:
    """Where an app's containers listen: the prober's rule (``docker.port``, else the
    ``autoserve.port`` label, else ``health_check.port``), and where copies may go."""

    fixed: int | None = None  # docker.port: every container of the app on this port
    default: int = 8000  # health_check.port
    replica_range: tuple[int, int] | None = None  # docker.replica_ports

    def port_of(self, labels: Mapping[str, str]) -> int:
        label = labels.get(PORT_LABEL, "")
        return self.fixed or (int(label) if label.isdigit() else self.default)


def copy_port(app_name: str, policy: PortPolicy, taken: Set[int]) -> int:
    """A free 127.0.0.1 port for a copy, none of ``taken`` (the app's containers' ports,
    stopped ones included); ``RecoveryError`` saying why there is none."""
    if policy.fixed:
        raise RecoveryError(
            f"{app_name}: docker.port {policy.fixed} puts every container on one port; on host networking a "
            "copy cannot run beside the original. Use the autoserve.port label instead of docker.port"
        )
    if policy.replica_range is None:
        for _ in range(KERNEL_TRIES):  # the kernel's pick is free now; skip one a stopped container owns
            if (port := free_port()) not in taken:
                return port
        raise RecoveryError(f"{app_name}: no free 127.0.0.1 port found for a copy")
    low, high = policy.replica_range
    for port in range(low, high + 1):  # the lowest free one: the same choice on every replica
        if port not in taken and bindable(port):
            return port
    raise RecoveryError(f"{app_name}: no free port left in docker.replica_ports [{low}, {high}]")
