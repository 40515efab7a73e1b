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
import time
import urllib.request
from dataclasses import dataclass

from common import (
    LOG_DIR,
    WORK_DIR,
    Bus,
    Nginx,
    ProberProcess,
    Table,
    apply_config,
    cpu_seconds,
    fmt,
    total_cpu,
    wait_for_port,
    write_config,
)

from autoserve_runtime import EmbeddedNatsServer, free_port, spawn_child, stop_child

BLACKBOX_CONFIG = """\
modules:
  http_2xx:
    prober: http
    timeout: 1s
    http:
      preferred_ip_protocol: ip4
      valid_status_codes: [200]
"""
WRK_CONNECTIONS = 64


@dataclass
class Sample:
    name: str
    probes: int
    window_s: float
    cpu_s: float
    nginx_cpu_s: float
    other_cpu_s: float  # the load generator (wrk) or the bus (nats-server)
    note: str = ""

    @property
    def per_cpu_s(self) -> float:
        return self.probes / self.cpu_s if self.cpu_s else 0.0


def _wrk(url: str, seconds: float) -> tuple[int, int]:
    """Requests and non-2xx responses of one wrk run."""
    wrk = shutil.which("wrk") or "/usr/bin/wrk"
    command = [wrk, "-t1", f"-c{WRK_CONNECTIONS}", f"-d{seconds:g}s", "--timeout", "5s", url]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        output, _ = process.communicate(timeout=seconds + 30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = output.decode()
    (LOG_DIR / "wrk.log").open("a").write(text)
    match = re.search(r"(\d+) requests in", text)
    if match is None or process.returncode != 0:
        raise RuntimeError(f"wrk failed: {text[-1000:]}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(r"Socket errors: (.*)", text)
    if errors:
        (LOG_DIR / "wrk.log").open("a").write(f"socket errors: {errors.group(1)}\n")
    return int(match.group(1)), int(non_2xx.group(1)) if non_2xx else 0


def measure_blackbox(nginx: Nginx, window: float) -> Sample:
    port = free_port()
    config = WORK_DIR / "blackbox.yml"
    config.write_text(BLACKBOX_CONFIG)
    binary = shutil.which("prometheus-blackbox-exporter") or "/usr/bin/prometheus-blackbox-exporter"
    command = [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with (LOG_DIR / "blackbox.log").open("ab") as log:
        process = spawn_child(command, stdout=log, stderr=log)
    try:
        wait_for_port(port, process, "blackbox_exporter")
        url = f"http://127.0.0.1:{port}/probe?module=http_2xx&target={nginx.health_url}"
        with urllib.request.urlopen(url, timeout=5) as response:
            if "probe_success 1" not in response.read().decode():
                raise RuntimeError(f"blackbox_exporter cannot probe {nginx.health_url}")
        _wrk(url, 2)  # warm-up
        assert nginx.process is not None
        cpu0, nginx0 = cpu_seconds(process.pid), cpu_seconds(nginx.process.pid)
        t0 = time.monotonic()
        requests, non_2xx = _wrk(url, window)
        elapsed = time.monotonic() - t0
        cpu, nginx_cpu = cpu_seconds(process.pid) - cpu0, cpu_seconds(nginx.process.pid) - nginx0
        with urllib.request.urlopen(url, timeout=5) as response:
            still_ok = "probe_success 1" in response.read().decode()
    finally:
        stop_child(process, 5.0)
    note = f"wrk -t1 -c{WRK_CONNECTIONS}; non-2xx {non_2xx}; probe_success after: {int(still_ok)}"
    return Sample(
        "blackbox_exporter 0.23 (new connection per probe)", requests - non_2xx, elapsed, cpu, nginx_cpu, 0, note
    )


async def measure_prober(
    nats: EmbeddedNatsServer, bus: Bus, nginx: Nginx, instances: int, keep_alive: bool, window: float
) -> Sample:
    label = f"cost-keepalive-{'on' if keep_alive else 'off'}"
    config = write_config(label, {"cost": instances}, nginx.port, keep_alive=keep_alive)
    apply_config(config, nats.url)
    await bus.purge()
    prober = ProberProcess(nats.url, workers=1, label=label).start()
    try:
        if not await bus.wait_for_probes(await bus.last_seq(), instances, timeout=30):
            raise RuntimeError(f"prober made no probes within 30 s; see {LOG_DIR}/{label}.log")
        await asyncio.sleep(3)  # warm-up: every worker on its rhythm, the pool filled
        assert nginx.process is not None and nats.process is not None
        pids = prober.pids()
        seq0 = await bus.last_seq()
        cpu0, nginx0, nats0 = total_cpu(pids), cpu_seconds(nginx.process.pid), cpu_seconds(nats.process.pid)
        t0 = time.monotonic()
        await asyncio.sleep(window)
        seq1 = await bus.last_seq()
        cpu1, nginx1, nats1 = total_cpu(pids), cpu_seconds(nginx.process.pid), cpu_seconds(nats.process.pid)
        elapsed = time.monotonic() - t0
        if not prober.alive():
            raise RuntimeError(f"prober exited during the window; see {LOG_DIR}/{label}.log")
    finally:
        prober.stop()
    name = f"autoserve prober, keep_alive: {'true' if keep_alive else 'false'}"
    note = f"{instances} instances x 1/s; nats-server CPU {fmt(nats1 - nats0, 2)} s"
    return Sample(name, seq1 - seq0, elapsed, cpu1 - cpu0, nginx1 - nginx0, nats1 - nats0, note)


async def probe_cost_table(
    nats: EmbeddedNatsServer, bus: Bus, nginx: Nginx, *, instances: int, window: float
) -> tuple[Table, list[Sample]]:
    blackbox = measure_blackbox(nginx, window)
    ours = [await measure_prober(nats, bus, nginx, instances, keep_alive, window) for keep_alive in (True, False)]
    table = Table(
        "Probe cost: probes per CPU-second of the probing process (same nginx /health, same window)",
        ["prober", "probes", "window s", "probes/s", "CPU s", "CPU %", "probes/CPU-s", "vs blackbox", "nginx CPU s"],
    )
    for sample in [blackbox, *ours]:
        table.add(
            sample.name,
            fmt(sample.probes),
            fmt(sample.window_s, 1),
            fmt(sample.probes / sample.window_s),
            fmt(sample.cpu_s, 2),
            fmt(100 * sample.cpu_s / sample.window_s),
            fmt(sample.per_cpu_s),
            f"{sample.per_cpu_s / blackbox.per_cpu_s:.2f}x" if blackbox.per_cpu_s else "-",
            fmt(sample.nginx_cpu_s, 2),
        )
    goal = 3 * blackbox.per_cpu_s
    for sample in ours:
        verdict = "met" if sample.per_cpu_s >= goal else "MISSED"
        table.notes.append(f"{sample.name}: goal >= 3x blackbox ({fmt(goal)}/CPU-s) {verdict}; {sample.note}")
    table.notes.append(f"blackbox_exporter: {blackbox.note}")
    table.notes.append(
        "Our CPU includes building and publishing every ProbeCompleted to JetStream (acked); "
        "nats-server's own CPU is not counted, as wrk's is not counted for blackbox_exporter."
    )
    return table, [blackbox, *ours]
