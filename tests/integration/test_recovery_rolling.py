# ruff: noqa: F811  (pytest fixtures imported from the other recovery tests are used as parameters)
"""Drain and rolling restart through the whole system (prober, detector, recovery, a real
nginx, real Docker), checked with real requests through nginx and Docker's own events."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from nats.aio.client import Client

from autoserve_events import RecoveryExecuted, RecoveryStrategy
from autoserve_prober.service import ProberService
from autoserve_recovery.ports import Member
from autoserve_runtime import free_port

from ..support.recovery import check_failed, publish_copies, work_settled
from .conftest import LOCALHOST, Outputs, apply_yaml, wait_for
from .test_recovery_copies import copies_config, health_of, run_port_box
from .test_recovery_docker import (  # noqa: F401
    DockerEvents,
    app,
    docker,
    docker_events,
    executed,
    recoveries,
    serving,
    system,
)
from .test_recovery_health import rollings
from .test_recovery_nginx import Nginx, health_fails, nginx  # noqa: F401

S = RecoveryStrategy


@dataclass
class Traffic:
    """GET /who through nginx every 20 ms in a thread, until stopped (at most 180 s)."""

    nginx: Nginx
    answers: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        deadline = time.monotonic() + 180
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.answers.append((time.time(), self.nginx.get("/who")))
            self._stop.wait(0.02)

    def errors(self) -> list[tuple[float, str]]:
        return [a for a in self.answers if a[1].startswith("error")]

    def stop(self) -> None:
        self._stop.set()


async def port_boxes(image: str, app: str, count: int) -> list[tuple[str, int]]:
    """httpd as PID 1 ignores SIGTERM: a 1 s stop timeout, then Docker kills it."""
    started = []
    for index in range(count):
        port = free_port()
        box = await asyncio.to_thread(run_port_box, image, app, port, f"box{index}", "--stop-timeout", "1")
        started.append((box, port))
    return started


async def behind_nginx(
    nginx: Nginx, app: str, boxes: list[tuple[str, int]], nc: Client, recoveries, rules: dict[str, list[str]],
    healthy: Outputs | None = None, **recovery: object,
) -> None:  # fmt: skip
    """The boxes as the app's members in nginx, its recovery ``rules`` applied and recovery
    running (with its nginx); with ``healthy``, once the prober has called each healthy."""
    nginx.start(app, [Member(c[:12], LOCALHOST, p) for c, p in boxes])
    await apply_yaml(nc, copies_config(app, rules, **recovery))
    await recoveries(nginx=nginx.settings())
    if healthy is not None:
        await wait_for(lambda: all(health_of(healthy, c) for c, _ in boxes), timeout=30, what="all healthy")


async def test_drain_takes_the_instance_out_of_nginx_before_stopping_it_and_it_comes_back(
    app: str, nc: Client, system: ProberService, recoveries, outputs: Outputs, busybox_image: str, nginx: Nginx,
    docker_events: DockerEvents,
) -> None:  # fmt: skip
    (_, p0), (c1, p1) = boxes = await port_boxes(busybox_image, app, 2)
    rules = {"health_check_failed": ["drain_instance", "restart_container"]}
    # drain_seconds: room to look while it drains.
    await behind_nginx(nginx, app, boxes, nc, recoveries, rules, outputs, drain_seconds=6)
    assert nginx.spread() == {f"box0-{p0}", f"box1-{p1}"}

    await asyncio.to_thread(health_fails, c1)
    await wait_for(lambda: nginx.down(app) == {c1[:12]}, timeout=30, what="box1 marked down")
    # Draining: box1 still runs and answers, but nginx no longer sends it requests.
    assert serving(p1, "/who")
    await wait_for(lambda: nginx.spread() == {f"box0-{p0}"}, timeout=5, what="nginx routing around box1")
    assert serving(p1, "/who") and docker_events.count("stop", c1) == 0

    await wait_for(lambda: executed(outputs, S.RESTART_CONTAINER), timeout=30, what="drained, then restarted")
    (drain,) = executed(outputs, S.DRAIN_INSTANCE)
    (restart,) = executed(outputs, S.RESTART_CONTAINER)
    assert drain.success and drain.details["down"] == [c1[:12]] and drain.details["container_id"] == c1
    assert drain.duration_ms >= 6000  # drain_seconds passed before the stop
    assert restart.success and restart.timestamp >= drain.timestamp + drain.duration_ms / 1000
    assert docker_events.count("stop", c1) == 1
    # Healthy again (its start wrote /health back): restored, and routed to.
    await wait_for(lambda: nginx.down(app) == set(), timeout=30, what="box1 restored")
    await wait_for(lambda: nginx.spread() == {f"box0-{p0}", f"box1-{p1}"}, timeout=10, what="routing to both")
    await wait_for(lambda: work_settled(nc), 30, "every input handled")
    # The stop's own death was not a new incident: one restart, by the drain's plan.
    assert docker_events.count("restart", c1) == 1 and len(executed(outputs, S.RESTART_CONTAINER)) == 1


async def test_rolling_restart_restarts_one_replica_at_a_time_and_nginx_keeps_serving(
    app: str, nc: Client, system: ProberService, recoveries, outputs: Outputs, busybox_image: str, nginx: Nginx,
    docker_events: DockerEvents,
) -> None:  # fmt: skip
    boxes = await port_boxes(busybox_image, app, 3)
    await behind_nginx(nginx, app, boxes, nc, recoveries, {"health_check_failed": ["rolling_restart"]}, outputs)
    traffic = Traffic(nginx)
    pump = asyncio.create_task(asyncio.to_thread(traffic.run))
    try:
        failing = boxes[1][0]
        await asyncio.to_thread(health_fails, failing)
        main = lambda: [e for e in executed(outputs, S.ROLLING_RESTART) if "member_of" not in e.details]  # noqa: E731
        await wait_for(main, timeout=60, what="a rolling restart")
        await wait_for(lambda: work_settled(nc), 30, "every input handled")
    finally:
        traffic.stop()
        await pump
    (rolling,) = main()
    assert rolling.success, rolling.error
    order = rolling.details["restarted"]
    assert order[0] == failing[:12] and sorted(order) == sorted(c[:12] for c, _ in boxes)
    members = [e for e in executed(outputs, S.ROLLING_RESTART) if "member_of" in e.details]
    assert sorted(e.instance_id for e in members) == sorted(order[1:])
    assert all(e.details["member_of"] == failing[:12] for e in members)
    # One at a time, by Docker's clock: each is started again before the next is killed.
    ids = {c[:12]: c for c, _ in boxes}
    timeline: list[tuple[str, str]] = []
    for event in docker_events.lines:
        step = (event["Action"], event["id"])
        if step[0] in ("kill", "start") and (not timeline or timeline[-1] != step):  # restart -t 0: TERM, KILL
            timeline.append(step)
    restarts = timeline[len(boxes) :]  # after the initial starts
    assert restarts == [(action, ids[i]) for i in order for action in ("kill", "start")], restarts
    # Exactly one restart each: the deaths of the rolling restart were not new incidents.
    assert [docker_events.count("restart", c) for c, _ in boxes] == [1, 1, 1]
    # nginx served every request while the replicas restarted one by one.
    during = [a for a in traffic.answers if rolling.timestamp <= a[0]]
    assert len(during) >= 10 and traffic.errors() == []
    assert {answer for _, answer in traffic.answers} == {f"box{i}-{p}" for i, (_, p) in enumerate(boxes)}


def run_sick_box(image: str, app: str, port: int, name: str) -> str:
    """Like ``run_port_box``, but a box with /www/sick starts without /www/health: a
    restart does not make it healthy until the file is gone."""
    script = (f"if [ -e /www/sick ]; then rm -f /www/health; else echo ok > /www/health; fi; "
              f"echo {name}-$PORT > /www/who; exec /bin/busybox httpd -f -p 127.0.0.1:$PORT -h /www")  # fmt: skip
    return docker("run", "-d", "--network", "host", "--label", f"autoserve.app={app}", "--label",
                  f"autoserve.port={port}", "-e", f"PORT={port}", "--stop-timeout", "1", image,
                  "/bin/busybox", "sh", "-c", script)  # fmt: skip


async def sick_boxes(image: str, app: str, count: int) -> list[tuple[str, int]]:
    started = []
    for index in range(count):
        port = free_port()
        started.append((await asyncio.to_thread(run_sick_box, image, app, port, f"box{index}"), port))
    return started


def in_box(container: str, script: str) -> None:
    docker("exec", container, "/bin/busybox", "sh", "-c", script)


def left_out(outputs: Outputs, container: str) -> list[RecoveryExecuted]:
    return [e for e in executed(outputs, S.REMOVE_FROM_LB, container[:12]) if e.details.get("left_out_by")]


def restores(outputs: Outputs, container: str) -> list[RecoveryExecuted]:
    return [e for e in executed(outputs, S.REMOVE_FROM_LB, container[:12]) if e.details.get("operation") == "restore"]


async def test_a_member_that_does_not_come_back_stays_out_of_nginx_until_healthy_then_is_routed_to_again(
    app: str, nc: Client, system: ProberService, recoveries, outputs: Outputs, busybox_image: str, nginx: Nginx,
    docker_events: DockerEvents,
) -> None:  # fmt: skip
    (c0, p0), (c1, p1) = boxes = await sick_boxes(busybox_image, app, 2)
    # A long backoff: the failure's repeats wait, and the test looks at one rolling restart.
    timing = {"action_timeout_seconds": 6, "backoff_initial_seconds": 300, "backoff_max_seconds": 300}
    await behind_nginx(
        nginx, app, boxes, nc, recoveries, {"health_check_failed": ["rolling_restart"]}, outputs, **timing
    )

    await asyncio.to_thread(in_box, c1, "touch /www/sick; rm /www/health")  # a restart will not help
    await wait_for(lambda: rollings(outputs), timeout=60, what="a rolling restart")
    (rolling,) = rollings(outputs)
    assert not rolling.success and rolling.instance_id == c1[:12]
    assert f"{c1[:12]} does not answer its health check within action_timeout_seconds (6s)" in rolling.error
    assert "Unexpected status code: 404" in rolling.error and "restarted: none" in rolling.error
    # Left out of nginx, and recorded as an ejection: the normal restore will undo it.
    (out,) = left_out(outputs, c1)
    assert out.success and out.failure_event_id == rolling.failure_event_id and "404" in out.details["reason"]
    assert nginx.down(app) == {c1[:12]}
    await wait_for(lambda: nginx.spread() == {f"box0-{p0}"}, timeout=5, what="nginx routing around box1")
    assert docker_events.count("restart", c1) == 1 and docker_events.count("restart", c0) == 0  # stopped there

    await asyncio.to_thread(in_box, c1, "rm /www/sick; echo ok > /www/health")
    await wait_for(lambda: nginx.down(app) == set(), timeout=30, what="box1 back in nginx once healthy")
    await wait_for(lambda: nginx.spread() == {f"box0-{p0}", f"box1-{p1}"}, timeout=10, what="routing to both")
    await wait_for(lambda: restores(outputs, c1), timeout=10, what="the restore recorded")  # after the reload
    (restore,) = restores(outputs, c1)
    back = [e.event_id for e in health_of(outputs, c1) if e.healthy]
    assert restore.success and restore.failure_event_id == back[-1]  # the normal restore, on HealthChanged
    assert [e.strategy for e in executed(outputs, instance=c0[:12])] == []  # box0 was never touched


async def test_a_failed_member_the_detector_still_calls_healthy_goes_back_into_nginx_once_it_answers(
    app: str, nc: Client, recoveries, outputs: Outputs, busybox_image: str, nginx: Nginx, docker_events: DockerEvents
) -> None:
    """No prober or detector here: no ``HealthChanged`` will ever say the member is back
    (as when it fails for less than the detector's threshold), so only the rolling
    restart's own watcher can put it back."""
    (c0, p0), (c1, p1) = boxes = await sick_boxes(busybox_image, app, 2)
    rules = {"health_check_failed": ["rolling_restart"]}
    await behind_nginx(nginx, app, boxes, nc, recoveries, rules, action_timeout_seconds=8)
    await asyncio.to_thread(in_box, c1, "touch /www/sick")  # healthy now; after a restart it is not
    failure = check_failed(app, c0[:12])
    await publish_copies(nc, failure)

    await wait_for(lambda: rollings(outputs), timeout=60, what="a rolling restart")
    (rolling,) = rollings(outputs)
    assert not rolling.success and f"{c1[:12]} does not answer its health check" in rolling.error
    assert f"restarted: {c0[:12]}" in rolling.error
    members = [e for e in executed(outputs, S.ROLLING_RESTART) if "member_of" in e.details]
    (member,) = members  # the failed member is recorded too: its death was ours
    assert (member.instance_id, member.success, member.details["member_of"]) == (c1[:12], False, c0[:12])
    (out,) = left_out(outputs, c1)
    assert out.failure_event_id == failure.event_id and nginx.down(app) == {c1[:12]}
    await wait_for(lambda: nginx.spread() == {f"box0-{p0}"}, timeout=5, what="nginx routing around box1")

    await asyncio.to_thread(in_box, c1, "rm /www/sick; echo ok > /www/health")
    await wait_for(lambda: nginx.down(app) == set(), timeout=30, what="box1 back in nginx once it answers")
    await wait_for(lambda: nginx.spread() == {f"box0-{p0}", f"box1-{p1}"}, timeout=10, what="routing to both")
    await wait_for(lambda: restores(outputs, c1), timeout=10, what="the restore recorded")  # after the reload
    (restore,) = restores(outputs, c1)
    assert restore.success and restore.failure_event_id == failure.event_id
    assert restore.details["after"] == "rolling_restart"
    assert [docker_events.count("restart", c) for c in (c0, c1)] == [1, 1]
