"""The ``recovery:`` section of an app: defaults, overrides, and errors that name the
path and the value. Also the nginx upstream file format (pure render and parse)."""

from __future__ import annotations

import pytest

from autoserve_config import ConfigError, RecoveryConfig, parse_config
from autoserve_recovery.adapters.nginx import parse_down, render, upstream_name
from autoserve_recovery.ports import Member


def problems(recovery: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"apps": {"web": {"recovery": recovery}}})
    return caught.value.problems


def test_every_bound_is_on_by_default() -> None:
    spec = parse_config({"apps": {"web": {}}}).apps["web"].recovery
    assert spec == RecoveryConfig()
    assert (spec.max_restarts, spec.restart_window_seconds) == (3, 300)
    assert (spec.backoff_initial_seconds, spec.backoff_max_seconds, spec.backoff_reset_seconds) == (10, 300, 600)
    assert (spec.max_ejection_percent, spec.panic_threshold_percent) == (50, 50)


def test_a_strategy_override_is_kept() -> None:
    spec = parse_config({"apps": {"web": {"recovery": {"strategies": {"container_stopped": ["recreate_container"]}}}}})
    assert spec.apps["web"].recovery.strategies == {"container_stopped": ["recreate_container"]}


@pytest.mark.parametrize(
    ("recovery", "expected"),
    [
        ({"strategies": {"health_check_faild": ["restart_container"]}},
         "apps.web.recovery.strategies.health_check_faild: unknown failure type 'health_check_faild' (did you mean 'health_check_failed'?)"),
        ({"strategies": {"container_stopped": ["reboot"]}},
         "apps.web.recovery.strategies.container_stopped[0]: unknown strategy 'reboot'; one of remove_from_lb, "
         "drain_instance, restart_container, recreate_container, replace_instance, scale_out, rolling_restart"),
        ({"max_restarts": 0}, "apps.web.recovery.max_restarts: must be at least 1, got 0"),
        ({"max_ejection_percent": 120}, "apps.web.recovery.max_ejection_percent: must be a percentage in [0, 100], got 120"),
        ({"backoff_initial_seconds": 30, "backoff_max_seconds": 20},
         "apps.web.recovery.backoff_max_seconds: must be at least backoff_initial_seconds (30), got 20"),
        ({"restart_window_seconds": 0}, "apps.web.recovery.restart_window_seconds: must be positive, got 0"),
        ({"max_restart": 3}, "apps.web.recovery.max_restart: unknown key (did you mean 'max_restarts'?)"),
        ({"strategies": {"container_stopped": ["restart_container", "restart_container"]}},
         "apps.web.recovery.strategies.container_stopped: lists a strategy twice: ['restart_container', 'restart_container']"),
    ],
)  # fmt: skip
def test_bad_values_name_the_path_and_the_value(recovery: dict, expected: str) -> None:
    assert expected in problems(recovery)


def test_the_upstream_file_marks_down_and_reads_back() -> None:
    members = [Member("web-2", "127.0.0.1", 18082), Member("web-1", "127.0.0.1", 18081)]
    text = render("my-web", members, {"web-2"})
    assert text == (
        "# managed by autoserve-recovery: app my-web\n"
        "upstream autoserve_my_web {\n"
        "    server 127.0.0.1:18081;  # web-1\n"
        "    server 127.0.0.1:18082 down;  # web-2\n"
        "}\n"
    )
    assert parse_down(text) == {"web-2"} and upstream_name("my-web") == "autoserve_my_web"
    assert "server 127.0.0.1:9 down;" in render("empty", [], set())  # nginx refuses an empty upstream


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        ([20000], "apps.web.docker.replica_ports: must be [low, high] with 1 <= low <= high <= 65535, got [20000]"),
        ([20010, 20000], "apps.web.docker.replica_ports: must be [low, high] with 1 <= low <= high <= 65535, got [20010, 20000]"),
        ([0, 10], "apps.web.docker.replica_ports: must be [low, high] with 1 <= low <= high <= 65535, got [0, 10]"),
    ],
)  # fmt: skip
def test_a_bad_replica_port_range_names_the_field(ports: list[int], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"apps": {"web": {"docker": {"label": "app=web", "replica_ports": ports}}}})
    assert expected in caught.value.problems


def test_copies_get_the_probers_port_rule_and_docker_times_keep_their_fraction() -> None:
    from autoserve_recovery.adapters.copy_ports import PortPolicy
    from autoserve_recovery.adapters.docker import docker_time

    assert PortPolicy(None, 8000).port_of({"autoserve.port": "18081"}) == 18081
    assert PortPolicy(None, 8000).port_of({}) == 8000
    assert PortPolicy(9000, 8000).port_of({"autoserve.port": "18081"}) == 9000  # docker.port wins, as in the prober
    assert docker_time("2024-05-01T12:00:00.123456789Z") == pytest.approx(1714564800.123456789, abs=1e-6)
    assert docker_time("2024-05-01T12:00:00Z") == 1714564800.0
    spec = parse_config({"apps": {"web": {"docker": {"label": "app=web", "replica_ports": [20000, 20009]}}}})
    assert spec.apps["web"].docker.replica_ports == [20000, 20009]


def test_a_copy_gets_the_lowest_free_port_of_its_range_or_says_why_none() -> None:
    from autoserve_recovery.adapters.copy_ports import PortPolicy, copy_port
    from autoserve_recovery.ports import RecoveryError
    from autoserve_runtime import free_port

    low = free_port()
    assert copy_port("web", PortPolicy(replica_range=(low, low)), set()) == low
    with pytest.raises(RecoveryError, match=rf"no free port left in docker\.replica_ports \[{low}, {low}\]"):
        copy_port("web", PortPolicy(replica_range=(low, low)), {low})  # a stopped container has it
    with pytest.raises(RecoveryError, match=r"docker\.port 9000 puts every container on one port"):
        copy_port("web", PortPolicy(fixed=9000), set())
    assert copy_port("web", PortPolicy(), {1}) > 1024  # no range: the kernel's pick
