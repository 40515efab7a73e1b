"""A local NATS JetStream cluster: N real nats-server processes on 127.0.0.1, routed to
each other, each with its own client port, cluster port, monitoring port and store.

This is NATS's own clustering (Raft under JetStream), started from the binary we ship;
``autoserve up --cluster 3`` and the cluster tests use it. Nothing here coordinates
anything: the servers elect their leaders themselves.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

from .nats_server import EmbeddedNatsServer, NatsServerError, free_port


class EmbeddedNatsCluster:
    """``size`` nats-server nodes named ``<name>-1`` .. ``<name>-N``, data under ``store_dir``."""

    def __init__(self, store_dir: str | Path, size: int = 3, *, name: str = "autoserve") -> None:
        if size < 1:
            raise ValueError(f"cluster size must be at least 1, got {size}")
        self.store_dir = Path(store_dir)
        self.name = name
        self.node_names = [f"{name}-{i}" for i in range(1, size + 1)]
        cluster_ports = [free_port() for _ in range(size)]
        self.monitor_ports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{port}" for port in cluster_ports)
        self.nodes = [
            EmbeddedNatsServer(self.store_dir / node, extra_args=_cluster_args(node, name, port, routes, monitor))
            for node, port, monitor in zip(self.node_names, cluster_ports, self.monitor_ports, strict=True)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """The seed list every service and command takes: ``nats://a,nats://b,nats://c``."""
        return ",".join(self.urls)

    def node(self, name: str) -> EmbeddedNatsServer:
        return self.nodes[self.node_names.index(name)]

    def start(self, timeout: float = 30.0) -> EmbeddedNatsCluster:
        for node in self.nodes:
            if not node.running:
                node.launch()
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running node answers ``/healthz`` 200: serving, and JetStream has a
        meta leader and is current (nats-server's own readiness check)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.healthy(i) for i, node in enumerate(self.nodes) if node.running):
                return
            time.sleep(0.1)
        raise NatsServerError(f"the NATS cluster did not become healthy within {timeout:g}s; see {self.store_dir}/*/")

    def healthy(self, index: int) -> bool:
        node = self.nodes[index]
        if not node.ready():
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_ports[index]}/healthz", timeout=1) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        for node in self.nodes:
            node.stop(timeout)

    def kill(self) -> None:
        """SIGKILL every node at once: the whole cluster crashes."""
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> EmbeddedNatsCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def _cluster_args(node: str, cluster: str, port: int, routes: str, monitor_port: int) -> tuple[str, ...]:
    """A node's name (JetStream needs unique ones), its cluster listener and every route
    (its own included: nats-server skips it), and its monitoring port for ``/healthz``."""
    return (
        "--name", node,
        "--cluster_name", cluster,
        "--cluster", f"nats://127.0.0.1:{port}",
        "--routes", routes,
        "-m", str(monitor_port),
    )  # fmt: skip
