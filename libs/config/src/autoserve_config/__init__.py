"""AutoServe Health configuration: the model, validation with paths, and loading."""

from .alerting import (
    AlertingConfig,
    EscalationTier,
    MaintenanceWindow,
    ReceiverConfig,
    RouteConfig,
    parse_cron,
)
from .durations import Duration, format_duration, parse_duration
from .load import decode_app_spec, encode_app_spec, encode_detector, load_config, load_config_text, load_yaml
from .model import (
    AppSpec,
    BreakerConfig,
    Config,
    DetectorConfig,
    DockerDiscovery,
    HealthCheckConfig,
    Instance,
    RecoveryConfig,
    ScalingConfig,
)
from .validate import (
    ConfigError,
    env_number,
    is_valid_host,
    parse_app_spec,
    parse_config,
    parse_config_file,
    parse_switch,
)

__all__ = [
    "AlertingConfig",
    "AppSpec",
    "BreakerConfig",
    "Config",
    "ConfigError",
    "DetectorConfig",
    "DockerDiscovery",
    "Duration",
    "EscalationTier",
    "HealthCheckConfig",
    "Instance",
    "MaintenanceWindow",
    "ReceiverConfig",
    "RecoveryConfig",
    "RouteConfig",
    "ScalingConfig",
    "decode_app_spec",
    "encode_app_spec",
    "encode_detector",
    "env_number",
    "format_duration",
    "is_valid_host",
    "load_config",
    "load_config_text",
    "load_yaml",
    "parse_app_spec",
    "parse_config",
    "parse_config_file",
    "parse_cron",
    "parse_duration",
    "parse_switch",
]
