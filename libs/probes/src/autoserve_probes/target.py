"""What one probe checks: an instance's address and its app's health check. Pure.

Which targets exist, who owns them and how the set changes is the prober's business
(its ``core/targets.py``); a probe needs only this.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoserve_config import HealthCheckConfig

TargetKey = tuple[str, str]


@dataclass(frozen=True)
class Target:
    app_name: str
    instance_id: str
    host: str
    port: int
    check: HealthCheckConfig
    source: str = "config"  # "config" or "docker"
    container_id: str | None = None

    @property
    def key(self) -> TargetKey:
        """``(app_name, instance_id)``: one worker, one cached request per key."""
        return (self.app_name, self.instance_id)

    @property
    def authority(self) -> str:
        """``host:port`` as a URL and a Host header write it (an IPv6 literal in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
