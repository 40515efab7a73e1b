"""Two breaker members as real ``autoserve run breaker`` processes: SIGKILL one, and its
breakers answer ``allow`` from the other in the state they had (open stays open with the same
``retry_at``, closed stays closed), and the survivor, having rebuilt them from the log, decides
their next transitions: an open one half-opens at its old deadline, and a closed one that had
two of its three failures opens on the third. SIGSTOP one past its lease and resume it: the
log holds one history per breaker (no generation twice), and both answer from it. And the
chain itself: a transition that does not extend the breaker's last stored one is refused."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client
from nats.js.api import DeliverPolicy

from autoserve_breaker.adapters.follow import BreakerEventFollower
from autoserve_breaker.adapters.outbox import Outbox
from autoserve_breaker.core.breakers import Breakers
from autoserve_breaker.service import breaker_key
from autoserve_config import AppSpec, BreakerConfig
from autoserve_events import (
    BREAKER_EVENTS_WILDCARD,
    EVENTS_STREAM,
    BreakerStateChanged,
    BreakerTrialAdmitted,
    ProbeCompleted,
    decode,
    encode,
    headers_for,
    subject_for,
)
from autoserve_runtime import EmbeddedNatsServer, EventPublisher, free_port, provision, spawn_child, stop_child
from autoserve_runtime.breaker_client import BreakerClient, BreakerUnavailable
from autoserve_runtime.ownership import owner_of

from .conftest import LOCALHOST, Outputs, apply_yaml, check, config_for, wait_for
from .test_breaker import AUTOSERVE

pytestmark = pytest.mark.members  # the members lane of make test, beside the others

TTL = 2
SOON = 8  # seconds an open "soon" breaker waits: beyond the takeover, within the test

APPS = {
    # Synthetic probes, not one every period: a period of 60 s keeps them all in the rebuilt history.
    "hold": {"failure_threshold": 2, "recovery_timeout": 300, "max_test_requests": 1},
    "soon": {"failure_threshold": 2, "recovery_timeout": SOON, "max_test_requests": 1, "success_threshold": 1},
    "count": {"failure_threshold": 3, "recovery_timeout": 300},
}


class Member:
    """One ``autoserve run breaker`` member with its own /readyz port."""

    def __init__(self, name: str, nats_url: str, logs: Path) -> None:
        self.name = name
        self.health = f"http://{LOCALHOST}:{free_port()}"
        self.log = logs / f"breaker-{name}.log"
        self.env = {**os.environ, "AUTOSERVE_NATS_URL": nats_url, "AUTOSERVE_MEMBER": name,
                    "AUTOSERVE_MEMBER_TTL": str(TTL), "AUTOSERVE_METRICS_PORT": self.health.rpartition(":")[2]}  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Member:
        with self.log.open("ab") as out:
            self.process = spawn_child([AUTOSERVE, "run", "breaker"], env=self.env, stdout=out, stderr=out)
        return self

    async def ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log.read_text()[-3000:]
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                return (await client.get(f"{self.health}/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGCONT)  # a stopped process would not hear SIGTERM
            stop_child(self.process)


def owned(app: str, member: str, count: int) -> list[str]:
    """``count`` instance ids of ``app`` whose breaker ``member`` owns among a and b."""
    found = [f"{app}-{i}" for i in range(200) if owner_of(breaker_key(app, f"{app}-{i}"), {"a", "b"}) == member]
    return found[:count]


def probe(app: str, instance: str, healthy: bool, seq: int) -> ProbeCompleted:
    t = time.time()
    return ProbeCompleted(
        event_id=f"{app}-{instance}-{seq}-{t}", emitted_at=t, app_name=app, instance_id=instance,
        check_type="http", is_healthy=healthy, response_time_ms=1.0, timestamp=t,
    )  # fmt: skip


async def publish(nc: Client, probes: list[ProbeCompleted]) -> None:
    js = nc.jetstream()
    for event in probes:
        await js.publish(subject_for(event), encode(event), headers=headers_for(event))


async def stored(nc: Client, kinds: tuple[type, ...] = (BreakerStateChanged,)) -> list:
    """Every transition (of ``kinds``) the stream holds, in order: what was published but
    refused is not there."""
    js, found = nc.jetstream(), []
    sub = await js.subscribe(BREAKER_EVENTS_WILDCARD, stream=EVENTS_STREAM, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.ALL)  # fmt: skip
    try:
        for _ in range(100_000):  # bounded; ends at the last one stored
            msg = await sub.next_msg(timeout=5)
            if isinstance(event := decode(msg.data), kinds):
                found.append(event)
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return found


def last(outputs: Outputs, app: str, instance: str) -> BreakerStateChanged | None:
    changes = [e for e in outputs.events(BreakerStateChanged) if (e.app_name, e.instance_id) == (app, instance)]
    return max(changes, key=lambda e: e.generation) if changes else None


async def answers(client: BreakerClient, keys: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[bool, str]]:
    replies = await asyncio.gather(*(client.check(*key) for key in keys))
    return {key: (reply.allow, reply.state) for key, reply in zip(keys, replies, strict=True)}


async def test_sigkill_a_member_and_the_other_answers_for_its_breakers_as_they_were_then_decides_them(
    nats_server: EmbeddedNatsServer, nc: Client, outputs: Outputs, tmp_path: Path
) -> None:
    await provision(nc.jetstream())
    mine = {app: owned(app, "a", 3) for app in APPS}  # the breakers of the member to be killed
    theirs = {app: owned(app, "b", 1) for app in APPS}
    apps = {
        app: {"breaker": breaker, "health_check": check(enabled=False, period_seconds=60),
              "instances": [{"id": i, "host": LOCALHOST, "port": 9} for i in mine[app] + theirs[app]]}
        for app, breaker in APPS.items()
    }  # fmt: skip
    await apply_yaml(nc, config_for(apps))
    a, b = Member("a", nats_server.url, tmp_path), Member("b", nats_server.url, tmp_path)
    try:
        a.start()
        await wait_for(a.ready, 60, "a ready")
        b.start()
        await wait_for(b.ready, 60, "b ready (a sees it by then: it joined before its replay)")

        # Open every "hold" and "soon" breaker; two of three failures on the "count" ones.
        failing = [probe(app, i, False, n) for app in APPS for i in mine[app] + theirs[app] for n in range(2)]
        await publish(nc, failing)
        opened = [(app, i) for app in ("hold", "soon") for i in mine[app] + theirs[app]]
        await wait_for(lambda: all((e := last(outputs, *k)) and e.state == "open" for k in opened), 20, "all open")
        before = {k: last(outputs, *k) for k in opened}
        killed = [(app, i) for app in APPS for i in mine[app]]
        client = BreakerClient(nc, timeout=0.5)
        expected = await answers(client, killed)
        assert {k: v for k, v in expected.items() if k[0] != "count"} == {
            k: (False, "open") for k in killed if k[0] != "count"
        }
        assert {v for k, v in expected.items() if k[0] == "count"} == {(True, "closed")}
        transitions_before = len(outputs.events(BreakerStateChanged))

        a.kill()
        killed_at = time.monotonic()

        # Answered again from b, in the state they had (a's connection is gone: the queue
        # group has one member left).
        seen: dict[tuple[str, str], tuple[bool, str]] = {}

        async def all_answered() -> bool:
            try:
                seen.update(await answers(client, killed))
            except BreakerUnavailable:
                return False
            return True

        await wait_for(all_answered, TTL + 3, "a's breakers answered by b")
        answered_after = time.monotonic() - killed_at
        assert seen == expected, "the same answers as before the kill"

        # The third failure of each "count" breaker: b opens it only if it rebuilt the two
        # that a had counted (probes replayed from the log); a is dead, so b decided it.
        await publish(nc, [probe("count", i, False, 2) for i in mine["count"]])
        counted = [("count", i) for i in mine["count"]]
        await wait_for(lambda: all((e := last(outputs, *k)) and e.state == "open" for k in counted),
                       2 * TTL + 5, "b to take a's breakers over and open the counted ones")  # fmt: skip
        taken_over_after = time.monotonic() - killed_at
        assert (await answers(client, counted)) == {k: (False, "open") for k in counted}

        # Open ones stay open with a's deadline: b half-opens each "soon" one at its old
        # retry_at, not before; "hold" ones do not move.
        soon = [("soon", i) for i in mine["soon"]]
        await wait_for(lambda: all(last(outputs, *k).state == "half_open" for k in soon), SOON + 5, "half-open")
        for key in soon:
            opened_event, half_open = before[key], last(outputs, *key)
            assert opened_event is not None and half_open is not None and opened_event.retry_at is not None
            assert half_open.generation == opened_event.generation + 1
            assert opened_event.retry_at <= half_open.timestamp < opened_event.retry_at + 2.0
            print(f"{key}: half-opened {half_open.timestamp - opened_event.retry_at:.3f}s after a's retry_at")
        for key in soon:
            first, second = await client.check(*key), await client.check(*key)
            assert (first.allow, first.state, second.allow) == (True, "half_open", False), "one trial, from b"
        for key in [("hold", i) for i in mine["hold"]]:
            assert last(outputs, *key) == before[key], "no transition: still a's open, same retry_at"
            assert (await client.check(*key)).state == "open"
        others = {k for k in {(e.app_name, e.instance_id) for e in outputs.events(BreakerStateChanged)}}
        assert others <= set(opened) | set(counted)
        print(f"breaker takeover: answered {answered_after:.3f}s after SIGKILL, counted breakers opened by the "
              f"survivor {taken_over_after:.3f}s after it (TTL {TTL}s); "
              f"{len(outputs.events(BreakerStateChanged)) - transitions_before} transitions after the kill")  # fmt: skip
        assert b.process is not None and b.process.poll() is None
    finally:
        a.stop()
        b.stop()
    log = b.log.read_text()
    taken = [line for line in log.splitlines() if "breakers taken over" in line]
    assert taken, log[-3000:]
    print(taken[-1][:500])


async def test_sigstop_a_member_past_its_lease_and_resume_it_the_log_keeps_one_history_per_breaker(
    nats_server: EmbeddedNatsServer, nc: Client, outputs: Outputs, tmp_path: Path
) -> None:
    await provision(nc.jetstream())
    breaker = {"failure_threshold": 2, "recovery_timeout": 4, "max_test_requests": 1, "success_threshold": 1}
    mine, theirs = owned("soon", "a", 3), owned("soon", "b", 1)
    instances = [{"id": i, "host": LOCALHOST, "port": 9} for i in mine + theirs]
    await apply_yaml(nc, config_for({"soon": {"breaker": breaker, "health_check": check(enabled=False, period_seconds=60),
                                              "instances": instances}}))  # fmt: skip
    a, b = Member("a", nats_server.url, tmp_path), Member("b", nats_server.url, tmp_path)
    keys = [("soon", i) for i in mine]
    client = BreakerClient(nc, timeout=0.5)
    try:
        a.start()
        await wait_for(a.ready, 60, "a ready")
        b.start()
        await wait_for(b.ready, 60, "b ready")
        await publish(nc, [probe("soon", i, False, n) for i in mine + theirs for n in range(2)])
        await wait_for(lambda: all((e := last(outputs, *k)) and e.state == "open" for k in keys), 20, "a opens")

        a.signal(signal.SIGSTOP)  # a's timer would half-open them in 4 s: it is paused instead
        stopped_at = time.monotonic()
        await wait_for(lambda: all(last(outputs, *k).state == "half_open" for k in keys), 15, "b half-opens")
        await publish(nc, [probe("soon", i, True, 3) for i in mine])  # the trial outcome: closed, by b
        await wait_for(lambda: all(last(outputs, *k).state == "closed" for k in keys), 10, "b closes")
    finally:
        paused = time.monotonic() - stopped_at if "stopped_at" in locals() else 0.0
        a.signal(signal.SIGCONT)
    try:
        # Resumed past its lease: fenced at once, it decides nothing from its stale state (open,
        # deadline passed), rejoins, takes its breakers back from the log, and answers alike.
        await wait_for(a.ready, 30, "a ready again: lease renewed, membership re-read")
        await wait_for(lambda: "breakers taken over" in a.log.read_text(), 15, "a to rebuild its breakers")
        replies = await asyncio.gather(*(client.check(*k) for k in keys for _ in range(20)))
        assert {(r.allow, r.state) for r in replies} == {(True, "closed")}, "a and b answer from the same log"
        history = await stored(nc)
        for key in keys:
            generations = [e.generation for e in history if (e.app_name, e.instance_id) == key]
            states = [e.state for e in history if (e.app_name, e.instance_id) == key]
            assert generations == [1, 2, 3] and states == ["open", "half_open", "closed"], (key, states)
        published = len([e for e in outputs.events(BreakerStateChanged) if e.instance_id in mine])
        print(
            f"SIGSTOP for {paused:.1f}s (TTL {TTL}s): {len(history)} transitions stored; "
            f"{published - 3 * len(keys)} published for a's breakers beyond the stored history (refused)"
        )
    finally:
        a.stop()
        b.stop()
    assert "fenced" in a.log.read_text()


async def test_a_transition_that_does_not_extend_the_last_stored_one_is_refused(nc: Client) -> None:
    """Two members both believing they own a breaker (a zombie and its successor): the first
    transition stored wins, the other is refused, and its member starts again from the log."""
    await provision(nc.jetstream())
    publisher = EventPublisher(nc.jetstream()).start()
    config = {"web": AppSpec(breaker=BreakerConfig(failure_threshold=1, recovery_timeout=60))}
    successor, zombie = Breakers(), Breakers()
    successor.set_apps(config)
    zombie.set_apps(config)
    successor_out = Outbox(publisher, successor, successor.resync)
    zombie_out = Outbox(publisher, zombie, zombie.resync)
    try:
        first = successor_out.submit(*successor.record("web", "w-1", False, 1.0, time.time(), "probe-1"))
        assert await asyncio.wait_for(first, 10)
        late = zombie_out.submit(*zombie.record("web", "w-1", False, 1.0, time.time(), "probe-0"))
        assert not await asyncio.wait_for(late, 10), "the zombie's transition of the same generation is refused"
        assert zombie_out.refused == 1 and zombie.get("web", "w-1").generation == 0, "back to the log"
        history = await stored(nc)
        assert [(e.generation, e.cause_event_id) for e in history] == [(1, "probe-1")]
    finally:
        await publisher.close()


async def test_transitions_decided_back_to_back_are_stored_in_order_each_naming_the_last(nc: Client) -> None:
    """A member's second transition of a breaker waits until the stream has shown it the first
    (its sequence is what the second must name), and a trial waits behind its half-open."""
    await provision(nc.jetstream())
    publisher = EventPublisher(nc.jetstream()).start()
    books = Breakers()
    books.set_apps({"web": AppSpec(breaker=BreakerConfig(failure_threshold=1, recovery_timeout=0.5))})
    outbox = Outbox(publisher, books, books.resync)

    def follow(event: BreakerStateChanged | BreakerTrialAdmitted, seq: int) -> bool:
        applied = books.follow(event, seq)
        outbox.logged((event.app_name, event.instance_id))
        return applied

    follower = BreakerEventFollower(nc.jetstream(), follow)
    await follower.start()
    try:
        now = time.time()
        opened = books.record("web", "w-1", False, 1.0, now, "probe-1")
        half_open = books.tick(now + 1)
        decision, admitted = books.allow("web", "w-1", now + 1)
        assert [c.generation for c in opened + half_open] == [1, 2] and decision.allow
        futures = [outbox.submit(e) for e in [*opened, *half_open, *admitted]]  # all at once
        assert await asyncio.wait_for(asyncio.gather(*futures), 10) == [True, True, True]
        history = await stored(nc, (BreakerStateChanged, BreakerTrialAdmitted))
        assert [(type(e).__name__, e.generation) for e in history] == [
            ("BreakerStateChanged", 1), ("BreakerStateChanged", 2), ("BreakerTrialAdmitted", 2)
        ], "in decision order, the trial after its half-open"  # fmt: skip
        assert outbox.refused == 0
        await wait_for(lambda: books.logged(("web", "w-1"))[0] == 2, 5, "the second followed")
    finally:
        await follower.stop()
        await publisher.close()
