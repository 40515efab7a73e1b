"""The ``alerting:`` section: a routing tree in the style of Alertmanager, receivers,
escalation tiers and maintenance windows; durations, and their rules.

Durations are the one syntax of ``durations.py`` (``30s``, ``1h30m``, bare seconds).
Maintenance schedules are cron expressions in an IANA time zone (``cron.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal, TypedDict

import msgspec

from autoserve_events import is_valid_name

from .cron import parse_cron, time_zone
from .durations import Duration, parse_duration

MATCH_KEYS_BUILTIN = ("app", "instance", "severity", "failure_type", "alertname")
SEVERITIES = ("low", "medium", "high", "critical")


# -- the model ---------------------------------------------------------------------------


class ReceiverConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One receiver. ``type`` says which fields apply:

    - ``webhook``: ``url``; ``hmac_secret_env`` or ``hmac_secret_file`` signs the body;
    - ``slack``: ``url`` (an incoming webhook), optional ``channel``;
    - ``email``: ``smarthost`` (host:port), ``from``, ``to``; optional ``starttls``,
      ``username`` with ``password_env`` or ``password_file``;
    - ``alertmanager``: ``url`` of a Prometheus Alertmanager (its v2 API); optional
      ``resend_interval`` (default 1m): firing alerts are sent again this often, valid for
      four times as long, as Prometheus does (its ``resend_delay``).

    Secrets are read from the named variable or file by the alerter, never stored here.
    """

    type: Literal["webhook", "slack", "email", "alertmanager"]
    url: str | None = None
    hmac_secret_env: str | None = None
    hmac_secret_file: str | None = None
    headers: dict[str, str] | None = None
    channel: str | None = None
    smarthost: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    to: list[str] = []
    starttls: bool = False
    username: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    send_resolved: bool = True
    timeout: Duration = "10s"
    # Retries with backoff (0.5 s doubling to 30 s) for this long, then it is logged failed.
    retry_for: Duration = "10m"
    resend_interval: Duration | None = None  # alertmanager only; None: 1m


class EscalationTier(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An alert neither acknowledged nor resolved ``escalate_after`` its start goes to these."""

    escalate_after: Duration
    receivers: list[str]


class RouteConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A node of the routing tree; unset options are inherited from the parent."""

    receiver: str | None = None
    # label -> value or list of values (any of them); labels: app, instance, severity,
    # failure_type (alias alertname) and each app's own ``labels``.
    match: dict[str, str | list[str]] = {}
    match_re: dict[str, str] = {}  # label -> regular expression matching the whole value
    continue_: bool = msgspec.field(default=False, name="continue")
    group_by: list[str] | None = None
    group_wait: Duration | None = None
    group_interval: Duration | None = None
    repeat_interval: Duration | None = None
    escalation: list[EscalationTier] | None = None
    routes: list[RouteConfig] = []


class MaintenanceWindow(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A silence that begins on a schedule: cron in ``timezone`` (an IANA name, default UTC),
    with cron's behaviour on DST changes (``cron.py``)."""

    name: str
    schedule: str  # "0 2 * * SUN" is Sundays 02:00; "@daily" is midnight
    timezone: str = "UTC"  # wall clock of the schedule: "Europe/Berlin"
    duration: Duration
    apps: list[str] = []  # empty: every app
    reason: str = ""


class AlertingConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = True
    route: RouteConfig = msgspec.field(default_factory=RouteConfig)
    receivers: dict[str, ReceiverConfig] = {}
    maintenance_windows: list[MaintenanceWindow] = []
    # An alert no failure has re-reported for this long resolves (Alertmanager's default).
    resolve_timeout: Duration = "5m"
    # How far back a restarted alerter replays events to rebuild alerts and timers.
    history: Duration = "24h"
    timezone: Literal["UTC"] = "UTC"


class RouteDefaults(TypedDict):
    group_by: list[str]
    group_wait: str
    group_interval: str
    repeat_interval: str


ROOT_DEFAULTS: RouteDefaults = {
    "group_by": ["app"],
    "group_wait": "30s",
    "group_interval": "5m",
    "repeat_interval": "4h",
}
MAX_WINDOW_SECONDS = 7 * 86400.0


# -- rules ---------------------------------------------------------------------------------


def _duration_problem(path: str, value: Duration | None, minimum: float = 0.0) -> list[str]:
    if value is None:
        return []
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        return [f"{path}: {exc}"]
    return [] if seconds >= minimum else [f"{path}: must be at least {minimum:g}s, got {value!r}"]


def _receiver(receiver: ReceiverConfig, path: str) -> list[str]:
    problems = _duration_problem(f"{path}.timeout", receiver.timeout, 0.001)
    problems += _duration_problem(f"{path}.retry_for", receiver.retry_for)
    problems += _duration_problem(f"{path}.resend_interval", receiver.resend_interval, 0.1)
    if receiver.resend_interval is not None and receiver.type != "alertmanager":
        problems.append(f"{path}.resend_interval: only an alertmanager receiver re-sends its alerts")
    needs = {
        "webhook": ("url",),
        "slack": ("url",),
        "alertmanager": ("url",),
        "email": ("smarthost", "from_", "to"),
    }[receiver.type]
    for name in needs:
        if not getattr(receiver, name):
            problems.append(f"{path}.{name.rstrip('_')}: required for a {receiver.type} receiver")
    if receiver.url is not None and not re.match(r"^https?://[^\s/]+", receiver.url):
        problems.append(f"{path}.url: must be an http:// or https:// URL, got {receiver.url!r}")
    if receiver.smarthost is not None:
        host, sep, port = receiver.smarthost.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            problems.append(f"{path}.smarthost: must be host:port, got {receiver.smarthost!r}")
    for field in ("hmac_secret", "password"):
        env, file = getattr(receiver, f"{field}_env"), getattr(receiver, f"{field}_file")
        if env and file:
            problems.append(f"{path}.{field}_env: give {field}_env or {field}_file, not both")
        if env is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", env):
            problems.append(f"{path}.{field}_env: must be an environment variable name, got {env!r}")
    if (receiver.hmac_secret_env or receiver.hmac_secret_file) and receiver.type != "webhook":
        problems.append(f"{path}.hmac_secret_env: only a webhook receiver signs its body")
    for name, value in (receiver.headers or {}).items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            problems.append(f"{path}.headers.{name}: must not contain line breaks")  # value never echoed
    return problems


def _route(route: RouteConfig, path: str) -> list[str]:
    problems: list[str] = []
    for name in ("group_wait", "group_interval", "repeat_interval"):
        problems += _duration_problem(f"{path}.{name}", getattr(route, name))
    if route.group_interval is not None and not problems and parse_duration(route.group_interval) <= 0:
        problems.append(f"{path}.group_interval: must be more than 0s, got {route.group_interval!r}")
    for key, pattern in route.match_re.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(f"{path}.match_re.{key}: not a regular expression: {exc}")
    for key, value in route.match.items():
        if key == "severity":
            for item in [value] if isinstance(value, str) else value:
                if item not in SEVERITIES:
                    problems.append(f"{path}.match.severity: must be one of {', '.join(SEVERITIES)}, got {item!r}")
    previous = -1.0
    for index, tier in enumerate(route.escalation or []):
        where = f"{path}.escalation[{index}]"
        found = _duration_problem(f"{where}.escalate_after", tier.escalate_after, 0.001)
        problems += found
        if not tier.receivers:
            problems.append(f"{where}.receivers: must list at least one receiver")
        if not found:
            after = parse_duration(tier.escalate_after)
            if after <= previous:
                problems.append(
                    f"{where}.escalate_after: must be later than the tier before, got {tier.escalate_after!r}"
                )
            previous = after
    return problems


def _window(window: MaintenanceWindow, path: str) -> list[str]:
    problems: list[str] = []
    if not is_valid_name(window.name):
        problems.append(f"{path}.name: name {window.name!r} must be 1-128 characters of [A-Za-z0-9_-]")
    zone = window.timezone
    try:
        time_zone(zone)
    except ValueError as exc:
        problems.append(f"{path}.timezone: {exc}")
        zone = "UTC"  # the schedule is still checked
    try:
        parse_cron(window.schedule, zone)
    except ValueError as exc:
        problems.append(f"{path}.schedule: {exc}")
    found = _duration_problem(f"{path}.duration", window.duration, 60)
    if not found and parse_duration(window.duration) > MAX_WINDOW_SECONDS:
        found = [f"{path}.duration: must be at most 7d, got {window.duration!r}"]
    problems += found
    for index, app in enumerate(window.apps):
        if not is_valid_name(app):
            problems.append(f"{path}.apps[{index}]: name {app!r} must be 1-128 characters of [A-Za-z0-9_-]")
    return problems


def _alerting(alerting: AlertingConfig, path: str) -> list[str]:
    problems = _duration_problem(f"{path}.resolve_timeout", alerting.resolve_timeout, 1)
    problems += _duration_problem(f"{path}.history", alerting.history, 60)
    known = set(alerting.receivers)
    listing = ", ".join(sorted(known)) or "none defined"

    def walk(route: RouteConfig, where: str, root: bool) -> None:
        if route.receiver is not None and route.receiver not in known:
            problems.append(f"{where}.receiver: unknown receiver {route.receiver!r} (receivers: {listing})")
        if root and route.receiver is None and known:
            problems.append(f"{where}.receiver: required at the root route (receivers: {listing})")
        for index, tier in enumerate(route.escalation or []):
            for r_index, name in enumerate(tier.receivers):
                if name not in known:
                    problems.append(
                        f"{where}.escalation[{index}].receivers[{r_index}]: unknown receiver {name!r} (receivers: {listing})"
                    )
        for index, child in enumerate(route.routes):
            walk(child, f"{where}.routes[{index}]", False)

    walk(alerting.route, f"{path}.route", True)
    names = [w.name for w in alerting.maintenance_windows]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{path}.maintenance_windows: duplicate name {name!r}")
    return problems


ALERTING_RULES: dict[type, Callable[[Any, str], list[str]]] = {
    ReceiverConfig: _receiver,
    RouteConfig: _route,
    MaintenanceWindow: _window,
    AlertingConfig: _alerting,
}


def dependency_problems(depends_on: dict[str, list[str]], path: str = "apps") -> list[str]:
    """``depends_on`` names known apps, not itself, and has no cycle."""
    problems: list[str] = []
    for app, deps in depends_on.items():
        for index, dep in enumerate(deps):
            if dep == app:
                problems.append(f"{path}.{app}.depends_on[{index}]: an app cannot depend on itself")
            elif dep not in depends_on:
                problems.append(f"{path}.{app}.depends_on[{index}]: unknown app {dep!r}")
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(app: str, trail: list[str]) -> None:
        state[app] = 1
        for dep in depends_on.get(app, []):
            if dep not in depends_on or dep == app:
                continue
            if state.get(dep) == 1:
                cycle = [*trail[trail.index(dep) :], dep] if dep in trail else [app, dep]
                problems.append(f"{path}.{trail[0]}.depends_on: dependency cycle {' -> '.join(cycle)}")
            elif state.get(dep) is None:
                visit(dep, [*trail, dep])
        state[app] = 2

    for app in depends_on:
        if state.get(app) is None:
            visit(app, [app])
    return problems
