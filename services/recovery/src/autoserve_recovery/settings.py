"""Service-wide settings (environment or flags) and an app's policy as the core reads it."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from autoserve_config import AppSpec, env_number, parse_switch

from .adapters.nginx import NginxSettings
from .core import AppPolicy, Limits


def default_replica() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class RecoverySettings:
    """Service-wide settings: host-local paths and global bounds (env or flags)."""

    replica: str = field(default_factory=default_replica)
    docker: bool | None = None  # None: use Docker if its socket is there
    docker_url: str | None = None
    nginx: NginxSettings | None = None
    process_dir: Path | None = None
    limits: Limits = field(default_factory=Limits)
    lease_seconds: float = 15.0
    history_seconds: float = 3600.0
    concurrency: int = 64
    # SIGTERM: how long actions in flight may run on; ``serve`` cancels 3 s after it.
    drain_seconds: float = 7.0

    @classmethod
    def from_env(cls) -> RecoverySettings:
        env = os.environ
        nginx = None
        if env.get("AUTOSERVE_NGINX_UPSTREAM_DIR"):
            reload = tuple(env.get("AUTOSERVE_NGINX_RELOAD", "nginx -s reload").split())
            nginx = NginxSettings(Path(env["AUTOSERVE_NGINX_UPSTREAM_DIR"]), reload)
        data_dir = Path(env.get("AUTOSERVE_DATA_DIR", ".autoserve"))
        # A bad value raises ValueError naming the variable; ``run_service`` says it and stops.
        return cls(
            replica=env.get("AUTOSERVE_RECOVERY_REPLICA") or default_replica(),
            docker=parse_switch("AUTOSERVE_RECOVERY_DOCKER", env.get("AUTOSERVE_RECOVERY_DOCKER", "")),
            nginx=nginx,
            process_dir=data_dir / "processes",
            limits=Limits(max_actions_per_minute=int(env_number("AUTOSERVE_RECOVERY_MAX_ACTIONS_PER_MINUTE", 30, 1))),
            lease_seconds=env_number("AUTOSERVE_RECOVERY_LEASE_SECONDS", 15, 0.1),
            drain_seconds=env_number("AUTOSERVE_RECOVERY_DRAIN_SECONDS", 7),
        )


def policy_for(spec: AppSpec) -> AppPolicy:
    return AppPolicy(spec.recovery, spec.health_check.failure_threshold, spec.scaling.max_replicas)
