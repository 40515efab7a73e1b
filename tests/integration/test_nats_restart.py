# ruff: noqa: F811  (pytest fixtures imported from other test modules are used as parameters)
"""A nats-server SIGKILLed and started again on the same store: feeds read on, recovery acts.

Before ``autoserve_runtime.feed``, a feed started from a time was re-created by nats-py with a
start sequence *and* the start time, which the server refuses for ever (err 10094): recovery
kept reporting ready and never acted again."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg

from autoserve_events import EVENTS_STREAM, HealthChanged, RecoveryStrategy, encode, subject
from autoserve_runtime import EmbeddedNatsServer, Feed, observability, provision

from ..support.processes import serving
from .conftest import Outputs, WatchLocally, check, wait_for
from .test_recovery_docker import executed, recoveries  # noqa: F401


def restart(server: EmbeddedNatsServer) -> None:
    """SIGKILL (no clean shutdown), then the same binary on the same port and store."""
    server.kill()
    server.start()


async def publish_health(nc: Client, n: int, start: int) -> None:
    js = nc.jetstream()
    for i in range(start, start + n):
        event = HealthChanged(instance_id="i1", app_name="app", healthy=True, previous=False, consecutive=i,
                              reason="test", timestamp=time.time())  # fmt: skip
        await js.publish(subject(HealthChanged, "app", "i1"), encode(event))


async def test_a_feed_started_from_a_time_reads_on_after_a_server_restart_and_says_so_while_it_cannot(
    nats_server: EmbeddedNatsServer, nc: Client
) -> None:
    await provision(nc.jetstream())
    await publish_health(nc, 5, 0)  # before the start time: not for the feed
    since = time.time()
    await wait_for(lambda: time.time() > since + 0.01, what="the clock to move")
    await publish_health(nc, 3, 5)
    seen: list[int] = []

    async def on_message(msg: Msg) -> None:
        seen.append(msg.metadata.sequence.stream)

    feed = await Feed(nc.jetstream(), "test", EVENTS_STREAM, ["autoserve.event.>"], on_message).start(since=since)
    try:
        assert await feed.caught_up(timeout=10)
        assert seen == [6, 7, 8]
        nats_server.kill()
        await wait_for(lambda: feed.problem is not None, what="the feed to say it cannot read")
        assert observability.readiness()["feed test"] is False
        assert "feed test" in observability.reasons(observability.readiness())
        nats_server.start()
        await wait_for(lambda: nc.is_connected, timeout=20, what="reconnected")
        await publish_health(nc, 3, 8)
        await wait_for(lambda: len(seen) == 6, timeout=20, what="the events stored after the restart")
        assert seen == [6, 7, 8, 9, 10, 11]  # in order, each once
        await wait_for(lambda: feed.problem is None, what="the feed to say it reads again")
        assert observability.readiness()["feed test"] is True
        assert feed.breaks >= 1
    finally:
        await feed.stop()


async def test_recovery_acts_after_each_of_three_server_restarts(
    nats_server: EmbeddedNatsServer, nc: Client, watch_locally: WatchLocally, recoveries, outputs: Outputs,
    http_process: tuple[Path, int],
) -> None:  # fmt: skip
    directory, port = http_process
    await watch_locally("web-1", port, health_check=check(path="/", failure_threshold=2))
    recovery = await recoveries(docker=False, process_dir=directory)
    await wait_for(lambda: serving(port), what="serving")
    for round_ in range(1, 4):
        restart(nats_server)
        await wait_for(lambda: nc.is_connected, timeout=20, what="reconnected")
        pid = json.loads((directory / "demo" / "web-1.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        await wait_for(
            lambda n=round_: len(executed(outputs, RecoveryStrategy.RESTART_CONTAINER)) >= n,
            timeout=60,
            what=f"a restart after server restart {round_}",
        )
        assert executed(outputs, RecoveryStrategy.RESTART_CONTAINER)[-1].success
        await wait_for(lambda: serving(port), timeout=20, what="serving again")
    assert recovery.state_seq > 0
