"""Probe cost: our prober service against Debian's blackbox_exporter, probing the same nginx.

blackbox_exporter is driven by ``wrk`` on its ``/probe`` endpoint; its probes are wrk's
requests. Our prober is the real ``autoserve run prober`` process probing N instances every
second and publishing each result to a real nats-server; its probes are the ProbeCompleted
messages stored in AUTOSERVE_PROBES during the window (stream sequence numbers). CPU is
utime+stime from /proc/<pid>/stat over the same window, for each side.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass

from autoserve_runtime import EmbeddedNatsServer, free_port, spawn_child, stop_child
from bench.common import (
    LOG_DIR,
    WORK_DIR,
    Bus,
    CpuWindow,
    Nginx,
    ProberProcess,
    Table,
    apply_config,
    fmt,
    wait_for_port,
    wait_quiet,
    write_config,
)

BLACKBOX_CONFIG = """\
modules:
  http_2xx:
    prober: http
    timeout: 1s
    http:
      preferred_ip_protocol: ip4
      valid_status_codes: [200]
"""
WRK_CONNECTIONS = (4, 64)  # blackbox_exporter is measured at both; its better number is the baseline


@dataclass
class Sample:
    name: str
    probes: int
    cpu: dict[str, float]  # CPU seconds: "prober", "nginx", "nats", "other", and "wall"
    note: str = ""

    @property
    def per_cpu_s(self) -> float:
        return self.probes / self.cpu["prober"] if self.cpu["prober"] else 0.0

    def pct(self, group: str) -> str:
        return fmt(100 * self.cpu[group] / self.cpu["wall"])


def _wrk(url: str, seconds: float, connections: int) -> tuple[int, int]:
    """Requests and non-2xx responses of one wrk run."""
    wrk = shutil.which("wrk") or "/usr/bin/wrk"
    command = [wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", url]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        output, _ = process.communicate(timeout=seconds + 30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = output.decode()
    with (LOG_DIR / "wrk.log").open("a") as log:
        log.write(text)
    match = re.search(r"(\d+) requests in", text)
    if match is None or process.returncode != 0:
        raise RuntimeError(f"wrk failed: {text[-1000:]}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return int(match.group(1)), int(non_2xx.group(1)) if non_2xx else 0


def _probe_succeeds(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return "probe_success 1" in response.read().decode()


async def measure_blackbox(nats: EmbeddedNatsServer, nginx: Nginx, window: float, connections: int) -> Sample:
    port = free_port()
    config = WORK_DIR / "blackbox.yml"
    config.write_text(BLACKBOX_CONFIG)
    binary = shutil.which("prometheus-blackbox-exporter") or "/usr/bin/prometheus-blackbox-exporter"
    command = [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with (LOG_DIR / "blackbox.log").open("ab") as log:
        process = spawn_child(command, stdout=log, stderr=log)
    try:
        assert nginx.process is not None and nats.process is not None
        wait_url = f"http://127.0.0.1:{port}/probe?module=http_2xx&target={nginx.health_url}"
        wait_for_port(port, process, "blackbox_exporter")
        if not _probe_succeeds(wait_url):
            raise RuntimeError(f"blackbox_exporter cannot probe {nginx.health_url}")
        _wrk(wait_url, 2, connections)  # warm-up
        groups = {"prober": [process.pid], "nginx": [nginx.process.pid], "nats": [nats.process.pid]}
        await wait_quiet(groups)
        cpu = CpuWindow(groups)
        requests, non_2xx = _wrk(wait_url, window, connections)  # wrk's CPU is in own_cpu(), not "other"
        used = cpu.stop()
        still_ok = _probe_succeeds(wait_url)
    finally:
        stop_child(process, 5.0)
    note = f"wrk -c{connections}: non-2xx {non_2xx}, probe_success=1 after the run: {still_ok}"
    name = f"blackbox_exporter, wrk -t1 -c{connections} on /probe (new connection per probe)"
    return Sample(name, requests - non_2xx, used, note)


async def measure_prober(
    nats: EmbeddedNatsServer,
    bus: Bus,
    nginx: Nginx,
    *,
    instances: int,
    keep_alive: bool,
    window: float,
) -> Sample:
    label = f"cost-keepalive-{'on' if keep_alive else 'off'}"
    config = write_config(label, {"cost": instances}, nginx.port, keep_alive=keep_alive)
    apply_config(config, nats.url)
    await bus.purge()
    prober = ProberProcess(nats.url, workers=1, label=label).start()
    try:
        if not await bus.wait_for_probes(await bus.last_seq(), instances, timeout=30):
            raise RuntimeError(f"prober made no probes within 30 s; see {LOG_DIR}/{label}.log")
        await asyncio.sleep(2)  # warm-up: every worker on its rhythm, the pool filled
        assert nginx.process is not None and nats.process is not None
        groups = {"prober": prober.pids(), "nginx": [nginx.process.pid], "nats": [nats.process.pid]}
        await wait_quiet(groups)  # at least 1 s more of warm-up
        seq0 = await bus.last_seq()
        cpu = CpuWindow(groups)
        await asyncio.sleep(window)
        seq1 = await bus.last_seq()
        used = cpu.stop()
        if not prober.alive():
            raise RuntimeError(f"prober exited during the window; see {LOG_DIR}/{label}.log")
    finally:
        prober.stop()
    name = f"autoserve prober, keep_alive: {'true' if keep_alive else 'false'}"
    return Sample(name, seq1 - seq0, used, f"{instances} instances x 1/s")


async def probe_cost_samples(
    nats: EmbeddedNatsServer, bus: Bus, nginx: Nginx, *, instances: int, window: float
) -> list[Sample]:
    samples = [await measure_blackbox(nats, nginx, window, connections) for connections in WRK_CONNECTIONS]
    for keep_alive in (True, False):
        samples.append(
            await measure_prober(nats, bus, nginx, instances=instances, keep_alive=keep_alive, window=window)
        )
    return samples


def probe_cost_table(samples: list[Sample], title: str) -> Table:
    """``samples``: the blackbox_exporter rows first; the best of them is the baseline."""
    blackbox = [sample for sample in samples if sample.name.startswith("blackbox")]
    base = max(sample.per_cpu_s for sample in blackbox)
    table = Table(
        title,
        [
            "prober",
            "probes",
            "probes/s",
            "CPU s",
            "CPU %",
            "probes/CPU-s",
            "vs blackbox",
            "nginx CPU %",
            "nats CPU %",
            "other load CPU %",
        ],
    )
    for sample in samples:
        table.add(
            sample.name,
            fmt(sample.probes),
            fmt(sample.probes / sample.cpu["wall"]),
            fmt(sample.cpu["prober"], 2),
            sample.pct("prober"),
            fmt(sample.per_cpu_s),
            f"{sample.per_cpu_s / base:.2f}x" if base else "-",
            sample.pct("nginx"),
            sample.pct("nats"),
            sample.pct("other"),
        )
    goal = 3 * base
    for sample in samples:
        if sample not in blackbox:
            verdict = "met" if sample.per_cpu_s >= goal else "MISSED"
            table.notes.append(f"{sample.name}: goal >= 3x blackbox ({fmt(goal)}/CPU-s) {verdict}; {sample.note}")
    table.notes += [
        "blackbox_exporter: " + "; ".join(sample.note for sample in blackbox) + ". "
        "'vs blackbox' compares with its better row.",
        f"Window {samples[0].cpu['wall']:.0f} s per row; CPU % is of one core (200 % = the whole machine).",
        "Our CPU includes building and publishing every ProbeCompleted to JetStream (acked); nats-server's CPU "
        "is shown apart, as wrk's CPU is not counted for blackbox_exporter.",
        "other load = machine busy time minus every process of this benchmark: load from outside (another test "
        "run on the machine) that competes for the 2 cores.",
    ]
    return table
