"""Sizing: what 100,000 targets probed every 10 s need, computed from what this run measured.

Measured here, in this section: the bytes one probe result takes in AUTOSERVE_PROBES (a
scratch nats-server, 20,000 representative results) and in ClickHouse (chDB, the reporter's
own schema, 1,000,000 generated probes, merged). Measured by the sections before it in the
same run: CPU per event of the prober, the detector and the reporter. Computed: everything
scaled to the target load (events/s x CPU per event = cores; bytes x events = bytes/day).
"""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from collections.abc import Sequence

from autoserve_events import PROBES_STREAM, encode, headers_for, subject_for
from autoserve_reporter.adapters.clickhouse import Store
from autoserve_reporter.adapters.migrations import migrate
from autoserve_reporter.core.rows import METRICS_TABLE
from autoserve_runtime import connect, provision
from bench.common import WORK_DIR, Table, fmt, nats_server
from bench.reporter import GENERATE, probe

TARGETS = 100_000
PERIOD_S = 10.0
MEMBER_CORES = 0.5  # a member is sized to use half a core at this load, leaving room for bursts
MIN_MEMBERS = 2  # a service runs at least twice, on different machines
DAY_S = 86_400


async def bus_bytes_per_probe(count: int = 20_000) -> float:
    """Stored bytes per probe result in a fresh AUTOSERVE_PROBES (message, subject, headers)."""
    with nats_server("sizing-nats") as server:
        nc = await connect(server.url, "bench-sizing")
        try:
            js = nc.jetstream()
            await provision(js)
            now = time.time()
            pending = []
            for n in range(count):
                event = probe(n, now)
                pending.append(await js.publish_async(subject_for(event), encode(event), headers=headers_for(event)))
                if len(pending) >= 512:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
            state = (await js.stream_info(PROBES_STREAM)).state
            return state.bytes / state.messages
        finally:
            await nc.close()


async def clickhouse_bytes_per_probe(count: int = 1_000_000) -> float:
    """Bytes on disk per probe in the reporter's metrics table, after merges (chDB)."""
    directory = WORK_DIR / "sizing-chdb"
    shutil.rmtree(directory, ignore_errors=True)
    store = Store(f"chdb://{directory}")
    try:
        await migrate(store)
        await store.command(GENERATE, {"n": count, "start": time.time() - count / 10_000})
        await store.command(f"OPTIMIZE TABLE {METRICS_TABLE} FINAL")
        rows = await store.query(
            f"SELECT sum(bytes_on_disk) FROM system.parts WHERE active AND table = '{METRICS_TABLE}'"
        )
        return float(rows[0][0]) / count
    finally:
        await store.close()
        shutil.rmtree(directory, ignore_errors=True)


def cell(tables: Sequence[Table], title: str, row: str, column: str) -> float | None:
    """A number from a table of this run: the first table whose title starts with ``title``,
    its first row whose first cell starts with ``row``; None when that was not measured."""
    for table in tables:
        if table.title.startswith(title) and column in table.columns:
            index = list(table.columns).index(column)
            for cells in table.rows:
                if str(cells[0]).startswith(row):
                    try:
                        return float(str(cells[index]).replace(",", ""))
                    except ValueError:
                        return None
    return None


def cpu_per_event(tables: Sequence[Table]) -> dict[str, float | None]:
    """CPU seconds per event, by service, from the sections before this one."""
    probes_per_cpu = cell(tables, "Probe cost", "autoserve prober, keep_alive: true", "probes/CPU-s")
    reporter_cpu = cell(tables, "Reporter: ingestion", "reporter", "reporter CPU s")
    reporter_events = cell(tables, "Reporter: ingestion", "reporter", "events")
    detector_us = cell(tables, "Detector throughput with 1 and 2 members", "1", "CPU µs per event")
    return {
        "prober": 1 / probes_per_cpu if probes_per_cpu else None,
        "detector": detector_us / 1e6 if detector_us else None,
        "reporter": reporter_cpu / reporter_events if reporter_cpu and reporter_events else None,
    }


def sizing_table(tables: Sequence[Table], bus_bytes: float, clickhouse_bytes: float) -> Table:
    rate = TARGETS / PERIOD_S
    table = Table(
        f"Sizing: {TARGETS:,} targets, period_seconds {PERIOD_S:g} ({fmt(rate)} probe results/s)",
        ["what", "per event (measured)", "at this load (computed)", "members (computed)"],
    )
    for service, cpu in cpu_per_event(tables).items():
        if cpu is None:
            table.add(f"{service} CPU", "not measured in this run", "-", "-")
            continue
        cores = rate * cpu
        members = max(MIN_MEMBERS, math.ceil(cores / MEMBER_CORES))
        table.add(f"{service} CPU", f"{cpu * 1e6:.0f} µs", f"{cores:.2f} cores", str(members))
    table.add("bus: AUTOSERVE_PROBES", f"{bus_bytes:.0f} B", f"{rate * bus_bytes * DAY_S / 1e9:.1f} GB/day", "-")
    table.add(
        "ClickHouse: metric rows",
        f"{clickhouse_bytes:.1f} B",
        f"{rate * clickhouse_bytes * DAY_S / 1e9:.1f} GB/day",
        "-",
    )
    table.notes += [
        "per event: CPU seconds of the service's process per probe result it handles, from this run's "
        "'Probe cost' (prober, keep_alive: true), 'Detector throughput with 1 and 2 members' (1 member) and 'Reporter: ingestion' "
        "sections; bytes measured in this section (stream bytes per stored result; ClickHouse bytes on disk per "
        "probe after merges, 1,000,000 generated probes, 1 in 50 failing).",
        f"computed: cores = results/s x CPU per result; members = max({MIN_MEMBERS}, cores / {MEMBER_CORES} "
        "core each); GB/day = results/s x bytes x 86,400. The bus figure is per stream replica (R3 stores it "
        "three times); the probes stream keeps 24 h, the metric rows 30 days.",
        "Health changes, failures and alerts are far fewer than probe results (only transitions and failed "
        "probes) and are left out.",
    ]
    return table


async def sizing_tables(tables: Sequence[Table]) -> list[Table]:
    bus = await bus_bytes_per_probe()
    clickhouse = await clickhouse_bytes_per_probe()
    return [sizing_table(tables, bus, clickhouse)]
