"""Scale: 10,000 targets at ``period_seconds: 1`` from one prober service on this machine.

The real ``autoserve run prober --workers W`` runs as a child process tree. During the
measured window the benchmark only reads /proc (CPU, RSS) and two stream sequence numbers;
the ProbeCompleted events are read back from AUTOSERVE_PROBES after the window, so the
reader never competes with the prober for CPU.

lateness = (timestamp - response_time_ms / 1000) - scheduled_at, i.e. when the probe's
(last) attempt started against when it was due. "made / due" counts the probes whose
``scheduled_at`` falls in the window against targets x window / period.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from autoserve_events import MalformedEvent, ProbeCompleted, decode
from autoserve_events.subjects import PROBES_WILDCARD
from autoserve_runtime import EmbeddedNatsServer
from bench.common import LOG_DIR, Bus, CpuWindow, Nginx, ProberProcess, Table, fmt, total_rss, wait_quiet

GRACE_S = 3.0  # after the window: probes due in it may still be in flight or unacked


@dataclass
class ScaleResult:
    workers: int
    targets: int
    window_s: int
    due: int
    made: int = 0
    healthy: int = 0
    lateness_ms: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds: prober, nginx, nats, other, wall
    rss_max: int = 0
    processes: int = 0
    missing_reads: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        if not self.lateness_ms:
            return float("nan")
        ordered = sorted(self.lateness_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def read_window(bus: Bus, first_seq: int, last_seq: int, t0: float, t1: float, result: ScaleResult) -> None:
    """Read stream sequences ``first_seq..last_seq`` with an ordered push consumer (the
    fastest way to read a stream from nats-py) and keep the ProbeCompleted events due in
    ``[t0, t1)``. Bounded by a 120 s deadline."""
    expected = last_seq - first_seq + 1
    if expected <= 0:
        return
    seen = 0
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        nonlocal seen
        seen += 1
        try:
            event = decode(msg.data)
        except MalformedEvent:
            event = None
        if isinstance(event, ProbeCompleted) and event.scheduled_at is not None and t0 <= event.scheduled_at < t1:
            result.made += 1
            if event.is_healthy:
                result.healthy += 1
            elif event.error_kind is not None:
                result.error_kinds[event.error_kind] = result.error_kinds.get(event.error_kind, 0) + 1
            started = event.timestamp - event.response_time_ms / 1000
            result.lateness_ms.append((started - event.scheduled_at) * 1000)
        if seen >= expected:
            done.set()

    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first_seq)
    sub = await bus.js.subscribe(PROBES_WILDCARD, cb=on_msg, ordered_consumer=True, config=config)
    try:
        await asyncio.wait_for(done.wait(), 120)
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    result.missing_reads = expected - seen


async def run_scale(
    nats: EmbeddedNatsServer,
    bus: Bus,
    nginx: Nginx,
    *,
    targets: int,
    workers: int,
    window: int,
) -> ScaleResult:
    label = f"scale-{targets}-w{workers}"
    await bus.purge()
    result = ScaleResult(workers, targets, window, due=targets * window)
    prober = ProberProcess(nats.url, workers=workers, label=label).start()
    try:
        if not await bus.wait_for_probes(await bus.last_seq(), 1, timeout=60):
            raise RuntimeError(f"prober stored no probe within 60 s; see {LOG_DIR}/{label}.log")
        await bus.wait_for_probes(0, targets, timeout=30)  # its first round, or as much as it did
        await asyncio.sleep(4)  # warm-up: every worker on its rhythm, the pools filled
        assert nginx.process is not None and nats.process is not None
        pids = prober.pids()
        result.processes = len(pids)
        groups = {"prober": pids, "nginx": [nginx.process.pid], "nats": [nats.process.pid]}
        await wait_quiet(groups)  # at least 1 s more of warm-up
        first_seq = await bus.last_seq() + 1
        t0 = time.time()  # after the stream info reply: everything due from here has a larger sequence
        cpu = CpuWindow(groups)
        for second in range(1, window + 1):  # one RSS sample a second: cheap, and the peak matters
            await asyncio.sleep(max(0.0, t0 + second - time.time()))
            result.rss_max = max(result.rss_max, total_rss(pids))
        result.cpu = cpu.stop()
        await asyncio.sleep(GRACE_S)
        if not prober.alive():
            raise RuntimeError(f"prober exited during the window; see {LOG_DIR}/{label}.log")
    finally:
        prober.stop()  # it flushes what it buffered: those events are read back too
    await read_window(bus, first_seq, await bus.last_seq(), t0, t0 + window, result)
    return result


def scale_table(results: list[ScaleResult], title: str) -> Table:
    table = Table(
        title,
        [
            "workers",
            "processes",
            "probes/s",
            "made / due",
            "p50 late ms",
            "p90 late ms",
            "p99 late ms",
            "max late ms",
            "healthy %",
            "prober CPU %",
            "RSS MB",
            "nats CPU %",
            "nginx CPU %",
            "other load CPU %",
        ],
    )
    for r in results:
        pct = {group: fmt(100 * seconds / r.cpu["wall"]) for group, seconds in r.cpu.items() if group != "wall"}
        table.add(
            r.workers,
            r.processes,
            fmt(r.made / r.window_s),
            f"{fmt(r.made)} / {fmt(r.due)} ({100 * r.made / r.due:.1f}%)",
            fmt(r.percentile(50), 1),
            fmt(r.percentile(90), 1),
            fmt(r.percentile(99), 1),
            fmt(max(r.lateness_ms, default=float("nan")), 1),
            fmt(100 * r.healthy / r.made, 1) if r.made else "-",
            pct["prober"],
            fmt(r.rss_max / 2**20),
            pct["nats"],
            pct["nginx"],
            pct["other"],
        )
    for r in results:
        goals = {
            "every probe made": r.made >= r.due,
            "p99 lateness < 100 ms": r.percentile(99) < 100,
            "RSS < 300 MB": r.rss_max < 300 * 2**20,
        }
        verdicts = ", ".join(f"{goal}: {'met' if ok else 'MISSED'}" for goal, ok in goals.items())
        errors = ", ".join(f"{kind} {count}" for kind, count in sorted(r.error_kinds.items())) or "none"
        table.notes.append(f"workers={r.workers}: {verdicts}; failed probes by kind: {errors}")
        if r.missing_reads:
            table.notes.append(f"workers={r.workers}: {r.missing_reads} stored messages could not be read back")
    table.notes += [
        f"Window {results[0].window_s if results else 0} s after the first round and a 5 s warm-up. "
        "lateness = probe start (timestamp - response_time_ms/1000) - scheduled_at, over the probes made.",
        "CPU % is of one core (200 % = the whole machine); RSS is the peak of VmRSS summed over the prober's "
        "process tree (parent + shards), sampled every second; other load = machine busy time minus every "
        "process of this benchmark.",
    ]
    return table
