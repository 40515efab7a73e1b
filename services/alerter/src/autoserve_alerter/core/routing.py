"""The routing tree, as Alertmanager's: an alert enters at the root and walks down.

At each node the children are tried in order; a matching child takes the alert (and its
own children are tried in turn), and unless it says ``continue`` the search stops there.
A node no child took handles the alert itself. Unset options are inherited.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from autoserve_config import AlertingConfig, RouteConfig, parse_duration
from autoserve_config.alerting import ROOT_DEFAULTS


@dataclass(frozen=True)
class Tier:
    after: float
    receivers: tuple[str, ...]


@dataclass(frozen=True)
class Route:
    id: str  # the path in the tree: "0", "0.1", "0.1.0"
    receiver: str | None
    match: tuple[tuple[str, frozenset[str]], ...]
    match_re: tuple[tuple[str, re.Pattern[str]], ...]
    continue_: bool
    group_by: tuple[str, ...]
    group_wait: float
    group_interval: float
    repeat_interval: float
    escalation: tuple[Tier, ...]
    routes: tuple[Route, ...] = field(default=())

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k, "") in values for k, values in self.match) and all(
            p.fullmatch(labels.get(k, "")) for k, p in self.match_re
        )

    def route(self, labels: Mapping[str, str]) -> list[Route]:
        """The nodes that handle an alert with these labels (the root, if no child does)."""
        found: list[Route] = []
        for child in self.routes:
            if child.matches(labels):
                found += child.route(labels)
                if not child.continue_:
                    break
        return found or [self]

    def walk(self) -> list[Route]:
        return [self, *(r for child in self.routes for r in child.walk())]


def _alias(key: str) -> str:
    return "failure_type" if key == "alertname" else key


def compile_routes(config: AlertingConfig) -> Route:
    root = config.route
    defaults = Route(
        id="0",
        receiver=None,
        match=(),
        match_re=(),
        continue_=False,
        group_by=tuple(ROOT_DEFAULTS["group_by"]),
        group_wait=parse_duration(ROOT_DEFAULTS["group_wait"]),
        group_interval=parse_duration(ROOT_DEFAULTS["group_interval"]),
        repeat_interval=parse_duration(ROOT_DEFAULTS["repeat_interval"]),
        escalation=(),
    )
    return _node(root, defaults, "0", is_root=True)


def _node(cfg: RouteConfig, parent: Route, node_id: str, is_root: bool = False) -> Route:
    def duration(value: float | str | None, inherited: float) -> float:
        return inherited if value is None else parse_duration(value)

    match = tuple((_alias(k), frozenset([v] if isinstance(v, str) else v)) for k, v in sorted(cfg.match.items()))
    node = Route(
        id=node_id,
        receiver=cfg.receiver if cfg.receiver is not None else parent.receiver,
        match=() if is_root else match,  # the root matches everything, as Alertmanager's
        match_re=() if is_root else tuple((_alias(k), re.compile(p)) for k, p in sorted(cfg.match_re.items())),
        continue_=cfg.continue_,
        group_by=tuple(_alias(g) for g in cfg.group_by) if cfg.group_by is not None else parent.group_by,
        group_wait=duration(cfg.group_wait, parent.group_wait),
        group_interval=duration(cfg.group_interval, parent.group_interval),
        repeat_interval=duration(cfg.repeat_interval, parent.repeat_interval),
        escalation=tuple(Tier(parse_duration(t.escalate_after), tuple(t.receivers)) for t in cfg.escalation)
        if cfg.escalation is not None
        else parent.escalation,
    )
    children = tuple(_node(child, node, f"{node_id}.{i}") for i, child in enumerate(cfg.routes))
    return replace(node, routes=children)


def group_labels(route: Route, labels: Mapping[str, str]) -> dict[str, str]:
    """The labels that name an alert's group on this route (``group_by: ['...']`` = all)."""
    if "..." in route.group_by:
        return dict(sorted(labels.items()))
    return {k: labels.get(k, "") for k in route.group_by}


def group_key(route: Route, labels: Mapping[str, str]) -> str:
    """Readable and stable: the route, then the grouping labels."""
    values = ",".join(f"{k}={v}" for k, v in group_labels(route, labels).items())
    return f"{route.id}:{{{values}}}"
