"""Validation that lists every problem with its path, then builds the typed config.

Two passes. The structural pass walks the raw YAML/JSON against the model and reports
unknown keys, missing keys and wrong types everywhere (msgspec alone stops at the first).
The rule pass applies the seed's ``HealthCheckConfig.validate()`` rules and goes further:
names, hosts, ports, thresholds that cannot work together.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from autoserve_events import is_valid_name

from .alerting import ALERTING_RULES, dependency_problems
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

_S = TypeVar("_S", bound=msgspec.Struct)

HTTP_METHODS = ("GET", "POST", "PUT", "HEAD")
MAX_RETRIES = 10
MAX_WINDOW_CALLS = 100_000  # a count window is a ring of this many outcomes at most
MAX_WINDOW_SECONDS = 86_400  # a time window keeps one bucket per second at most
_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class ConfigError(ValueError):
    """A configuration with problems; ``problems`` lists each as ``path: message``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def parse_config(raw: Any) -> Config:
    """Validate a decoded YAML/JSON document; raise ``ConfigError`` listing every problem."""
    return _parse(Config, {} if raw is None else raw, "")


EMPTY_APPS_HINT = "write `apps: {}` to remove every app on purpose"


def parse_config_file(raw: Any, source: str = "<config>") -> Config:
    """Validate a whole config file as ``apply`` reads it: declarative, so the file must say
    which apps there are. An empty or comment-only file, a top level that is not a mapping,
    or one without an ``apps`` mapping is refused rather than read as "no apps" (a truncated
    or half-written file must not remove every app); ``apps: {}`` says it on purpose."""
    if raw is None:
        raise ConfigError([f"{source}: empty (no apps, no settings); {EMPTY_APPS_HINT}"])
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: the top level must be a mapping with an apps key, got {_describe(raw)}"])
    problems: list[str] = []
    if "apps" not in raw:
        problems.append(f"apps: required: apply replaces every app with the file's; {EMPTY_APPS_HINT}")
    elif raw["apps"] is None:
        problems.append(f"apps: must be a mapping, got nothing; {EMPTY_APPS_HINT}")
    if not problems:
        return parse_config(raw)
    try:  # every other problem too, in one go
        parse_config({**raw, "apps": {}})
    except ConfigError as exc:
        problems.extend(exc.problems)
    raise ConfigError(problems)


def parse_app_spec(app_name: str, raw: Any) -> AppSpec:
    """Validate one app's spec, as stored in the KV bucket."""
    path = f"apps.{app_name}"
    spec = _parse(AppSpec, raw, path)
    problems = [] if is_valid_name(app_name) else [_bad_name(path, app_name)]
    if problems:
        raise ConfigError(problems)
    return spec


def _parse(cls: type[_S], raw: Any, path: str) -> _S:
    problems: list[str] = []
    _check(cls, raw, path, problems)
    if problems:
        raise ConfigError(problems)
    return msgspec.convert(raw, cls)


# -- the walk: structure everywhere, then each sound part's own rules ------------------


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _check(tp: Any, value: Any, path: str, problems: list[str]) -> None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_struct(tp):
        _check_struct(tp, value, path, problems)
    elif origin in (typing.Union, types.UnionType) and any(_is_struct(a) for a in args):
        if value is not None or type(None) not in args:
            (struct,) = [a for a in args if _is_struct(a)]
            _check_struct(struct, value, path, problems)
    elif origin is dict and _is_struct(args[1]):
        if not isinstance(value, dict):
            problems.append(f"{path}: must be a mapping, got {_describe(value)}")
            return
        for key, item in value.items():
            if not is_valid_name(str(key)):
                problems.append(_bad_name(_join(path, key), key))
            _check(args[1], item, _join(path, key), problems)
    elif origin is list and _is_struct(args[0]):
        if not isinstance(value, list):
            problems.append(f"{path}: must be a list, got {_describe(value)}")
            return
        for index, item in enumerate(value):
            _check(args[0], item, f"{path}[{index}]", problems)
    elif origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            problems.append(f"{path}: must be one of {choices}, got {_describe(value)}")
    else:
        try:
            msgspec.convert(value, tp)
        except msgspec.ValidationError as exc:
            message = re.sub(r", got `[^`]*`", "", str(exc)).replace("`", "")
            problems.append(f"{path}: {message[:1].lower()}{message[1:]}, got {_describe(value, path)}")


def _check_struct(cls: type[msgspec.Struct], value: Any, path: str, problems: list[str]) -> None:
    if not isinstance(value, dict):
        problems.append(f"{path or 'config'}: must be a mapping, got {_describe(value)}")
        return
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    for key in value:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"{_join(path, key)}: unknown key{suggestion}")
    before = len(problems)
    for name, field in fields.items():
        if name in value:
            _check(field.type, value[name], _join(path, name), problems)
        elif field.required:
            problems.append(f"{_join(path, name)}: required")
    rules = _RULES.get(cls)
    if rules is not None and len(problems) == before:
        # Every known field is sound: its rules can run, so they are reported too.
        known = {key: item for key, item in value.items() if key in fields}
        problems += rules(msgspec.convert(known, cls), path)


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


# Where a value may be a credential (an Authorization header, a token in a body): a
# problem there names the type only, since problems are printed and logged.
_SECRET_PARTS = ("headers", "body")


def _describe(value: Any, path: str = "") -> str:
    if any(part in _SECRET_PARTS for part in re.split(r"[.\[]", path)):
        return f"{type(value).__name__} (value not shown: it may be a secret)"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _bad_name(path: str, name: object) -> str:
    return f"{path}: name {name!r} must be 1-128 characters of [A-Za-z0-9_-]"


# -- rules, one function per part of the model ---------------------------------------


def _health_check(hc: HealthCheckConfig, path: str) -> list[str]:
    """The seed's ``HealthCheckConfig.validate()`` rules, each with its path, and more."""
    problems: list[str] = []
    if not 1 <= hc.port <= 65535:
        problems.append(f"{path}.port: must be between 1 and 65535, got {hc.port}")
    if hc.timeout_seconds < 1:
        problems.append(f"{path}.timeout_seconds: must be at least 1 second, got {hc.timeout_seconds:g}")
    if hc.period_seconds < hc.timeout_seconds:
        problems.append(
            f"{path}.period_seconds: must be at least timeout_seconds ({hc.timeout_seconds:g}), got {hc.period_seconds:g}"
        )
    elif hc.period_seconds < hc.timeout_seconds * (hc.max_retries + 1):
        problems.append(
            f"{path}.period_seconds: a probe with max_retries={hc.max_retries} takes up to "
            f"{hc.timeout_seconds * (hc.max_retries + 1):g}s, longer than the period {hc.period_seconds:g}s"
        )
    if hc.initial_delay_seconds < 0:
        problems.append(f"{path}.initial_delay_seconds: must be at least 0, got {hc.initial_delay_seconds:g}")
    for name in ("failure_threshold", "success_threshold"):
        if getattr(hc, name) < 1:
            problems.append(f"{path}.{name}: must be at least 1, got {getattr(hc, name)}")
    if not 0 <= hc.max_retries <= MAX_RETRIES:
        problems.append(f"{path}.max_retries: must be between 0 and {MAX_RETRIES}, got {hc.max_retries}")
    if hc.protocol == "TCP":
        if hc.scheme == "https":
            problems.append(f"{path}.scheme: 'https' applies to HTTP checks only")
        return problems
    if not hc.path.startswith("/"):
        problems.append(f"{path}.path: HTTP path must start with '/', got {hc.path!r}")
    elif any(c in hc.path for c in " \r\n\t#"):
        problems.append(f"{path}.path: must not contain spaces, control characters or '#', got {hc.path!r}")
    if hc.method not in HTTP_METHODS:
        problems.append(f"{path}.method: must be one of {', '.join(HTTP_METHODS)}, got {hc.method!r}")
    if not hc.expected_status_codes:
        problems.append(f"{path}.expected_status_codes: must list at least one status code")
    for index, code in enumerate(hc.expected_status_codes):
        if not 100 <= code <= 599:
            problems.append(f"{path}.expected_status_codes[{index}]: must be between 100 and 599, got {code}")
    for name, value in (hc.headers or {}).items():
        if not _HEADER_NAME.match(name):
            problems.append(f"{path}.headers: {name!r} is not a valid header name")
        elif "\r" in value or "\n" in value:
            # The value may be a secret: name the header, never echo the value.
            problems.append(f"{path}.headers.{name}: value must not contain line breaks")
    return problems


def _instance(instance: Instance, path: str) -> list[str]:
    problems: list[str] = []
    if not is_valid_name(instance.id):
        problems.append(_bad_name(f"{path}.id", instance.id))
    if not is_valid_host(instance.host):
        problems.append(f"{path}.host: {instance.host!r} is not an IP address or a host name")
    if instance.port is not None and not 1 <= instance.port <= 65535:
        problems.append(f"{path}.port: must be between 1 and 65535, got {instance.port}")
    return problems


def _app(spec: AppSpec, path: str) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for index, instance in enumerate(spec.instances):
        if instance.id in seen:
            problems.append(f"{path}.instances[{index}].id: duplicate instance id {instance.id!r}")
        seen.add(instance.id)
    for name in spec.labels:
        if not _LABEL_NAME.match(name):
            problems.append(f"{path}.labels: {name!r} is not a label name ([A-Za-z_][A-Za-z0-9_]*)")
    return problems


def _docker(docker: DockerDiscovery, path: str) -> list[str]:
    problems: list[str] = []
    key, sep, _ = docker.label.partition("=")
    if not sep or not key:
        problems.append(f"{path}.label: must be 'key=value', got {docker.label!r}")
    if docker.port is not None and not 1 <= docker.port <= 65535:
        problems.append(f"{path}.port: must be between 1 and 65535, got {docker.port}")
    ports = docker.replica_ports
    if ports is not None and (len(ports) != 2 or not 1 <= ports[0] <= ports[1] <= 65535):
        problems.append(f"{path}.replica_ports: must be [low, high] with 1 <= low <= high <= 65535, got {ports}")
    return problems


def _scaling(scaling: ScalingConfig, path: str) -> list[str]:
    problems: list[str] = []
    if scaling.min_replicas < 0:
        problems.append(f"{path}.min_replicas: must be at least 0, got {scaling.min_replicas}")
    if scaling.max_replicas < max(1, scaling.min_replicas):
        problems.append(
            f"{path}.max_replicas: must be at least 1 and at least min_replicas "
            f"({scaling.min_replicas}), got {scaling.max_replicas}"
        )
    return problems


def _breaker(breaker: BreakerConfig, path: str) -> list[str]:
    problems = [
        f"{path}.{name}: must be at least 1, got {getattr(breaker, name)}"
        for name in ("failure_threshold", "success_threshold", "max_test_requests")
        if getattr(breaker, name) < 1
    ]
    if breaker.recovery_timeout <= 0:
        problems.append(f"{path}.recovery_timeout: must be positive, got {breaker.recovery_timeout:g}")
    limit = MAX_WINDOW_CALLS if breaker.sliding_window_type == "count" else MAX_WINDOW_SECONDS
    if not 1 <= breaker.sliding_window_size <= limit:
        unit = "calls" if breaker.sliding_window_type == "count" else "seconds"
        problems.append(
            f"{path}.sliding_window_size: must be between 1 and {limit} {unit}, got {breaker.sliding_window_size}"
        )
    if breaker.minimum_number_of_calls < 1:
        problems.append(f"{path}.minimum_number_of_calls: must be at least 1, got {breaker.minimum_number_of_calls}")
    elif breaker.sliding_window_type == "count" and 1 <= breaker.sliding_window_size < breaker.minimum_number_of_calls:
        problems.append(
            f"{path}.minimum_number_of_calls: a count window holds {breaker.sliding_window_size} calls, "
            f"so at most that, got {breaker.minimum_number_of_calls}"
        )
    for name in ("failure_rate_threshold", "slow_call_rate_threshold"):
        rate = getattr(breaker, name)
        if rate is not None and not 0 < rate <= 100:
            problems.append(f"{path}.{name}: must be a percentage in (0, 100], got {rate:g}")
    if breaker.slow_call_duration_threshold is not None and breaker.slow_call_duration_threshold <= 0:
        problems.append(
            f"{path}.slow_call_duration_threshold: must be positive (ms), got {breaker.slow_call_duration_threshold:g}"
        )
    return problems


def _detector(detector: DetectorConfig, path: str) -> list[str]:
    problems: list[str] = []
    for name in ("max_response_time_ms", "failure_rate_window_minutes"):
        if getattr(detector, name) <= 0:
            problems.append(f"{path}.{name}: must be positive, got {getattr(detector, name):g}")
    for name in ("max_error_rate_percent", "max_cpu_percent", "max_memory_percent"):
        if not 0 < getattr(detector, name) <= 100:
            problems.append(f"{path}.{name}: must be a percentage in (0, 100], got {getattr(detector, name):g}")
    for name in ("consecutive_failure_limit", "max_restart_count", "min_probes_for_error_rate"):
        if getattr(detector, name) < 1:
            problems.append(f"{path}.{name}: must be at least 1, got {getattr(detector, name)}")
    return problems


# The seed's RecoveryStrategy values the recovery service can run, by kind.
TRAFFIC_STRATEGIES = ("remove_from_lb", "drain_instance")
REMEDIATION_STRATEGIES = ("restart_container", "recreate_container", "replace_instance", "scale_out", "rolling_restart")
FAILURE_TYPES = (
    "health_check_failed", "health_check_timeout", "health_check_error", "high_response_time", "high_error_rate",
    "high_resource_usage", "container_stopped", "container_restart_loop", "container_oom_killed",
    "network_unreachable", "port_not_listening", "dns_resolution_failed", "application_startup_failed",
    "application_deadlock", "application_memory_leak",
)  # fmt: skip


def _recovery(recovery: RecoveryConfig, path: str) -> list[str]:
    problems: list[str] = []
    known = TRAFFIC_STRATEGIES + REMEDIATION_STRATEGIES
    for failure_type, strategies in recovery.strategies.items():
        where = f"{path}.strategies.{failure_type}"
        if failure_type not in FAILURE_TYPES:
            hint = difflib.get_close_matches(failure_type, FAILURE_TYPES, n=1)
            problems.append(
                f"{where}: unknown failure type {failure_type!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        for index, strategy in enumerate(strategies):
            if strategy not in known:
                problems.append(f"{where}[{index}]: unknown strategy {strategy!r}; one of {', '.join(known)}")
        if len(set(strategies)) != len(strategies):
            problems.append(f"{where}: lists a strategy twice: {strategies}")
    for name in ("max_restarts",):
        if getattr(recovery, name) < 1:
            problems.append(f"{path}.{name}: must be at least 1, got {getattr(recovery, name)}")
    for name in ("restart_window_seconds", "backoff_max_seconds", "action_timeout_seconds"):
        if getattr(recovery, name) <= 0:
            problems.append(f"{path}.{name}: must be positive, got {getattr(recovery, name):g}")
    for name in ("backoff_initial_seconds", "backoff_reset_seconds", "drain_seconds"):
        if getattr(recovery, name) < 0:
            problems.append(f"{path}.{name}: must be at least 0, got {getattr(recovery, name):g}")
    if recovery.backoff_max_seconds < recovery.backoff_initial_seconds:
        problems.append(
            f"{path}.backoff_max_seconds: must be at least backoff_initial_seconds "
            f"({recovery.backoff_initial_seconds:g}), got {recovery.backoff_max_seconds:g}"
        )
    for name in ("max_ejection_percent", "panic_threshold_percent"):
        if not 0 <= getattr(recovery, name) <= 100:
            problems.append(f"{path}.{name}: must be a percentage in [0, 100], got {getattr(recovery, name):g}")
    return problems


_RULES: dict[type, Callable[[Any, str], list[str]]] = {
    HealthCheckConfig: _health_check,
    Instance: _instance,
    AppSpec: _app,
    DockerDiscovery: _docker,
    ScalingConfig: _scaling,
    BreakerConfig: _breaker,
    DetectorConfig: _detector,
    RecoveryConfig: _recovery,
}

_RULES.update(ALERTING_RULES)


def _config(config: Config, path: str) -> list[str]:
    """Rules across apps: ``depends_on`` names known apps and has no cycle."""
    return dependency_problems({name: spec.depends_on for name, spec in config.apps.items()}, _join(path, "apps"))


_RULES[Config] = _config


def parse_switch(name: str, value: str) -> bool | None:
    """An on/off setting from the environment: ``true``/``1`` or ``false``/``0``; empty is
    None (the caller's default). Anything else names the setting and the value."""
    value = value.strip().lower()
    if not value:
        return None
    if value in ("true", "1", "false", "0"):
        return value in ("true", "1")
    raise ValueError(f"{name}: must be true or false, got {value!r}")


def env_number(name: str, default: float, minimum: float = 0.0) -> float:
    """A number from the environment variable ``name`` (``default`` when unset); a bad one
    names the variable and the value."""
    raw = os.environ.get(name, "")
    try:
        number = float(raw) if raw.strip() else default
    except ValueError:
        number = float("nan")
    if not number >= minimum:  # nan too
        raise ValueError(f"{name}: must be a number >= {minimum:g}, got {raw!r}")
    return number


def is_valid_host(host: str) -> bool:
    """An IP literal or an RFC 1123 host name: no scheme, port, path or user info."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if not host or len(host) > 253:
        return False
    return all(_HOSTNAME_LABEL.match(label) for label in host.rstrip(".").split("."))
