"""A bad value written straight into KV does not cost an app its monitoring: a service
started afterwards uses the newest valid revision in the key's history, and says so (an
error log naming the app, the bad revision and the problems, never the value; metrics).
With no valid revision left, the app is not monitored, loudly."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from nats.aio.client import Client
from nats.js.kv import KeyValue

from autoserve_config import AppSpec, DetectorConfig
from autoserve_events import APPS_BUCKET, SETTINGS_BUCKET
from autoserve_runtime import EmbeddedNatsServer, follow_apps, follow_detector_settings, free_port, observability

from ..conftest import plant_secret
from .conftest import LOCALHOST, HttpTarget, Received, apply_yaml, check, config_for, wait_for
from .test_observability import samples, start_service, stop_and_wait, wait_status

PROBLEM = "apps.web.health_check.port: must be between 1 and 65535, got 0"


def good_web(port: int) -> dict:
    return {"web": {"health_check": check(path="/ok", port=port), "instances": [{"id": "w-1", "host": LOCALHOST}]}}


def bad_web(token: str = "not-a-secret") -> bytes:
    """A spec that does not validate (port 0) and carries a header token the logs must not show."""
    return msgspec.json.encode({"health_check": {"path": "/fail", "port": 0, "headers": {"Authorization": token}}})


def gauge(bucket: str, outcome: str) -> float:
    page = samples(observability.metrics_text().decode())
    return page.get(("autoserve_config_invalid_keys", frozenset({"bucket": bucket, "outcome": outcome}.items())), 0.0)


def rejected(key: str, bucket: str = APPS_BUCKET) -> float:
    page = samples(observability.metrics_text().decode())
    return page.get(("autoserve_config_rejected_total", frozenset({"bucket": bucket, "key": key}.items())), 0.0)


async def apps_kv(nc: Client) -> KeyValue:
    return await nc.jetstream().key_value(APPS_BUCKET)


class Following:
    """One ``follow_apps`` or ``follow_detector_settings`` watcher in this loop: a service's
    view of the config, started when the test says."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self.task: asyncio.Task[None] | None = None

    def on_apps(self, apps: dict[str, AppSpec], _: float | None) -> None:
        self.seen.append(apps)

    async def start(self, follow: Callable[..., Any], kv: KeyValue, calls: int = 1) -> Any:
        self.seen = []
        self.task = asyncio.create_task(follow(kv, self.on_apps if follow is follow_apps else self.seen.append))
        await wait_for(lambda: len(self.seen) >= calls or self.task.done(), what="the first load")
        if self.task.done():
            self.task.result()
        return self.seen[-1]

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@pytest.fixture
async def following() -> AsyncIterator[Following]:
    watcher = Following()
    yield watcher
    await watcher.stop()


def errors(captured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in captured if entry["log_level"] == "error"]


# -- a service started after the bad write ----------------------------------------------------


async def test_a_prober_started_after_a_bad_write_probes_with_the_last_good_spec(
    tmp_path: Path, nats_server: EmbeddedNatsServer, nc: Client, http_target: HttpTarget, probes: Received
) -> None:
    """The real ``autoserve run prober`` process, started once the latest value is bad."""
    token = plant_secret("Bearer tok-SECRET-fallback-7f3a", "header token", allowed_in=[tmp_path / "nats"])
    await apply_yaml(nc, config_for(good_web(http_target.port)))
    bad_revision = await (await apps_kv(nc)).put("web", bad_web(token))

    port, log = free_port(), tmp_path / "prober.log"
    process = start_service("prober", nats_server.url, port, log, "--no-docker")
    try:
        await wait_status(port, "/readyz", 200, timeout=60)  # still ready: it works, and says why not all is well
        await wait_for(lambda: any(p.is_healthy for p in probes.of("web", "w-1")), timeout=30, what="web probed")
        page = samples(await wait_status(port, "/metrics", 200))
        invalid = {
            dict(labels)["outcome"]: v for (name, labels), v in page.items() if name == "autoserve_config_invalid_keys"
        }
        assert invalid == {"last_good": 1, "none": 0}
        assert page[("autoserve_config_rejected_total", frozenset({"bucket": APPS_BUCKET, "key": "web"}.items()))] == 1
    finally:
        code = await asyncio.to_thread(stop_and_wait, process)
    assert code == 0, log.read_text()[-3000:]
    assert all(r.path == "/ok" and "Authorization" not in r.headers for r in http_target.requests)
    text = log.read_text()
    assert token not in text
    [refused] = [e for e in map(json.loads, text.splitlines()) if e.get("event", "").startswith("invalid config")]
    assert (refused["level"], refused["app"], refused["revision"], refused["problems"]) == (
        "error", "web", bad_revision, [PROBLEM],
    )  # fmt: skip
    assert refused["using_revision"] < bad_revision


async def test_a_new_watcher_takes_the_newest_valid_revision_not_an_older_one(nc: Client, following: Following) -> None:
    await apply_yaml(nc, config_for(good_web(8081)))
    await apply_yaml(nc, config_for(good_web(8082)))  # the newest good one
    kv = await apps_kv(nc)
    await kv.put("web", bad_web())
    await kv.put("web", b"{not json")
    with structlog.testing.capture_logs() as captured:
        apps = await following.start(follow_apps, kv)
    assert apps["web"].health_check.port == 8082
    assert [e["problems"] for e in errors(captured)] == [
        ["apps.web: not valid JSON: JSON is malformed: object keys must be strings (byte 1)"]
    ]
    assert gauge(APPS_BUCKET, "last_good") == 1


# -- no valid revision: loud ----------------------------------------------------------------------


async def test_an_app_with_no_valid_revision_is_not_monitored_and_says_so(nc: Client, following: Following) -> None:
    await apply_yaml(nc, config_for(good_web(8081)))
    kv = await apps_kv(nc)
    bad_revision = await kv.put("ghost", bad_web().replace(b"web", b"ghost"))
    before = rejected("ghost")
    with structlog.testing.capture_logs() as captured:
        apps = await following.start(follow_apps, kv)
    assert set(apps) == {"web"}
    [loud] = errors(captured)
    assert loud["event"] == "invalid config value refused and no valid earlier revision: the app is NOT monitored"
    assert (loud["app"], loud["revision"]) == ("ghost", bad_revision)
    assert (gauge(APPS_BUCKET, "none"), gauge(APPS_BUCKET, "last_good")) == (1, 0)
    assert rejected("ghost") == before + 1
    await following.stop()
    assert gauge(APPS_BUCKET, "none") == 0  # a stopped watcher's keys leave the gauge


async def test_a_bad_write_after_a_delete_does_not_bring_back_the_deleted_spec(
    nc: Client, following: Following
) -> None:
    await apply_yaml(nc, config_for(good_web(8081)))
    kv = await apps_kv(nc)
    await kv.delete("web")  # removed on purpose (what `apply` does for an app left out)
    await kv.put("web", bad_web())
    apps = await following.start(follow_apps, kv)
    assert apps == {}
    assert gauge(APPS_BUCKET, "none") == 1


async def test_once_the_history_holds_no_valid_revision_the_app_is_not_monitored(
    nc: Client, following: Following
) -> None:
    """The bucket keeps 5 revisions a key: a good one and 4 bad ones still fall back; a 5th
    bad one pushes the good one out."""
    await apply_yaml(nc, config_for(good_web(8081)))
    kv = await apps_kv(nc)
    for _ in range(4):
        await kv.put("web", bad_web())
    assert (await following.start(follow_apps, kv))["web"].health_check.port == 8081
    await following.stop()
    await kv.put("web", bad_web())
    assert await following.start(follow_apps, kv) == {}  # a service started now
    assert gauge(APPS_BUCKET, "none") == 1


# -- live ----------------------------------------------------------------------------------------


async def test_a_live_bad_write_keeps_the_spec_and_is_counted_until_a_good_one(
    nc: Client, following: Following
) -> None:
    await apply_yaml(nc, config_for(good_web(8081)))
    kv = await apps_kv(nc)
    await following.start(follow_apps, kv)
    with structlog.testing.capture_logs() as captured:
        bad_revision = await kv.put("web", bad_web())
        await wait_for(lambda: gauge(APPS_BUCKET, "last_good") == 1, what="the bad write counted")
    assert len(following.seen) == 1  # no change announced: the services keep what they have
    [refused] = errors(captured)
    assert (refused["app"], refused["revision"], refused["problems"]) == ("web", bad_revision, [PROBLEM])
    await apply_yaml(nc, config_for(good_web(8083)))
    await wait_for(lambda: len(following.seen) == 2, what="the good write applied")
    assert following.seen[-1]["web"].health_check.port == 8083
    assert gauge(APPS_BUCKET, "last_good") == 0


# -- the detector's settings ------------------------------------------------------------------------


async def test_detector_settings_fall_back_to_the_newest_valid_revision(nc: Client, following: Following) -> None:
    await apply_yaml(nc, "apps: {}\ndetector: {max_response_time_ms: 1234}\n")
    settings = await nc.jetstream().key_value(SETTINGS_BUCKET)
    bad_revision = await settings.put("detector", b'{"max_response_time_ms": "slow"}')
    with structlog.testing.capture_logs() as captured:
        # defaults first (as always), then the fallback
        current: DetectorConfig = await following.start(follow_detector_settings, settings, calls=2)
    assert current.max_response_time_ms == 1234
    [refused] = errors(captured)
    assert (refused["key"], refused["revision"]) == ("detector", bad_revision)
    assert refused["problems"] == ["detector.max_response_time_ms: expected float, got str 'slow'"]
    assert gauge(SETTINGS_BUCKET, "last_good") == 1
