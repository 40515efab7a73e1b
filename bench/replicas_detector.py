"""Detector throughput with 1 and 2 members in the same run, and the CPU each event costs.

Each run starts the members (real ``autoserve run detector`` processes) on a fresh
nats-server, waits until they have split the 64 partitions, pauses them (SIGSTOP, well
within their membership TTL), publishes a backlog of flapping probes, and resumes them:
from then until every member's durable has acknowledged the last probe is the time
measured, and the members' process CPU time over it is the cost. Every member receives
every input and skips (after decoding it) those of partitions it does not own; the
difference between the two runs' CPU is what that costs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass

from autoserve_detector.core.partitions import partition_of
from autoserve_detector.service import consumer_spec
from nats.js import JetStreamContext

from autoserve_cli.apply import store_config
from autoserve_cli.cluster_status import read_members
from autoserve_config import load_config_text
from autoserve_events import EVENTS_STREAM, PROBES_STREAM, decode, encode
from autoserve_runtime import connect, free_port, provision, spawn_child, stop_child
from bench.common import LOG_DIR, VENV_BIN, Table, cpu_seconds, fmt, machine_busy, nats_server, until
from bench.detector import INSTANCES, probe, publish_all

EVENTS = 60_000
CYCLE = 10  # the flapping fleet of bench/detector.py: 30 % of probes fail, 0.53 outputs per input
TTL = 60  # the members stay paused while the backlog is published: far within their lease


@dataclass
class Member:
    name: str
    url: str

    def start(self) -> Member:
        self.log = LOG_DIR / f"detector-member-{self.name}.log"
        env = {**os.environ, "AUTOSERVE_MEMBER": self.name, "AUTOSERVE_MEMBER_TTL": str(TTL),
               "AUTOSERVE_LOG_FORMAT": "json"}  # fmt: skip
        with self.log.open("wb") as out:
            command = [str(VENV_BIN / "autoserve"), "run", "detector", "--nats-url", self.url,
                       "--metrics-port", str(free_port())]  # fmt: skip
            self.process = spawn_child(command, stdout=out, stderr=out, env=env)
        return self

    def last(self, event: str) -> dict | None:
        found = None
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"event": "{event}"' in line:
                found = json.loads(line)
        return found

    def stop(self) -> None:
        self.process.send_signal(signal.SIGCONT)
        stop_child(self.process, 30)


async def _owned(js: JetStreamContext, names: list[str]) -> dict[str, int]:
    """Partitions each named detector member says it owns (``autoserve status``'s reading)."""
    return {r.member: int(r.owns.split()[0]) for r in await read_members(js)
            if r.service == "detector" and r.member in names and r.owns}  # fmt: skip


async def _run(members: int, events: int) -> dict[str, float]:
    server = nats_server(f"nats-detector-members-{members}").start()
    nc = await connect(server.url, "bench-detector-members", timeout=10)
    started: list[Member] = []
    try:
        js = nc.jetstream()
        await provision(js)
        instances = ", ".join(f"{{id: i{n}, host: 127.0.0.1, port: {9000 + n}}}" for n in range(INSTANCES))
        await store_config(js, load_config_text(
            "apps:\n  bench:\n    health_check: {failure_threshold: 3, success_threshold: 1, period_seconds: 1, "
            f"timeout_seconds: 1}}\n    instances: [{instances}]\n"))  # fmt: skip
        names = [f"m{k}" for k in range(members)]
        started = [Member(name, server.url).start() for name in names]
        for member in started:
            await until(lambda m=member: m.last("detector started") is not None, 60, f"member {member.name} ready")

        async def split() -> bool:
            owned = await _owned(js, names)
            return len(owned) == members and sum(owned.values()) == 64 and all(owned.values())

        await until(split, 30, "the members to split the partitions")
        for member in started:
            member.process.send_signal(signal.SIGSTOP)
        now = time.time()
        await publish_all(js, [probe(n, INSTANCES, now + n * 1e-6, CYCLE) for n in range(events)])
        last_seq = (await js.stream_info(PROBES_STREAM)).state.last_seq
        durables = [consumer_spec(k).durable for k in range(members)]
        pids = [m.process.pid for m in started]
        assert server.process is not None
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        nats_before, busy_before = cpu_seconds(server.process.pid), machine_busy()
        began = time.perf_counter()
        for member in started:
            member.process.send_signal(signal.SIGCONT)

        async def folded() -> bool:
            for durable in durables:
                info = await js.consumer_info(PROBES_STREAM, durable)
                if not info.ack_floor or info.ack_floor.stream_seq < last_seq:
                    return False
            return True

        await until(folded, 300, f"{members} member(s) to fold the backlog")
        seconds = time.perf_counter() - began
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
        nats_cpu = cpu_seconds(server.process.pid) - nats_before
        others = machine_busy() - busy_before - cpu - nats_cpu  # everything else on the machine, this bench too
        outputs = (await js.stream_info(EVENTS_STREAM)).state.messages
        for member in started:
            member.stop()
        stopped = [m.last("detector stopped") or {} for m in started]
        return {"seconds": seconds, "cpu": cpu, "nats_cpu": nats_cpu, "others": others, "outputs": outputs,
                "skipped": sum(s.get("skipped", 0) for s in stopped),
                "takeovers": sum(s.get("takeovers", 0) for s in stopped)}  # fmt: skip
    finally:
        for member in started:
            if member.process.poll() is None:
                member.stop()
        await nc.close()
        server.stop()


def skip_cost_us(samples: int = 50_000) -> tuple[float, float]:
    """In one process: decoding an input (what a member pays for one it skips, as the
    consumer decodes before the fold) and finding its partition (cached per instance)."""
    payloads = [encode(probe(n, INSTANCES, time.time(), CYCLE)) for n in range(samples)]
    started = time.perf_counter()
    decoded = [decode(p) for p in payloads]
    decode_us = (time.perf_counter() - started) / samples * 1e6
    cache: dict[tuple[str, str], int] = {}
    started = time.perf_counter()
    for event in decoded:
        key = (event.app_name, event.instance_id)
        if key not in cache:
            cache[key] = partition_of(*key)
    partition_us = (time.perf_counter() - started) / samples * 1e6
    return decode_us, partition_us


async def detector_replica_tables(events: int = EVENTS) -> list[Table]:
    table = Table(
        "Detector throughput with 1 and 2 members (ProbeCompleted folded and acknowledged by every member, "
        "outputs stored)",
        [
            "members",
            "events",
            "outputs",
            "events/s",
            "CPU s, all members",
            "CPU µs per event",
            "inputs skipped",
            "nats-server CPU s",
            "other CPU s on the machine",
        ],
    )
    runs = {members: await _run(members, events) for members in (1, 2)}
    for members, run in runs.items():
        table.add(members, fmt(events), fmt(run["outputs"]), fmt(events / run["seconds"]), f"{run['cpu']:.1f}",
                  f"{run['cpu'] / events * 1e6:.0f}", fmt(run["skipped"]), f"{run['nats_cpu']:.1f}",
                  f"{run['others']:.1f}")  # fmt: skip
    extra = (runs[2]["cpu"] - runs[1]["cpu"]) / events * 1e6
    decode_us, partition_us = skip_cost_us()
    table.notes += [
        f"{INSTANCES:,} instances, the flapping fleet of the detector throughput table. The members are paused "
        "while the backlog is published, then resumed together; measured until every member's durable has "
        "acknowledged the last probe. Process CPU time (user + system) of the detector processes over that time; "
        "the machine has 2 cores, shared with nats-server, this bench's own process and whatever else runs "
        "(the last column: CPU the machine spent outside the members and nats-server over the same time).",
        "Every member receives every input and skips those of the 64 partitions it does not own: the subjects "
        f"stay as they are. The second member adds {extra:.0f} µs of CPU per event in all: its share of the "
        "folding moves to it, and a copy of every delivery is added (nats-py's message handling, the consumer's "
        f"bookkeeping, the decode, the acks). Of that, decoding a ProbeCompleted takes {decode_us:.1f} µs and "
        f"finding its partition {partition_us:.2f} µs (measured in one process): skipping before the decode "
        "would save little; the delivery itself is the cost. Filtering per member on the server would need "
        "per-instance filter subjects (slow: nats-server#7014) or partitioned subjects (a contract change).",
    ]
    if any(run["takeovers"] for run in runs.values()):
        table.notes.append("A member took partitions over during the measurement: the numbers include a rebuild.")
    return [table]


if __name__ == "__main__":
    from rich.console import Console

    for result in asyncio.run(detector_replica_tables()):
        Console().print(result.rich())
