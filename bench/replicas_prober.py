"""Prober members (issue #17): the probe takeover gap after a SIGKILL, and duplicate probes
in steady state.

Its own nats-server and nginx (unless given one), 300 targets at period 1 s on nginx
``/health``, and ``autoserve run prober`` members with AUTOSERVE_MEMBER_TTL=2 (the
tests' TTL; the default is 5 s). Probes are read off the bus (``ProbeCompleted``, each
with its due time). ``python -m bench.replicas_prober`` runs it alone.

- Takeover: with three members, one is SIGKILLed (no goodbye); for each of its targets,
  the time from its last probe before the kill to its first one after. Five kills, each
  followed by a fresh member, so every kill is from three members to two.
- Steady state: three members, a window of whole periods, probes of a target less than
  half a period apart (a second probe in one slot) counted as duplicates.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from contextlib import AsyncExitStack

from autoserve_runtime import connect
from bench.common import LOG_DIR, Nginx, Table, apply_config, fmt, nats_server, until, write_config
from tests.support.prober_members import ProbeLog, ProberMembers, owners

APP = "fleet"
TARGETS = 300
PERIOD = 1.0
TTL = 2
KILLS = 5
WINDOW_S = 20.0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _settle(members: ProberMembers, timeout: float = 90) -> None:
    await until(lambda: members.settled(TARGETS), timeout, "members own every target once")


async def _wait_until(moment: float) -> None:
    await until(lambda: time.time() >= moment, moment - time.time() + 10, "the window to pass")


async def steady_table(log: ProbeLog, members: ProberMembers, instances: list[str]) -> Table:
    start = float(int(time.time()) + 2)
    end = start + WINDOW_S
    await _wait_until(end + 1.5)  # the last probes of the window are on the bus
    counts = log.counts(instances, start, end)
    doubles = log.doubles(instances, start, end, PERIOD)
    expected = TARGETS * WINDOW_S / PERIOD
    table = Table(
        f"Prober members, steady state: {len(members.alive)} members, {TARGETS} targets, period {PERIOD:g} s",
        ["members", "window s", "probes", "expected", "duplicates (goal 0)", "targets off by > 1"],
    )
    off = sum(abs(n - WINDOW_S / PERIOD) > 1 for n in counts.values())
    table.add(len(members.alive), fmt(WINDOW_S), fmt(sum(counts.values())), fmt(expected), sum(doubles.values()), off)
    table.notes.append("A duplicate: a probe of a target less than half a period after the one before it.")
    return table


async def takeover_table(log: ProbeLog, members: ProberMembers, instances: list[str]) -> Table:
    gaps: list[float] = []  # per kill: the worst of the dead member's targets
    after: list[float] = []  # per kill: the kill to the last of its targets probed again
    table = Table(
        f"Prober members, takeover after a SIGKILL: 3 -> 2 members, TTL {TTL} s, period {PERIOD:g} s",
        ["kill", "member", "its targets", "kill -> all probed again s", "largest probe gap s"],
    )
    for kill in range(KILLS):
        alive = members.alive
        victim = alive[0]
        orphans = [i for i, owner in owners(APP, instances, alive).items() if owner == victim]
        killed_at = members.kill(victim)
        await until(lambda o=orphans, k=killed_at: log.probed_since(o, k), 2 * PERIOD + TTL + 30, "takeover")
        after.append(max(log.since(orphans, killed_at).values()))
        gaps.append(max(log.gaps(orphans, killed_at).values()))
        table.add(kill + 1, victim, len(orphans), fmt(after[-1], 2), fmt(gaps[-1], 2))
        members.start(f"k{kill + 1}")  # back to three for the next kill
        await _settle(members)
        await _wait_until(time.time() + 2 * PERIOD)  # every view agrees; a probe of each target since
    goal = 2 * PERIOD + TTL
    table.add("p50", "", "", fmt(statistics.median(after), 2), fmt(statistics.median(gaps), 2))
    table.add("p95", "", "", fmt(_pct(after, 0.95), 2), fmt(_pct(gaps, 0.95), 2))
    verdict = "met" if _pct(gaps, 0.95) <= goal else "NOT met"
    table.notes += [
        f"Goal: p95 of the largest gap <= 2 x period + TTL = {goal:g} s: {verdict}.",
        "Largest probe gap: for the killed member's targets, the last probe before the kill to the first after it.",
        "A member that stops gracefully (SIGTERM) hands its targets over within one period instead.",
    ]
    return table


async def prober_replica_tables(nginx_port: int | None = None) -> list[Table]:
    async with AsyncExitStack() as stack:
        if nginx_port is None:
            nginx = Nginx()
            stack.callback(nginx.stop)
            nginx_port = nginx.start().port
        nats = nats_server("replicas-nats")
        stack.callback(nats.stop)
        nats.start()
        apply_config(write_config("replicas", {APP: TARGETS}, nginx_port), nats.url)
        instances = [f"{APP}-{i:05d}" for i in range(TARGETS)]
        nc = await connect(nats.url, "bench-replicas", timeout=10)
        stack.push_async_callback(nc.close)
        log = ProbeLog(APP)
        await log.follow(nc)
        members = ProberMembers.on(nats.url, LOG_DIR / "replicas", ttl=TTL)
        stack.callback(members.stop_all)
        for name in ("a", "b", "c"):
            members.start(name)
        await _settle(members)
        steady = await steady_table(log, members, instances)
        return [steady, await takeover_table(log, members, instances)]


if __name__ == "__main__":
    from rich.console import Console

    for table in asyncio.run(prober_replica_tables()):
        Console().print(table.rich())
