"""Prober members (issue #17): 300 targets at a 1 s period on one nginx, probed by real
``autoserve run prober`` processes that are members of the prober (TTL 2 s). Each target
is probed once per period between the members, two and then three; a member joining takes
about a third of the targets and moves no others; a SIGKILLed member's targets are probed
again within 2 periods + TTL; a SIGTERMed member hands its targets over within a period.
The gaps measured are printed (run with ``-s`` to see them)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
from nats.aio.client import Client

from autoserve_runtime import EmbeddedNatsServer
from autoserve_runtime.observability.server import SHARD_PORT_STEP
from autoserve_runtime.provisioning import MEMBERS_BUCKET

from ..support.cluster import nginx
from ..support.prober_members import ProbeLog, ProberMembers, metric, owners
from ..support.waiting import wait_for
from .conftest import LOCALHOST, apply_yaml, check, config_for

pytestmark = pytest.mark.members  # the members lane of make test, beside the others

APP = "fleet"
TARGETS = 300
PERIOD = 1.0
TTL = 2
WINDOW = 10.0  # seconds of steady state, with two members and again with three
INSTANCES = [f"t{n:03d}" for n in range(TARGETS)]


def fleet(port: int) -> str:
    instances = [{"id": i, "host": LOCALHOST, "port": port} for i in INSTANCES]
    return config_for({APP: {"health_check": check(path="/ok"), "instances": instances}})


async def settle(members: ProberMembers) -> None:
    await wait_for(lambda: members.settled(TARGETS), timeout=90, what="members own every target once", every=0.2)


async def steady_window(log: ProbeLog, members: list[str]) -> None:
    """From the next whole second, WINDOW seconds: each target probed once per period."""
    start = float(int(time.time()) + 2)  # a period after settling: every view agrees
    end = start + WINDOW
    await wait_for(lambda: time.time() > end + 1.5, timeout=WINDOW + 10, what="the window to pass")
    counts = log.counts(INSTANCES, start, end)
    off = {i: n for i, n in counts.items() if not WINDOW - 1 <= n <= WINDOW + 1}
    assert not off, f"{len(members)} members: probes per target in {WINDOW:g}s outside ±1: {off}"
    doubles = {i: n for i, n in log.doubles(INSTANCES, start, end, PERIOD).items() if n}
    assert not doubles, f"{len(members)} members: targets probed twice in one period: {doubles}"
    print(f"steady, {len(members)} members: {sum(counts.values())} probes of {TARGETS} targets in {WINDOW:g}s")


def largest_gap(log: ProbeLog, instances: list[str], start: float, end: float) -> float:
    """The longest time between two probes of one target in ``[start, end]``."""
    largest = 0.0
    for i in instances:
        made = sorted(t for t in log.times[i] if start <= t <= end)
        largest = max([largest, *(b - a for a, b in itertools.pairwise(made))])
    return largest


async def test_members_share_the_targets_and_take_over_from_a_killed_or_stopped_member(
    tmp_path: Path, nats_server: EmbeddedNatsServer, nc: Client
) -> None:
    with nginx(tmp_path / "nginx") as port:
        await apply_yaml(nc, fleet(port))
        log = ProbeLog(APP)
        await log.follow(nc)
        members = ProberMembers.on(nats_server.url, tmp_path / "logs", ttl=TTL)
        try:
            # Two members, then three: each target once per period.
            members.start("a")
            members.start("b")
            await settle(members)
            await steady_window(log, ["a", "b"])

            # A third joins: it takes about a third, from both, and nothing else moves.
            two, three = owners(APP, INSTANCES, ["a", "b"]), owners(APP, INSTANCES, ["a", "b", "c"])
            moved = [i for i in INSTANCES if two[i] != three[i]]
            joined_at = time.time()
            members.start("c")
            await settle(members)
            settled_at = time.time()
            taken = members.targets("c")
            extra = log.doubles(INSTANCES, joined_at - PERIOD, settled_at + PERIOD, PERIOD)
            gap = largest_gap(log, INSTANCES, joined_at - PERIOD, settled_at + PERIOD)
            print(f"join: c took {taken} of {TARGETS} targets ({taken / TARGETS:.0%}); "
                  f"{sum(extra.values())} extra probes; largest gap {gap:.2f}s")  # fmt: skip
            assert 0.20 <= taken / TARGETS <= 0.47, f"c took {taken} of {TARGETS} targets"
            assert taken == len(moved) and all(three[i] == "c" for i in moved)
            assert all(extra[i] <= 1 for i in moved), "more than one extra probe for a moved target"
            assert not [i for i in INSTANCES if i not in moved and extra[i]], "a target that stayed was probed twice"
            await steady_window(log, ["a", "b", "c"])

            # SIGKILL c: its targets are probed again within 2 periods + TTL.
            orphans = [i for i in INSTANCES if three[i] == "c"]
            killed_at = members.kill("c")
            bound = 2 * PERIOD + TTL
            await wait_for(lambda: log.probed_since(orphans, killed_at), timeout=bound + 10, what="c's targets again")
            after_kill = max(log.since(orphans, killed_at).values())
            gap = max(log.gaps(orphans, killed_at).values())
            print(f"SIGKILL: c's {len(orphans)} targets probed again {after_kill:.2f}s after the kill; "
                  f"largest gap between two probes of one target {gap:.2f}s (bound {bound:g}s)")  # fmt: skip
            assert after_kill <= bound, f"c's targets were probed again {after_kill:.2f}s after the kill"
            await settle(members)

            # SIGSTOP b past its lease: a takes its targets over; b resumed probes none of
            # them before it has re-read the members (at most one extra probe when it takes
            # them back), then has its share again.
            paused = [i for i in INSTANCES if owners(APP, INSTANCES, ["a", "b"])[i] == "b"]
            paused_at = members.pause("b")
            await wait_for(lambda: log.probed_since(paused, paused_at + TTL), timeout=bound + 10, what="b's by a")
            after_pause = max(log.since(paused, paused_at).values())
            resumed_at = members.resume("b")
            await wait_for(lambda: members.targets("b") > 0, timeout=30, what="b to own its share again")
            await settle(members)
            back_at = time.time()
            # A zombie's probe would be of a slot it slept through: due before it resumed.
            zombie = log.doubles(paused, paused_at, resumed_at, PERIOD)
            extra = log.doubles(paused, paused_at, back_at + PERIOD, PERIOD)
            print(f"SIGSTOP: b's {len(paused)} targets probed again {after_pause:.2f}s after the pause; "
                  f"{sum(extra.values())} extra probes around its resumption")  # fmt: skip
            assert after_pause <= bound, f"b's targets were probed again {after_pause:.2f}s after it paused"
            assert not any(zombie.values()), f"b probed as a zombie beside a: {zombie}"
            assert all(n <= 1 for n in extra.values()), f"more than one extra probe of a target: {extra}"

            # SIGTERM b: it leaves first, and a probes its targets within a period. (From a
            # steady state: the first slot after an at-once probe may be 1.5 periods on.)
            await wait_for(lambda: time.time() > back_at + 2 * PERIOD, timeout=5, what="a steady state")
            handed = [i for i in INSTANCES if owners(APP, INSTANCES, ["a", "b"])[i] == "b"]
            stopped_at = members.terminate("b")
            assert await members.wait_exit("b") == 0, members.log("b")
            exited_at = time.time()
            await wait_for(lambda: log.probed_since(handed, exited_at + PERIOD), timeout=15, what="b's targets by a")
            gap = largest_gap(log, handed, stopped_at - PERIOD, exited_at + PERIOD)
            print(f"SIGTERM: b's {len(handed)} targets, largest gap between two probes {gap:.2f}s "
                  f"(b exited {exited_at - stopped_at:.2f}s after the signal)")  # fmt: skip
            assert gap <= PERIOD + 0.5, f"b's targets went {gap:.2f}s without a probe across its graceful stop"
            assert members.targets("a") == TARGETS
        finally:
            members.stop_all()


async def test_each_workers_shard_is_a_member_with_its_own_name_and_share(
    tmp_path: Path, nats_server: EmbeddedNatsServer, nc: Client
) -> None:
    """``autoserve run prober --workers 2``: the two shards are members ``<member>-w0`` and
    ``-w1`` and split the targets between them (one name for both would probe all twice)."""
    with nginx(tmp_path / "nginx") as port:
        await apply_yaml(nc, fleet(port))
        members = ProberMembers.on(nats_server.url, tmp_path / "logs", ttl=TTL, workers=2)
        try:
            members.start("host")
            ports = [members.port("host") + SHARD_PORT_STEP * i for i in range(2)]

            def shares() -> list[float]:
                return [metric(p, "autoserve_probe_targets") or 0.0 for p in ports]

            await wait_for(lambda: sum(shares()) == TARGETS and all(shares()), timeout=60, what="shards share")
            kv = await nc.jetstream().key_value(MEMBERS_BUCKET)
            assert {"prober.host-w0", "prober.host-w1"} <= set(await kv.keys())
            split = owners(APP, INSTANCES, ["host-w0", "host-w1"])
            assert shares() == [sum(o == f"host-w{i}" for o in split.values()) for i in range(2)]
        finally:
            members.stop_all()
