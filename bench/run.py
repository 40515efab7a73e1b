"""``make bench``: every benchmark in one run, printed as tables and written to bench/RESULTS.md.

Starts its own nginx and nats-server on 127.0.0.1 (scratch files under bench/.work), runs
the sections in order, and stops every process it started, also on failure or Ctrl-C.
A section that fails is reported as such; the others still run. The whole run stays
within a 15-minute budget: a section is skipped when too little of it is left.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python bench/run.py`): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console

from bench.alerter import alerter_tables
from bench.breaker_rpc import run_bench as breaker_tables
from bench.cluster import cluster_tables
from bench.common import BENCH_DIR, LOG_DIR, WORK_DIR, Table, apply_config, environment, fmt, write_config
from bench.detector import detector_tables
from bench.faults import fault_tables
from bench.probe_cost import probe_cost_samples, probe_cost_table
from bench.recovery import recovery_tables
from bench.replicas_detector import detector_replica_tables
from bench.replicas_prober import prober_replica_tables
from bench.report import machine_speed_ms, write_report
from bench.reporter import reporter_tables
from bench.scale import ScaleResult, run_scale, scale_table
from bench.sizing import sizing_tables
from bench.transports import VARIANTS, run_variant

BUDGET_S = 1200.0  # 20 minutes: a section that would not fit is skipped, and says so
CONSOLE = Console(width=160)


def transports_table(url: str, seconds: float) -> Table:
    table = Table(
        "HTTP client transports: 64 concurrent GETs to the same nginx /health (one subprocess each, uvloop)",
        ["client", "requests", "errors", "CPU s", "requests/CPU-s", "vs aiohttp keep-alive"],
    )
    results = {variant: run_variant(variant, url, seconds) for variant in VARIANTS}
    base = results["aiohttp-keepalive"]["requests"] / results["aiohttp-keepalive"]["cpu_s"]
    for variant, r in results.items():
        per_cpu = r["requests"] / r["cpu_s"] if r["cpu_s"] else 0.0
        table.add(
            variant, fmt(r["requests"]), fmt(r["errors"]), fmt(r["cpu_s"], 2), fmt(per_cpu), f"{per_cpu / base:.2f}x"
        )
    table.notes += [f"{variant}: {what}" for variant, what in VARIANTS.items()]
    table.notes.append(f"{seconds:g} s per client after 0.5 s of warm-up; CPU is time.process_time() of the client.")
    return table


async def run(args: argparse.Namespace) -> list[Table]:
    deadline = time.monotonic() + BUDGET_S
    tables: list[Table] = []

    async def section(name: str, needs_s: float, body: Callable[[], Awaitable[list[Table]]]) -> None:
        left = deadline - time.monotonic()
        if name not in args.sections:
            return
        if left < needs_s:
            tables.append(
                Table(f"{name}: skipped", ["reason"], [[f"{left:.0f} s of the budget left, needs {needs_s:g}"]])
            )
            return
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        try:
            done = await body()
        except Exception as exc:
            traceback.print_exc()
            done = [Table(f"{name}: FAILED", ["error"], [[f"{type(exc).__name__}: {exc}"]])]
        for table in done:
            CONSOLE.print(table.rich())
            CONSOLE.print()
        tables.extend(done)

    async with AsyncExitStack() as stack:
        nginx, nats, bus = await environment(stack)

        async def scale_runs() -> list[ScaleResult]:
            apps = {f"scale{i:02d}": args.scale_targets // 10 for i in range(10)}
            apply_config(write_config("scale", apps, nginx.port), nats.url)
            results = []
            for workers in args.scale_workers:
                if deadline - time.monotonic() < args.scale_window + 45:
                    break
                print(f"[{time.strftime('%H:%M:%S')}]   workers={workers}", flush=True)
                results.append(
                    await run_scale(
                        nats, bus, nginx, targets=args.scale_targets, workers=workers, window=args.scale_window
                    )
                )
            return results

        async def transports() -> list[Table]:
            return [transports_table(nginx.health_url, args.transport_seconds)]

        async def cost() -> list[Table]:
            samples = await probe_cost_samples(nats, bus, nginx, instances=args.cost_instances, window=args.cost_window)
            title = "Probe cost: probes per CPU-second of the probing process (same nginx /health, same window)"
            return [probe_cost_table(samples, title)]

        async def scale() -> list[Table]:
            title = f"Scale: {args.scale_targets:,} targets, period_seconds 1, one prober service (keep_alive: true)"
            return [scale_table(await scale_runs(), title)]

        async def breaker() -> list[Table]:
            return await asyncio.to_thread(breaker_tables)

        await section("transports", 45, transports)
        await section("cost", 30 + 4 * args.cost_window, cost)
        await section("scale", args.scale_window + 75, scale)
        await section("detector", 90, detector_tables)
        await section("breaker", 60, breaker)
        await section("reporter", 90, reporter_tables)
        await section("recovery", 90, recovery_tables)
        await section("alerter", 60, alerter_tables)

        async def faults() -> list[Table]:
            return await asyncio.to_thread(fault_tables)

        await section("faults", 150, faults)

        async def cluster() -> list[Table]:
            return await cluster_tables(nginx.port)

        await section("cluster", 120, cluster)  # 80-155 s measured

        async def replicas() -> list[Table]:
            return [*await prober_replica_tables(nginx.port), *await detector_replica_tables()]

        await section("replicas", 150, replicas)

        async def sizing() -> list[Table]:
            return await sizing_tables(tables)  # from the sections above: run it last

        await section("sizing", 45, sizing)
    return tables


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sections",
        default="transports,cost,scale,detector,breaker,reporter,recovery,alerter,faults,cluster,replicas,sizing",
        type=lambda s: s.split(","),
    )
    parser.add_argument("--transport-seconds", type=float, default=4.0)
    parser.add_argument("--cost-instances", type=int, default=1000)
    parser.add_argument("--cost-window", type=float, default=15.0)
    parser.add_argument("--scale-targets", type=int, default=10_000)
    parser.add_argument("--scale-workers", default="1,2", type=lambda s: [int(w) for w in s.split(",")])
    parser.add_argument("--scale-window", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="print the tables only; leave RESULTS.md alone")
    args = parser.parse_args()

    # Ctrl-C and SIGTERM unwind the run (every finally block stops its processes) at once,
    # whatever is awaited: asyncio's own SIGINT handling only cancels the main task, and a
    # library that swallows that cancellation (nats-py does, in places) would carry on.
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    shutil.rmtree(LOG_DIR, ignore_errors=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.UTC)
    wall0 = time.monotonic()
    speed_before = machine_speed_ms()
    tables = asyncio.run(run(args))
    speed = (speed_before, machine_speed_ms())
    wall = time.monotonic() - wall0
    CONSOLE.print(f"wall time {wall:.0f} s; logs and scratch files under {WORK_DIR}")
    if not args.no_write:
        if sys.argv[1:]:
            command, detail = f".venv/bin/python bench/run.py {' '.join(sys.argv[1:])}", ""
        else:
            command, detail = "make bench", ", which runs `.venv/bin/python bench/run.py`"
        write_report(BENCH_DIR / "RESULTS.md", "AutoServe Health benchmarks", command, tables, wall, started, detail,
                     speed)  # fmt: skip
        CONSOLE.print(f"wrote {BENCH_DIR / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
