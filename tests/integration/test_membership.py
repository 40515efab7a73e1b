"""Membership and leases on a real nats-server: members join, leave, die (their key expires
by its own TTL) and are fenced after a pause; ownership moves only the share that must."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from nats.aio.client import Client

from autoserve_cli.cluster_status import read_members
from autoserve_cli.status import show_status
from autoserve_runtime import EmbeddedNatsServer, provision
from autoserve_runtime.membership import Lease, Membership, slot_durable
from autoserve_runtime.ownership import owner_of
from tests.support.waiting import wait_for

pytestmark = pytest.mark.members  # the members lane of make test, beside the others

KEYS = [f"web/w{i}" for i in range(300)]


Join = Callable[..., Awaitable[Membership]]


@pytest.fixture
async def joined(nc: Client) -> AsyncIterator[Join]:
    """Members of "prober" with a 2 s TTL; all stopped at the end, whatever happened."""
    await provision(nc.jetstream())
    started: list[Membership] = []

    async def join(member: str, slots: int = 0) -> Membership:
        membership = Membership(nc.jetstream(), "prober", member, ttl=2.0, slots=slots)
        await membership.start()
        started.append(membership)
        return membership

    yield join
    for membership in started:
        await membership.stop()


def owned(membership: Membership) -> set[str]:
    return {key for key in KEYS if membership.owns(key)}


async def test_members_split_the_keys_and_a_dead_members_keys_come_back(joined: Join) -> None:
    a = await joined("a")
    assert owned(a) == set(KEYS)  # alone: everything
    b = await joined("b")
    await wait_for(lambda: a.members == b.members == {"a", "b"}, 10, "both members see each other")
    assert owned(a) | owned(b) == set(KEYS) and not owned(a) & owned(b)
    assert 90 < len(owned(b)) < 210  # about half, not all

    # A third member takes about a third, each key from whoever had it: nothing else moves.
    before = {key: owner_of(key, {"a", "b"}) for key in KEYS}
    c = await joined("c")
    await wait_for(lambda: a.members == b.members == c.members == {"a", "b", "c"}, 10, "three members")
    moved = {key for key in KEYS if a.owner(key) != before[key]}
    assert moved == owned(c) and 50 < len(moved) < 150

    # "b" dies without a goodbye: its renewals stop, JetStream expires its key, and the
    # others see the marker and take its keys over.
    b._tasks[1].cancel()
    b_keys = owned(b)
    started = time.monotonic()
    await wait_for(lambda: a.members == {"a", "c"} and c.members == {"a", "c"}, 15, "b's key expired")
    assert time.monotonic() - started < 2.0 + 3.0  # TTL, plus the expiry marker's way
    assert b_keys <= owned(a) | owned(c)

    # "c" leaves gracefully: "a" owns everything at once, well within the TTL.
    started = time.monotonic()
    await c.leave()
    await wait_for(lambda: a.members == {"a"}, 5, "c left")
    assert time.monotonic() - started < 1.0
    assert owned(a) == set(KEYS)


async def test_a_member_paused_past_its_lease_owns_nothing_until_it_has_reread_the_members(joined: Join) -> None:
    a = await joined("a")
    b = await joined("b")
    await wait_for(lambda: a.members == b.members == {"a", "b"}, 10, "both members")
    # Simulate a pause: the renewals stop and the monotonic clock runs past the TTL.
    b._tasks[1].cancel()
    await wait_for(lambda: b.fenced, 5, "b fenced once its lease may have lapsed")
    assert owned(b) == set()
    await wait_for(lambda: a.members == {"a"}, 10, "a sees b gone")
    assert owned(a) == set(KEYS)
    # Resumed: its next renewal rejoins, it re-reads the view, and only then owns again.
    b._tasks[1] = asyncio.create_task(b._heartbeat())
    await wait_for(lambda: not b.fenced, 10, "b renewed and re-read the members")
    assert b.lapses == 1
    await wait_for(lambda: a.members == {"a", "b"}, 10, "a sees b back")
    assert owned(a) | owned(b) == set(KEYS) and not owned(a) & owned(b)


async def test_a_lease_has_one_holder_and_lapses_when_the_holder_stops_renewing(nc: Client) -> None:
    await provision(nc.jetstream())
    js = nc.jetstream()
    first, second = Lease(js, "reporter", "r1", ttl=2), Lease(js, "reporter", "r2", ttl=2)
    assert await first.try_take()
    assert not await second.try_take()
    assert await first.try_take()  # renewed
    assert await first.current_holder() == "r1"
    # The holder dies: no renewal, and the key expires by its TTL.
    await wait_for(second.try_take, 10, "the standby takes the lapsed lease", every=0.25)
    assert not first.held
    assert not await first.try_take()
    await second.release()
    assert await first.try_take()
    # Its holder paused past the TTL, its key not expired yet: the holder renews it, nobody else takes it.
    first._renewed_at -= 2.5
    assert not first.held
    assert not await second.try_take()
    assert await first.try_take() and first.held


async def test_members_that_need_a_durable_each_take_their_own_slot(joined: Join) -> None:
    a, b = await joined("a", slots=2), await joined("b", slots=2)
    assert (a.slot, b.slot) == (0, 1)
    assert (slot_durable("detector", a.slot), slot_durable("detector", b.slot)) == ("detector", "detector-1")
    await a.leave()  # a graceful stop frees its slot at once
    c = await joined("c", slots=2)
    assert c.slot == 0


async def test_status_shows_each_members_host_what_it_owns_and_when_it_was_last_seen(
    joined: Join, nats_server: EmbeddedNatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    a = await joined("a")
    a.describe = lambda: "150 targets"
    await joined("b")
    await Lease(a._js, "prober", "a", ttl=2).try_take()  # leases are not members
    await wait_for(lambda: a.members == {"a", "b"}, 10, "both members")
    await a._renew()  # the record carries what it owns from the next renewal on
    records = {r.member: r for r in await read_members(a._js)}
    assert set(records) == {"a", "b"}
    assert records["a"].service == "prober" and records["a"].host == socket.gethostname()
    assert await show_status(nats_server.url, once=True, as_json=False) == 0
    out = capsys.readouterr().out
    assert "Members" in out and "2 members of 1 services" in out
    assert "150 targets" in out and "s ago" in out


async def test_a_slot_whose_key_vanished_without_another_holder_is_taken_back_not_lost(joined: Join) -> None:
    a = await joined("a", slots=2)
    kv = await a._js.key_value("autoserve-members")
    await kv.purge("lease.prober.slot0")  # as if it expired on the server during a stall
    await a._renew_slot()
    assert not a.slot_lost and await Lease(a._js, "prober.slot0", "x", ttl=2).current_holder() == "a"


async def test_a_renewal_late_by_the_clock_but_before_the_key_expired_is_no_lapse(joined: Join) -> None:
    a = await joined("a")
    a._renewed_at -= 2.5  # as if the last renewal was sent longer than the TTL ago (a stall)
    assert not a.fenced and a.owns("web/w1")  # alone: nobody it knows of can have taken over
    await joined("b")
    await wait_for(lambda: a.members == {"a", "b"}, 10, "a sees b")
    a._tasks[1].cancel()  # renewals by hand from here
    await a._renew()
    a._renewed_at -= 2.5
    assert a.fenced and not a.owns("web/w1") and not a.owns("web/w2")  # not alone: it may have a successor
    await a._renew()  # our key is still there, untouched: nobody can have taken over
    assert not a.fenced and a.lapses == 0
    assert {a.owner(f"web/w{i}") for i in range(20)} == {"a", "b"}


async def test_a_renewal_that_timed_out_but_was_stored_is_no_lapse(joined: Join, nc: Client) -> None:
    a = await joined("a")
    a._tasks[1].cancel()
    stale = a._seq
    await a._renew()  # stored, as if its ack had been lost in a failover:
    a._seq = stale  # this process still names the one before
    await a._renew()
    assert a.lapses == 0 and not a.fenced
    lease = Lease(nc.jetstream(), "prober", "a", ttl=2)
    assert await lease.try_take()
    revision = lease._revision
    assert await lease.try_take() and lease._revision != revision
    lease._revision = revision  # the same for a lease renewal
    assert await lease.try_take() and lease.held


async def test_a_lease_that_expired_while_its_holder_was_alone_is_kept(nc: Client) -> None:
    await provision(nc.jetstream())
    alone = Lease(nc.jetstream(), "reporter", "r1", ttl=2, alone=lambda: True)
    assert await alone.try_take()
    kv = await nc.jetstream().key_value("autoserve-members")
    await kv.purge("lease.reporter")  # as if it expired while NATS was away
    assert alone.held and await alone.try_take() and alone.held
    other = Lease(nc.jetstream(), "reporter", "r2", ttl=2)
    assert not await other.try_take()
