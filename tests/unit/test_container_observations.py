"""Docker engine payloads (as the engine sends them) turned into ContainerObserved."""

from __future__ import annotations

import pytest

from autoserve_prober.core.containers import observation_from_event, stats_observation, usage_from_stats

CID = "3f4e5d6c7b8a" + "9" * 52


def engine_event(action: str, **attributes: str) -> dict:
    return {"Type": "container", "Action": action, "Actor": {"ID": CID, "Attributes": {"autoserve.app": "web", **attributes}},
            "timeNano": 1767225600123456789}  # fmt: skip


def test_die_carries_the_exit_code_and_engine_time() -> None:
    observed = observation_from_event("web", engine_event("die", exitCode="137"), restart_count=2)
    assert (observed.event, observed.exit_code, observed.restart_count) == ("die", 137, 2)
    assert (observed.instance_id, observed.container_id, observed.app_name) == ("3f4e5d6c7b8a", CID, "web")
    assert observed.timestamp == pytest.approx(1767225600.123456789)


def test_the_same_engine_event_gets_the_same_id_everywhere() -> None:
    a = observation_from_event("web", engine_event("oom"))
    b = observation_from_event("web", engine_event("oom"))
    assert a.event_id == b.event_id
    assert a.event_id != observation_from_event("web", engine_event("die")).event_id


@pytest.mark.parametrize("action", ["exec_start: sh", "attach", "resize", "create"])
def test_other_actions_are_not_observed(action: str) -> None:
    assert observation_from_event("web", engine_event(action)) is None


def test_health_status_is_observed_verbatim() -> None:
    assert observation_from_event("web", engine_event("health_status: unhealthy")).event == "health_status: unhealthy"


STATS = {
    "cpu_stats": {"cpu_usage": {"total_usage": 2_000_000_000}, "system_cpu_usage": 20_000_000_000, "online_cpus": 2},
    "precpu_stats": {"cpu_usage": {"total_usage": 1_000_000_000}, "system_cpu_usage": 10_000_000_000},
    "memory_stats": {"usage": 60 * 2**20, "limit": 100 * 2**20, "stats": {"inactive_file": 10 * 2**20}},
}


def test_usage_is_computed_as_docker_stats_does() -> None:
    cpu, memory, used = usage_from_stats(STATS)
    assert cpu == 20.0  # 1e9 of 1e10 system ns, on 2 CPUs
    assert memory == 50.0  # page cache left out
    assert used == 50 * 2**20


def test_missing_numbers_give_none_not_a_crash() -> None:
    assert usage_from_stats({}) == (None, None, None)
    assert usage_from_stats({"memory_stats": {"usage": 5}})[1] is None
    observed = stats_observation("web", CID, {}, 100.0)
    assert (observed.event, observed.cpu_percent, observed.memory_percent) == ("stats", None, None)
