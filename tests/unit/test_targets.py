"""Targets from config and containers, ownership among members, and the changes a worker
manager applies."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from autoserve_config import parse_config
from autoserve_prober.core.targets import (
    HANDOVER_GRACE_SECONDS,
    Container,
    Owners,
    desired_targets,
    diff,
    taken_over,
    takeover_since,
)

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


MEMBERS = frozenset({"a", "b", "c"})


@given(
    st.sets(st.sampled_from("abcdefgh"), min_size=1),
    st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=50, unique=True),
)
def test_members_partition_the_targets(members: set[str], ids: list[str]) -> None:
    keys = [("app", i) for i in ids]
    owned = {m: {k for k in keys if Owners(m).owns(k, frozenset(members), fenced=False)} for m in members}
    assert sorted(k for part in owned.values() for k in part) == sorted(keys)  # each exactly once
    again = {m: {k for k in keys if Owners(m).owns(k, frozenset(members), fenced=False)} for m in members}
    assert owned == again  # stable


def test_every_target_is_owned_by_exactly_one_member() -> None:
    raw = {"apps": {"a": {"instances": [{"id": f"i{n}", "host": "127.0.0.1"} for n in range(300)]}}}
    every = desired_targets(parse_config(raw).apps)
    parts = [{k for k in every if Owners(m).owns(k, MEMBERS, fenced=False)} for m in sorted(MEMBERS)]
    assert sum(len(p) for p in parts) == 300
    assert set().union(*parts) == set(every)
    assert all(len(p) > 60 for p in parts)


def test_a_joining_member_takes_about_its_share_and_nothing_else_moves() -> None:
    keys = [("a", f"i{n}") for n in range(300)]

    def owners(members: frozenset[str]) -> dict[tuple[str, str], str]:
        return {k: next(m for m in members if Owners(m).owns(k, members, fenced=False)) for k in keys}

    before, after = owners(MEMBERS), owners(MEMBERS | {"d"})
    moved = {k for k in keys if before[k] != after[k]}
    assert all(after[k] == "d" for k in moved)  # only to the newcomer
    assert 0.15 < len(moved) / len(keys) < 0.35  # about a quarter, not all


def test_a_fenced_member_owns_nothing_unless_it_was_alone() -> None:
    owner = Owners("a")
    key = ("app", "x")
    assert not owner.owns(key, MEMBERS, fenced=True)
    assert owner.owns(key, frozenset({"a"}), fenced=True)  # nobody can have taken it over
    assert owner.owns(key, frozenset(), fenced=True)
    assert not owner.owns(key, frozenset({"a"}), fenced=False, stopping=True)  # handed over


def test_the_owner_cache_follows_the_members() -> None:
    owner = Owners("a")
    keys = [("app", f"i{n}") for n in range(50)]
    assert all(owner.owns(k, frozenset(), fenced=False) for k in keys)  # alone: everything
    with_b = [k for k in keys if owner.owns(k, frozenset({"a", "b"}), fenced=False)]
    assert 0 < len(with_b) < len(keys)
    assert all(owner.owns(k, frozenset({"a"}), fenced=False) for k in keys)  # b gone: all back


def test_targets_gained_from_another_member_are_the_known_ones_not_yet_running() -> None:
    known = {("a", "1"), ("a", "2"), ("a", "3")}
    desired = {("a", "1"), ("a", "2"), ("a", "4")}
    assert taken_over(desired, running={("a", "1")}, known=known) == {("a", "2")}  # a-4 is new: phase
    assert taken_over(desired, running=set(), known=set()) == set()  # a first start


def test_targets_of_a_member_that_left_keep_their_slots_and_of_one_that_died_are_probed_at_once() -> None:
    ttl, now, wall = 2.0, 100.0, 5_000.0
    heard = {"left": now - 0.6, "died": now - 2.3}  # a heartbeat ago; a TTL and the marker ago
    assert takeover_since({"left"}, heard, now, wall, ttl) == wall - HANDOVER_GRACE_SECONDS
    assert takeover_since({"died"}, heard, now, wall, ttl) == 0.0
    assert takeover_since({"left", "died"}, heard, now, wall, ttl) == 0.0
    assert takeover_since({"unheard"}, heard, now, wall, ttl) == 0.0
    # Regained after our own lease lapsed: the others probe them until they see us back.
    assert takeover_since(set(), heard, now, wall, ttl) == wall - HANDOVER_GRACE_SECONDS
