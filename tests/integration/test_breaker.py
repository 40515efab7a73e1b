"""The breaker service against a real nats-server (and the real prober for a real target):
opening on failures, the timer, the half-open cap, restart and replay, two members,
manual overrides and poison messages. Every wait has a deadline; nothing sleeps blind."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from nats.aio.client import Client

from autoserve_breaker.service import BreakerService, breaker_key
from autoserve_cli.breaker import override
from autoserve_cli.status import LatestProbes
from autoserve_events import (
    BREAKER_ALLOW_RPC,
    PROBES_STREAM,
    BreakerStateChanged,
    BreakerTrialAdmitted,
    decode_allow_reply,
    encode_message,
)
from autoserve_events.breaker import OverrideRequest
from autoserve_events.subjects import BREAKER_OVERRIDE_RPC
from autoserve_runtime import EmbeddedNatsServer, free_port
from autoserve_runtime.breaker_client import BreakerClient, BreakerUnavailable

from ..support.web import serving_app
from .conftest import LOCALHOST, Outputs, ServiceRunner, apply_yaml, check, config_for, wait_for

AUTOSERVE = str(Path(sys.executable).parent / "autoserve")


@pytest.fixture
async def start_breaker(nats_server: EmbeddedNatsServer) -> AsyncIterator[Callable[..., object]]:
    """Starts breaker members in the test's loop; stops every one at the end."""
    runners: list[ServiceRunner] = []

    async def start(member: str = "solo") -> tuple[ServiceRunner, BreakerService]:
        runner = ServiceRunner(lambda: BreakerService(nats_server.url, member=member))
        runners.append(runner)
        service = await runner.start()
        return runner, service

    yield start
    for runner in runners:
        await runner.stop()


def transitions(outputs: Outputs, app: str, instance: str) -> list[BreakerStateChanged]:
    return [e for e in outputs.events(BreakerStateChanged) if (e.app_name, e.instance_id) == (app, instance)]


def last_state(outputs: Outputs, app: str, instance: str) -> str | None:
    changes = transitions(outputs, app, instance)
    return changes[-1].state if changes else None


async def report_many(client: BreakerClient, app: str, instance: str, success: bool, count: int) -> None:
    for _ in range(count):
        await client.report(app, instance, success=success, duration_ms=1.0)


BREAKER_APPS = {
    "api": {
        "breaker": {"failure_threshold": 3, "success_threshold": 2, "recovery_timeout": 30, "max_test_requests": 2},
        "instances": [{"id": "api-1", "host": LOCALHOST, "port": 9}],
        "health_check": check(enabled=False),
    },
    "quick": {
        "breaker": {"failure_threshold": 2, "success_threshold": 3, "recovery_timeout": 1, "max_test_requests": 3}
    },
    "strict": {"breaker": {"allow_unknown_instances": False}},
}


# -- a real target, through the real prober ------------------------------------------


@pytest.fixture
async def switchable_target() -> AsyncIterator[dict]:
    """An HTTP target whose /health fails until the test says otherwise."""
    state = {"healthy": False, "port": free_port()}

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok") if state["healthy"] else web.Response(status=503, text="down")

    app = web.Application()
    app.router.add_get("/health", health)
    async with serving_app(app, state["port"]):
        yield state


async def test_a_failing_target_opens_then_half_opens_admits_exactly_the_trials_and_closes(
    nc: Client, outputs: Outputs, switchable_target: dict, prober, start_breaker
) -> None:
    apps = {
        "shop": {
            "health_check": check(port=switchable_target["port"]),
            "instances": [{"id": "shop-1", "host": LOCALHOST}],
            "breaker": {"failure_threshold": 2, "success_threshold": 3, "recovery_timeout": 2, "max_test_requests": 3},
        }
    }
    await apply_yaml(nc, config_for(apps))
    await start_breaker()
    client = BreakerClient(nc)

    await wait_for(lambda: last_state(outputs, "shop", "shop-1") == "open", 20, "the failing target's breaker to open")
    reply = await client.check("shop", "shop-1")
    assert (reply.allow, reply.state) == (False, "open")
    opened = transitions(outputs, "shop", "shop-1")[-1]
    assert opened.trigger == "failure_threshold" and opened.cause_event_id is not None  # a probe tripped it
    switchable_target["healthy"] = True

    # No request arrives: the timer alone half-opens it after recovery_timeout.
    await wait_for(lambda: last_state(outputs, "shop", "shop-1") == "half_open", 10, "half-open on the timer")
    half_open = transitions(outputs, "shop", "shop-1")[-1]
    assert half_open.timestamp - opened.timestamp == pytest.approx(2.0, abs=0.3)

    answers = await asyncio.gather(*(client.check("shop", "shop-1") for _ in range(20)))
    assert [a.allow for a in answers].count(True) == 3, "exactly max_test_requests trials, from 20 concurrent callers"
    assert {a.state for a in answers} == {"half_open"}
    await report_many(client, "shop", "shop-1", True, 3)

    await wait_for(lambda: last_state(outputs, "shop", "shop-1") == "closed", 10, "closed after the trials succeed")
    closed = transitions(outputs, "shop", "shop-1")[-1]
    assert closed.trigger == "success_threshold" and closed.consecutive_successes >= 3
    assert await client.allow("shop", "shop-1")
    trials = [e for e in outputs.events(BreakerTrialAdmitted) if e.generation == half_open.generation]
    assert sorted(e.trial for e in trials) == [1, 2, 3]

    view = LatestProbes()  # `autoserve status` shows the breaker next to the probe
    await view.follow(nc.jetstream())
    await wait_for(lambda: view.breaker(("shop", "shop-1")) == "closed" and ("shop", "shop-1") in view.breakers, 10)


# -- restart and replay -------------------------------------------------------------------


async def test_a_restarted_breaker_answers_exactly_as_before(nc: Client, outputs: Outputs, start_breaker) -> None:
    await apply_yaml(nc, config_for(BREAKER_APPS))
    runner, service = await start_breaker()
    client = BreakerClient(nc)

    await report_many(client, "api", "api-1", False, 3)  # open, 30 s to wait
    await wait_for(lambda: last_state(outputs, "api", "api-1") == "open", 10, "api-1 open")
    await report_many(client, "quick", "q-1", False, 2)  # opens, half-opens after 1 s
    await wait_for(lambda: last_state(outputs, "quick", "q-1") == "half_open", 10, "q-1 half-open")
    assert (await client.check("quick", "q-1")).allow  # trial 1 of 3
    await override(nats_url(nc), "open", "api", "api-2")  # held open by an operator
    await report_many(client, "api", "api-3", False, 2)  # 2 of 3 failures: still closed
    await wait_for(lambda: len(outputs.events(BreakerTrialAdmitted)) == 1, 10, "trial recorded")
    before = {k: (b.state, b.retry_at, b.forced, b.generation) for k, b in service.core.breakers.items()}
    assert service.publisher is not None
    await service.publisher.drained()

    await runner.stop()
    _, restarted = await start_breaker()

    after = {k: (b.state, b.retry_at, b.forced, b.generation) for k, b in restarted.core.breakers.items()}
    assert {k: v for k, v in after.items() if k in before and before[k][3] > 0} == {
        k: v for k, v in before.items() if v[3] > 0
    }, "same states, same open deadline, same holds"
    reply = await client.check("api", "api-1")
    assert (reply.allow, reply.state) == (False, "open")
    assert restarted.core.get("api", "api-1").retry_at == before[("api", "api-1")][1]  # the remaining wait
    assert not (await client.check("api", "api-2")).allow
    answers = [(await client.check("quick", "q-1")).allow for _ in range(5)]
    assert answers == [True, True, False, False, False], "trial 1 was before the restart: 2 left of 3"


def nats_url(nc: Client) -> str:
    server = nc.connected_url
    assert server is not None
    return f"nats://{server.hostname}:{server.port}"


# -- scale-out ----------------------------------------------------------------------------


async def test_two_members_answer_alike_and_share_one_trial_budget(nc: Client, outputs: Outputs, start_breaker) -> None:
    await apply_yaml(nc, config_for(BREAKER_APPS))
    _, first = await start_breaker("a")
    _, second = await start_breaker("b")
    await wait_for(lambda: first.membership.members == second.membership.members == {"a", "b"}, 15, "two members")
    await wait_for(lambda: first.reowned + second.reowned >= 1, 15, "the first member to hand over a share")
    client = BreakerClient(nc)
    instances = [f"q-{i}" for i in range(6)]
    owners = {first.membership.owner(breaker_key("quick", i)) for i in instances}
    assert owners == {"a", "b"}, "both members own some breakers"

    for instance in instances:
        await report_many(client, "quick", instance, False, 2)

    def agree(state: str) -> bool:
        for instance in instances:
            a, b = first.core.get("quick", instance), second.core.get("quick", instance)
            if a is None or b is None or not (a.state == b.state == state) or a.generation != b.generation:
                return False
        return True

    await wait_for(lambda: agree("half_open"), 15, "both members to see every breaker open, then half-open")
    assert all(last_state(outputs, "quick", i) == "half_open" for i in instances)
    answers = {i: await asyncio.gather(*(client.check("quick", i) for _ in range(40))) for i in instances}
    for instance, replies in answers.items():
        assert [r.allow for r in replies].count(True) == 3, f"{instance}: one budget of 3 across both members"
    for instance in instances:
        await report_many(client, "quick", instance, True, 3)
    await wait_for(lambda: agree("closed"), 15, "both members to see every breaker closed")
    replies = await asyncio.gather(*(client.check("quick", i) for i in instances for _ in range(10)))
    assert {(r.allow, r.state) for r in replies} == {(True, "closed")}
    assert first.handlers.stats.allows > 0 and second.handlers.stats.allows > 0, "both members answered"


# -- overrides, unknown instances, poison -------------------------------------------------


async def test_manual_override_from_the_command_line(nc: Client, outputs: Outputs, start_breaker) -> None:
    await apply_yaml(nc, config_for(BREAKER_APPS))
    await start_breaker()
    client = BreakerClient(nc)
    url = nats_url(nc)
    env = {**os.environ, "AUTOSERVE_LOG_LEVEL": "error"}
    # The breaker runs in this loop: the command line must not block it.
    process = await asyncio.create_subprocess_exec(
        AUTOSERVE, "breaker", "open", "api", "api-1", "--nats-url", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    assert "api/api-1: open (held" in out.decode()
    assert not await client.allow("api", "api-1")
    await wait_for(lambda: last_state(outputs, "api", "api-1") == "open", 10, "override event")
    change = transitions(outputs, "api", "api-1")[-1]
    assert (change.trigger, change.forced) == ("manual", True) and "autoserve breaker" in change.reason

    assert await override(url, "close", "api", "api-1") == 0
    await report_many(client, "api", "api-1", False, 10)  # held closed: failures do not trip it
    assert await client.allow("api", "api-1")
    assert await override(url, "reset", "api", "api-1") == 0
    await report_many(client, "api", "api-1", False, 3)
    await wait_for(lambda: last_state(outputs, "api", "api-1") == "open", 10, "automatic again after reset")
    assert [c.trigger for c in transitions(outputs, "api", "api-1")] == [
        "manual",
        "manual",
        "manual",
        "failure_threshold",
    ]
    assert await override(url, "open", "api", "bad.name") == 2


async def test_unknown_instances_are_allowed_unless_configured_otherwise(nc: Client, start_breaker) -> None:
    await apply_yaml(nc, config_for(BREAKER_APPS))
    await start_breaker()
    client = BreakerClient(nc)
    reply = await client.check("quick", "never-seen")
    assert (reply.allow, reply.state, reply.known) == (True, "closed", False)
    assert (await client.check("no-such-app", "x")).allow
    reply = await client.check("strict", "never-seen")
    assert (reply.allow, reply.known) == (False, False)
    assert (await client.check("api", "api-1")).known  # configured instances are known


async def test_poison_is_answered_or_dead_lettered_and_the_service_keeps_going(
    nc: Client, outputs: Outputs, start_breaker
) -> None:
    await apply_yaml(nc, config_for(BREAKER_APPS))
    _, service = await start_breaker()
    client = BreakerClient(nc)

    for payload in (b"{", b'{"app_name": "api"}', b'{"app_name": "a b", "instance_id": "x"}', b"x" * 10_000):
        reply = decode_allow_reply((await nc.request(BREAKER_ALLOW_RPC, payload, timeout=5)).data)
        assert (reply.allow, reply.state) == (False, "error") and reply.error
    reply = decode_allow_reply((await nc.request(BREAKER_ALLOW_RPC, b'{"app_name": 1, "instance_id": "x"}')).data)
    assert reply.error == "allow request.app_name: expected str, got 1"
    await nc.publish(BREAKER_ALLOW_RPC, b'{"app_name": "api", "instance_id": "x"}')  # no reply subject
    bad = b'{"app_name": "api", "instance_id": "api-1", "action": "explode"}'
    reply = (await nc.request(BREAKER_OVERRIDE_RPC, bad, timeout=5)).data
    assert b"must be one of" in reply

    poison_reports = [
        ("autoserve.breaker.report.api.api-1", b"not json"),
        ("autoserve.breaker.report.api.api-1", b'{"success": "yes"}'),
        ("autoserve.breaker.report.api.api-1", b'{"success": true, "duration_ms": -5}'),
        ("autoserve.breaker.report.api.bad:name", b'{"success": false}'),
        ("autoserve.breaker.report.api", b'{"success": false}'),
    ]
    for subject, payload in poison_reports:
        await nc.publish(subject, payload)
    # A malformed event on the probe stream goes through the durable consumer's dead-letter path.
    await nc.jetstream().publish("autoserve.probe.completed.api.api-1", b'{"type": "ProbeCompleted"}')

    await wait_for(lambda: len(outputs.dead_letters()) >= 5, 10, "dead letters")
    reasons = [m.headers.get("Autoserve-Reason", "") for m in outputs.dead_letters() if m.headers]
    assert any("report.success: expected bool, got 'yes'" in r for r in reasons)
    assert any("instance_id 'bad:name'" in r for r in reasons)
    assert any("report.duration_ms" in r for r in reasons)
    assert service.handlers.stats.dead_lettered >= 4

    await report_many(client, "api", "api-1", False, 3)  # still folding good input
    await wait_for(lambda: last_state(outputs, "api", "api-1") == "open", 10, "api-1 open after the poison")
    assert not await client.allow("api", "api-1")
    assert (await nc.jetstream().stream_info(PROBES_STREAM)).state.messages == 1


async def test_the_client_falls_back_when_no_breaker_answers(nc: Client) -> None:
    client = BreakerClient(nc, timeout=0.2)
    assert await client.allow("web", "web-1") is True
    assert await BreakerClient(nc, timeout=0.2, allow_when_unavailable=False).allow("web", "web-1") is False
    with pytest.raises(BreakerUnavailable):
        await client.check("web", "web-1")
    with pytest.raises(ValueError, match=r"instance_id 'a\.b'"):
        await client.check("web", "a.b")


async def test_autoserve_run_breaker_serves_allow(nats_server: EmbeddedNatsServer, nc: Client) -> None:
    """The real command: ``autoserve run breaker`` (what ``up`` and deploy/ start)."""
    await apply_yaml(nc, config_for(BREAKER_APPS))
    env = {**os.environ, "AUTOSERVE_LOG_LEVEL": "warning"}
    process = await asyncio.create_subprocess_exec(
        AUTOSERVE, "run", "breaker", "--nats-url", nats_server.url, "--replica", "0/1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        client = BreakerClient(nc, timeout=0.5)
        replies: list[object] = []

        async def answered() -> None:
            for _ in range(200):  # bounded: about 100 s at most
                try:
                    replies.append(await client.check("strict", "x"))
                    return
                except BreakerUnavailable:
                    await asyncio.sleep(0.05)

        await asyncio.wait_for(answered(), 60)
        assert replies and not replies[0].allow  # type: ignore[attr-defined]
    finally:
        process.terminate()
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()[-2000:]


async def test_override_request_struct_round_trips() -> None:
    request = OverrideRequest(app_name="web", instance_id="web-1", action="reset", requested_by="ops")
    assert b'"action":"reset"' in encode_message(request)
