"""Targets from config and containers, sharding, and the changes a worker manager applies."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from autoserve_config import parse_config
from autoserve_prober.core.targets import Container, desired_targets, diff, shard_of

CONTAINER_ID = "0123456789ab" + "c" * 52


def apps(**overrides: dict) -> dict:
    raw = {
        "apps": {
            "web": {
                "health_check": {"port": 8000, "period_seconds": 5, "timeout_seconds": 1},
                "instances": [
                    {"id": "web-1", "host": "127.0.0.1", "port": 18081},
                    {"id": "web-2", "host": "localhost"},
                ],
                "docker": {"label": "autoserve.app=web"},
            },
            "db": {
                "health_check": {"protocol": "TCP", "port": 5432},
                "instances": [{"id": "db-1", "host": "127.0.0.1"}],
            },
            **overrides,
        }
    }
    return parse_config(raw).apps


def test_static_instances_default_their_port_to_the_checks() -> None:
    targets = desired_targets(apps())
    assert sorted(targets) == [("db", "db-1"), ("web", "web-1"), ("web", "web-2")]
    assert targets[("web", "web-1")].port == 18081
    assert targets[("web", "web-2")].port == 8000
    assert targets[("db", "db-1")].port == 5432
    assert targets[("web", "web-1")].source == "config"


def test_disabled_checks_have_no_targets() -> None:
    spec = apps(db={"health_check": {"enabled": False}, "instances": [{"id": "db-1", "host": "h"}]})
    assert ("db", "db-1") not in desired_targets(spec)


def test_containers_become_targets_of_their_app() -> None:
    host_net = Container(CONTAINER_ID, "web", ip=None, port_label=19000)
    bridged = Container("f" * 64, "web", ip="127.0.0.1", port_label=None)
    stranger = Container("e" * 64, "other", ip=None, port_label=None)
    targets = desired_targets(apps(), {c.container_id: c for c in (host_net, bridged, stranger)})
    docker_targets = {k: t for k, t in targets.items() if t.source == "docker"}
    assert set(docker_targets) == {("web", "0123456789ab"), ("web", "ffffffffffff")}
    assert docker_targets[("web", "0123456789ab")].host == "127.0.0.1"  # network_mode=host
    assert docker_targets[("web", "0123456789ab")].port == 19000  # from the autoserve.port label
    assert docker_targets[("web", "ffffffffffff")].port == 8000  # else the check's port
    assert docker_targets[("web", "0123456789ab")].container_id == CONTAINER_ID


def test_a_docker_port_in_the_config_wins_over_the_label() -> None:
    spec = apps(web={"docker": {"label": "a=b", "port": 7000}})
    targets = desired_targets(spec, {"x": Container(CONTAINER_ID, "web", None, 19000)})
    assert targets[("web", "0123456789ab")].port == 7000


def test_containers_of_apps_without_docker_discovery_are_ignored() -> None:
    assert (
        desired_targets(apps(), {"x": Container(CONTAINER_ID, "db", None, None)}).keys()
        == desired_targets(apps()).keys()
    )


def test_a_sequence_of_config_changes() -> None:
    """Each step: the config as it now is, and the changes the workers must make."""
    current: dict = {}
    steps = [
        (apps(), {"added": 3, "removed": 0, "changed": 0}),
        (apps(), {"added": 0, "removed": 0, "changed": 0}),
        (apps(db={"health_check": {"protocol": "TCP", "port": 5433}, "instances": [{"id": "db-1", "host": "127.0.0.1"}]}),
         {"added": 0, "removed": 0, "changed": 1}),
        (apps(db={"instances": []}), {"added": 0, "removed": 1, "changed": 0}),
        ({}, {"added": 0, "removed": 2, "changed": 0}),
    ]  # fmt: skip
    for spec, expected in steps:
        desired = desired_targets(spec)
        changes = diff(current, desired)
        assert {k: len(getattr(changes, k)) for k in expected} == expected
        assert bool(changes) == any(expected.values())
        current = desired


@given(st.integers(1, 8), st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=50, unique=True))
def test_shards_partition_the_targets(shards: int, ids: list[str]) -> None:
    keys = [("app", i) for i in ids]
    owners = [shard_of(k, shards) for k in keys]
    assert all(0 <= o < shards for o in owners)
    assert owners == [shard_of(k, shards) for k in keys]  # stable


def test_every_target_is_owned_by_exactly_one_shard() -> None:
    raw = {"apps": {"a": {"instances": [{"id": f"i{n}", "host": "127.0.0.1"} for n in range(300)]}}}
    spec = parse_config(raw).apps
    parts = [desired_targets(spec, shard=s, shards=3) for s in range(3)]
    assert sum(len(p) for p in parts) == 300
    assert set().union(*parts) == set(desired_targets(spec))
    assert all(len(p) > 60 for p in parts)
