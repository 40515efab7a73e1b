"""The configuration file's model: the seed's ``HealthCheckConfig`` and the sections around it.

Names and defaults are the seed's. What goes beyond the seed is marked in a comment.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .alerting import AlertingConfig


class HealthCheckConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    protocol: Literal["HTTP", "TCP"] = "HTTP"
    path: str = "/health"
    port: int = 8000
    method: str = "GET"
    headers: dict[str, str] | None = None
    body: str | None = None
    expected_status_codes: list[int] = msgspec.field(default_factory=lambda: [200])
    probe_data: str | None = None
    expected_response: str | None = None
    initial_delay_seconds: float = 30
    period_seconds: float = 30
    timeout_seconds: float = 5
    failure_threshold: int = 3
    success_threshold: int = 1
    enabled: bool = True
    follow_redirects: bool = False
    verify_ssl: bool = True
    max_retries: int = 0
    # Beyond the seed: https targets (verify_ssl means nothing without them), and whether
    # to reuse connections between probes (cheaper; off = a new connection each probe,
    # as kubelet and blackbox_exporter do, which also tests that the port accepts).
    scheme: Literal["http", "https"] = "http"
    keep_alive: bool = True


class Instance(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    host: str
    port: int | None = None  # defaults to health_check.port


class DockerDiscovery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    label: str  # "key=value" a container must carry
    port: int | None = None  # else the container's autoserve.port label, else health_check.port
    # Beyond the seed: where the recovery service finds a port for a copy it starts on host
    # networking (replace_instance, scale_out): [low, high]; unset = a free port the kernel
    # picks. The copy gets it as its autoserve.port label and its PORT environment variable.
    replica_ports: list[int] | None = None


class ScalingConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    min_replicas: int = 1
    max_replicas: int = 5


class BreakerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    failure_threshold: int = 5
    success_threshold: int = 3
    recovery_timeout: float = 60
    max_test_requests: int = 3
    # Beyond the seed, as in resilience4j: a sliding window of the last N calls ("count")
    # or the last N seconds ("time"). Its rules are off until a rate threshold is set, so
    # the seed's consecutive-failure rule alone applies by default.
    sliding_window_type: Literal["count", "time"] = "count"
    sliding_window_size: int = 100
    minimum_number_of_calls: int = 10
    failure_rate_threshold: float | None = None  # percent; open at or above it
    slow_call_duration_threshold: float | None = None  # ms; a slower call is slow
    slow_call_rate_threshold: float = 100  # percent of slow calls that opens the breaker
    # An instance the breaker has never seen (no probe, no report, not configured).
    allow_unknown_instances: bool = True


class RecoveryConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The recovery service's rules for one app. Every bound is on by default."""

    enabled: bool = True
    # failure_type -> strategies in order; replaces the seed's default list for that type.
    strategies: dict[str, list[str]] = {}
    # After the listed remediations, continue up restart -> recreate -> replace -> scale_out.
    escalate: bool = True
    # The seed's "no more than 3 restarts in 5 minutes", per instance.
    max_restarts: int = 3
    restart_window_seconds: float = 300
    # Kubernetes' crash-loop backoff: 10 s doubling to 300 s, reset after 10 min healthy.
    backoff_initial_seconds: float = 10
    backoff_max_seconds: float = 300
    backoff_reset_seconds: float = 600
    # Envoy's max_ejection_percent: at most this share of instances out of the LB (at least
    # one, never the last healthy one); above panic_threshold_percent unhealthy, stop ejecting.
    max_ejection_percent: float = 50
    panic_threshold_percent: float = 50
    # How long one action may take (replace waits for the new instance to be healthy).
    action_timeout_seconds: float = 60
    # Seconds an instance stays in the LB marked down before DRAIN_INSTANCE stops it.
    drain_seconds: float = 5


class AppSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One app's spec: the value stored under the app's name in the ``autoserve-apps`` bucket."""

    health_check: HealthCheckConfig = msgspec.field(default_factory=HealthCheckConfig)
    instances: list[Instance] = []
    docker: DockerDiscovery | None = None
    recovery: RecoveryConfig = msgspec.field(default_factory=RecoveryConfig)
    scaling: ScalingConfig = msgspec.field(default_factory=ScalingConfig)
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    # Beyond the seed, for alerting: apps this one needs (while one of them fails, this
    # app's alerts are held back and grouped under it) and labels that routes match on.
    depends_on: list[str] = []
    labels: dict[str, str] = {}


class DetectorConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The seed's ``FailureDetector`` thresholds."""

    max_response_time_ms: float = 5000
    max_error_rate_percent: float = 5.0
    max_cpu_percent: float = 90.0
    max_memory_percent: float = 90.0
    consecutive_failure_limit: int = 3
    failure_rate_window_minutes: float = 10
    max_restart_count: int = 5
    # Beyond the seed: an error rate over fewer probes than this says little.
    min_probes_for_error_rate: int = 10


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    apps: dict[str, AppSpec] = {}
    detector: DetectorConfig = msgspec.field(default_factory=DetectorConfig)
    alerting: AlertingConfig = msgspec.field(default_factory=AlertingConfig)
