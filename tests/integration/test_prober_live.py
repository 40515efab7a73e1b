"""Targets follow the config in KV live, and the prober survives a nats-server crash."""

from __future__ import annotations

import asyncio
import time

from nats.aio.client import Client

from autoserve_events import APPS_BUCKET, PROBES_STREAM
from autoserve_runtime import EmbeddedNatsServer

from .conftest import LOCALHOST, HttpTarget, Received, apply_yaml, check, config_for, wait_for


def web_app(port: int, *ids: str, **hc: object) -> dict:
    return {
        "health_check": check(path="/ok", **hc),
        "instances": [{"id": i, "host": LOCALHOST, "port": port} for i in ids],
    }


async def test_config_changes_add_change_and_remove_workers_live(
    prober, nc: Client, probes: Received, http_target: HttpTarget
) -> None:
    port = http_target.port
    await apply_yaml(nc, config_for({"web": web_app(port, "w-1")}))
    await wait_for(lambda: probes.count("web", "w-1") >= 1, what="w-1 probed")
    assert set(prober.workers.targets) == {("web", "w-1")}

    # Added: a new instance and a new app, without a restart.
    await apply_yaml(nc, config_for({"web": web_app(port, "w-1", "w-2"), "api": web_app(port, "a-1")}))
    await wait_for(
        lambda: probes.count("web", "w-2") >= 1 and probes.count("api", "a-1") >= 1, what="new targets probed"
    )

    # Changed: a new path takes effect within a period.
    await apply_yaml(
        nc,
        config_for(
            {"web": web_app(port, "w-1", "w-2"), "api": {**web_app(port, "a-1"), "health_check": check(path="/fail")}}
        ),
    )
    await wait_for(lambda: any(p.status_code == 500 for p in probes.of("api", "a-1")), what="changed path used")

    # Removed: the app and an instance disappear; their workers stop.
    await apply_yaml(nc, config_for({"web": web_app(port, "w-1")}))
    removed_at = time.time()
    await wait_for(lambda: set(prober.workers.targets) == {("web", "w-1")}, what="workers removed")
    seen_w1 = probes.count("web", "w-1")
    await wait_for(lambda: probes.count("web", "w-1") >= seen_w1 + 2, what="w-1 still probed")
    late = [
        p
        for p in probes.of("api", "a-1") + probes.of("web", "w-2")
        if p.scheduled_at and p.scheduled_at > removed_at + 0.5
    ]
    assert late == [], "a removed target was still probed"


async def test_a_bad_value_in_kv_is_ignored_and_the_last_good_spec_kept(
    prober, nc: Client, probes: Received, http_target: HttpTarget
) -> None:
    await apply_yaml(nc, config_for({"web": web_app(http_target.port, "w-1")}))
    await wait_for(lambda: probes.count("web", "w-1") >= 1)
    kv = await nc.jetstream().key_value(APPS_BUCKET)
    await kv.put("web", b'{"health_check": {"port": 0}}')
    await kv.put("bad.name", b"{}")
    seen = probes.count("web", "w-1")
    await wait_for(lambda: probes.count("web", "w-1") >= seen + 2, what="probing to go on")
    assert set(prober.workers.targets) == {("web", "w-1")}


async def test_prober_survives_a_nats_server_crash(
    prober, nats_server: EmbeddedNatsServer, nc: Client, probes: Received, http_target: HttpTarget
) -> None:
    await apply_yaml(nc, config_for({"web": web_app(http_target.port, "w-1", "w-2")}))
    js = nc.jetstream()
    await wait_for(lambda: probes.count("web", "w-1") >= 2, what="probes before the crash")
    stored_before = (await js.stream_info(PROBES_STREAM)).state.messages
    assert stored_before >= 2

    nats_server.kill()  # SIGKILL: no clean shutdown
    probes_during = prober.workers.stats.probes
    await wait_for(lambda: prober.workers.stats.probes >= probes_during + 2, what="probing to go on while NATS is down")
    assert prober.publisher.pending > 0  # results are buffered, not lost

    nats_server.start()
    restarted_at = time.time()
    await wait_for(lambda: nc.is_connected, timeout=30, what="the test client to reconnect")
    await wait_for(
        lambda: any(p.emitted_at > restarted_at for p in probes.of("web", "w-1")),
        timeout=30,
        what="publishing to resume",
    )
    await asyncio.wait_for(prober.publisher.drained(), 30)
    stored_after = (await js.stream_info(PROBES_STREAM)).state.messages
    # Every result acknowledged before the crash is still stored, and the buffered ones arrived.
    assert stored_after >= stored_before + 2
    assert prober.publisher.stats.acked == prober.publisher.stats.submitted  # every result stored
