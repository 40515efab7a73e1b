"""Recovery benchmarks on a real Docker engine: time to serving again after a crash (the
container is SIGKILLed) and after a hang (the process is stopped but still running),
beside Docker's own ``--restart=always`` and a bare ``docker restart -t 0``.

The prober, detector and recovery run as the real ``autoserve run`` processes against
their own nats-server. Containers use host networking and listen on 127.0.0.1; the image
is built locally (``docker import`` of the static busybox), nothing is pulled.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiodocker

from autoserve_cli.apply import store_config
from autoserve_config import load_config_text
from autoserve_events import EVENTS_STREAM, HealthChanged, ProbeCompleted, RecoveryExecuted, decode, wildcard
from autoserve_runtime import EmbeddedNatsServer, connect, free_port, provision, spawn_child, stop_child
from bench.common import LOG_DIR, VENV_BIN, WORK_DIR, Table, until

IMAGE = "autoserve-bench/busybox:1"
APP = "mttr"
SAMPLES = 20
PERIOD, THRESHOLD = 1, 2  # the hang scenario's probe: period_seconds 1, failure_threshold 2
TIMEOUT = 1  # timeout_seconds: the seed's minimum, so equal to the period here


def build_image() -> None:
    """The static busybox with /www/health, imported as a local image (nothing is pulled)."""
    root = Path(tempfile.mkdtemp(prefix="autoserve-bench-image-"))
    try:
        (root / "bin").mkdir()
        (root / "www").mkdir()
        shutil.copy("/bin/busybox", root / "bin" / "busybox")
        (root / "www" / "health").write_text("ok\n")
        tar = subprocess.run(["tar", "-C", str(root), "-c", "."], check=True, capture_output=True).stdout
        subprocess.run(["docker", "import", "-", IMAGE], input=tar, check=True, capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def remove_containers(containers: list[str]) -> None:
    """Ours, and any the recovery service created for the app (recreate, replace)."""
    leftovers = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=autoserve.app={APP}"],
                               capture_output=True, text=True).stdout.split()  # fmt: skip
    if containers or leftovers:
        subprocess.run(["docker", "rm", "-f", *containers, *leftovers], capture_output=True)


def run_httpd(port: int, *extra: str) -> str:
    argv = ["docker", "run", "-d", "--network", "host", *extra, IMAGE,
            "/bin/busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www"]  # fmt: skip
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


async def serving(port: int) -> bool:
    """One GET /health on 127.0.0.1: a 200 within 0.5 s."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.5)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        status = await asyncio.wait_for(reader.readline(), 0.5)
        return status.split(b" ")[1:2] == [b"200"]
    except (OSError, TimeoutError, IndexError):
        return False
    finally:
        writer.close()


async def until_serving(port: int, started: float, timeout: float = 30.0) -> float:
    """Seconds from ``started`` (perf_counter) to the first 200; polled every 5 ms."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if await serving(port):
            return time.perf_counter() - started
        await asyncio.sleep(0.005)
    raise TimeoutError(f"127.0.0.1:{port} not serving within {timeout:g}s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def service(name: str, nats_url: str, *args: str) -> subprocess.Popen[bytes]:
    # 40 restarts in about 80 s: the global rate limit (30 a minute by default) would defer
    # the 31st by seconds, which is that bound working, not the time to recover.
    env = {**os.environ, "AUTOSERVE_LOG_FORMAT": "json", "AUTOSERVE_RECOVERY_REPLICA": "bench",
           "AUTOSERVE_RECOVERY_MAX_ACTIONS_PER_MINUTE": "1000"}  # fmt: skip
    with (LOG_DIR / f"recovery-bench-{name}.log").open("ab") as log:
        return spawn_child([str(VENV_BIN / "autoserve"), "run", name, "--nats-url", nats_url, *args],
                           stdout=log, stderr=log, env=env)  # fmt: skip


CONFIG = f"""
apps:
  {APP}:
    health_check: {{path: /health, period_seconds: {PERIOD}, timeout_seconds: {TIMEOUT}, failure_threshold: {THRESHOLD},
                    initial_delay_seconds: 0}}
    docker: {{label: autoserve.app={APP}}}
    # Every kill of the run is a new incident: no backoff, no restart budget in the way.
    recovery: {{max_restarts: 1000, backoff_initial_seconds: 0, backoff_max_seconds: 1}}
"""


class HangRun:
    """The hang target's samples, and where each one's time went (wall clock)."""

    def __init__(self, container: str, port: int) -> None:
        self.container, self.port = container, port
        self.probes: list[ProbeCompleted] = []  # the target's probe results, as they come
        self.total: list[float] = []
        self.phase: list[float] = []  # hang -> the first probe due after it (0..period: luck)
        self.from_probe: list[float] = []  # that probe due -> serving again
        self.detect: list[float] = []  # that probe due -> unhealthy HealthChanged received
        self.decide: list[float] = []  # -> the restart begins (RecoveryExecuted.timestamp)
        self.restart: list[float] = []  # the restart itself (RecoveryExecuted.duration_ms)
        self.serve: list[float] = []  # restart done -> the first 200 seen

    async def sample(self, unhealthy_at: dict[str, float], restarts: dict[str, RecoveryExecuted], delay: float) -> None:
        key = self.container[:12]
        unhealthy_at.pop(key, None)
        restarts.pop(key, None)
        pid = await asyncio.to_thread(lambda: int(subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Pid}}", self.container], capture_output=True, text=True).stdout))  # fmt: skip
        # The bench starts a sample just after a probe said healthy; a random delay puts the
        # hang anywhere in the probe period, as a real one is.
        await asyncio.sleep(delay)
        hung_wall, started = time.time(), time.perf_counter()
        os.kill(pid, signal.SIGSTOP)  # hung: the port accepts, nothing answers; Docker sees "running"
        total = await until_serving(self.port, started)
        served_wall = hung_wall + total
        await until(lambda: key in restarts and key in unhealthy_at, 10, "the restart recorded")
        event = restarts[key]
        first = min((p.scheduled_at or p.timestamp) for p in self.probes
                    if (p.scheduled_at or p.timestamp) >= hung_wall and not p.is_healthy)  # fmt: skip
        self.probes.clear()
        self.total.append(total)
        self.phase.append(first - hung_wall)
        self.from_probe.append(served_wall - first)
        self.detect.append(unhealthy_at[key] - first)
        self.decide.append(event.timestamp - unhealthy_at[key])
        self.restart.append(event.duration_ms / 1000)
        self.serve.append(served_wall - (event.timestamp + event.duration_ms / 1000))


async def recovery_tables(samples: int = SAMPLES) -> list[Table]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(build_image)
    shutil.rmtree(WORK_DIR / "nats-recovery", ignore_errors=True)
    server = EmbeddedNatsServer(WORK_DIR / "nats-recovery", log_file=LOG_DIR / "nats-recovery.log").start()
    nc = await connect(server.url, "bench-recovery", timeout=10)
    containers: list[str] = []
    children: list[subprocess.Popen[bytes]] = []
    healthy: dict[str, bool] = {}
    unhealthy_at: dict[str, float] = {}  # wall clock when the detector's unhealthy HealthChanged arrived
    restarts: dict[str, RecoveryExecuted] = {}
    try:
        js = nc.jetstream()
        await provision(js)
        await store_config(js, load_config_text(CONFIG))

        async def on_health(msg) -> None:  # type: ignore[no-untyped-def]
            event = decode(msg.data)
            if isinstance(event, HealthChanged):
                healthy[event.instance_id] = event.healthy
                if not event.healthy:
                    unhealthy_at.setdefault(event.instance_id, time.time())
            elif isinstance(event, RecoveryExecuted) and event.success:
                restarts.setdefault(event.instance_id, event)

        await nc.subscribe("autoserve.event.health.>", cb=on_health)
        await nc.subscribe("autoserve.event.recovery.>", cb=on_health)

        async def on_probe(msg) -> None:  # type: ignore[no-untyped-def]
            event = decode(msg.data)
            if isinstance(event, ProbeCompleted) and event.instance_id == hang[:12]:
                hang_run.probes.append(event)

        crash_port, hang_port = free_port(), free_port()
        label = ["--label", f"autoserve.app={APP}"]
        crash = run_httpd(crash_port, *label, "--label", f"autoserve.port={crash_port}")
        hang = run_httpd(hang_port, *label, "--label", f"autoserve.port={hang_port}")
        hang_run = HangRun(hang, hang_port)
        await nc.subscribe(wildcard(ProbeCompleted, APP, "*"), cb=on_probe)
        policy_ports = [free_port() for _ in range(3)]  # rotated: Docker's backoff resets after 10 s up
        policy = [run_httpd(port, "--restart=always") for port in policy_ports]
        bare_port = free_port()
        bare = run_httpd(bare_port)
        containers += [crash, hang, *policy, bare]
        children += [service(name, server.url, *extra) for name, extra in
                     (("detector", ()), ("prober", ("--docker",)), ("recovery", ("--docker",)))]  # fmt: skip

        async def recovery_bound() -> bool:
            try:
                await js.consumer_info(EVENTS_STREAM, "autoserve-recovery")
                return True
            except Exception:
                return False

        await until(recovery_bound, 60, "recovery consuming")
        await until(lambda: all(healthy.get(c[:12]) for c in (crash, hang)), 60, "both containers healthy")

        crash_s: list[float] = []
        policy_s: list[float] = []
        bare_s: list[float] = []
        rng = random.Random(20)  # the same hang moments every run
        async with aiodocker.Docker() as docker:
            for i in range(samples):
                # Docker ignores its policy after `docker kill` (a manual stop): kill the process.
                pid = (await docker.containers.container(policy[i % 3]).show())["State"]["Pid"]
                started = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                policy_s.append(await until_serving(policy_ports[i % 3], started))

                started = time.perf_counter()
                await docker.containers.container(bare).restart(t=0)
                bare_s.append(await until_serving(bare_port, started))

                await until(lambda: healthy.get(crash[:12]), 30, "crash target healthy")
                started = time.perf_counter()
                await docker.containers.container(crash).kill()
                crash_s.append(await until_serving(crash_port, started))

                await until(lambda: healthy.get(hang[:12]), 30, "hang target healthy")
                await hang_run.sample(unhealthy_at, restarts, rng.uniform(0, PERIOD))

        crash_table = Table(
            f"Crash MTTR: SIGKILL to serving again ({samples} kills each, same run)",
            ["who restarts it", "p50 s", "p95 s", "max s"],
        )
        for name, values in (
            ("autoserve recovery (die -> FailureDetected -> restart)", crash_s),
            ("Docker --restart=always", policy_s),
            ("reference: docker restart -t 0 of a running container", bare_s),
        ):
            crash_table.add(
                name, f"{percentile(values, 0.5):.3f}", f"{percentile(values, 0.95):.3f}", f"{max(values):.3f}"
            )
        ratio = percentile(crash_s, 0.95) / percentile(policy_s, 0.95)
        crash_table.notes += [
            f"Goal: p95 <= 0.5 s and within about 2x of Docker's policy: p95 {percentile(crash_s, 0.95):.3f} s, "
            f"{ratio:.1f}x Docker's p95.",
            "The path never waits for probe thresholds: the Docker die event becomes ContainerObserved, the detector "
            "publishes CONTAINER_STOPPED at once, the recovery service restarts on it and waits for the start event.",
            "The recovery service runs with AUTOSERVE_RECOVERY_MAX_ACTIONS_PER_MINUTE=1000: the run restarts 40 times "
            "in about 80 s, and the default global limit (30 a minute) would hold the 31st back by seconds.",
            "Docker's policy acts on a process that dies, not on `docker kill` (a manual stop), so its process is "
            "SIGKILLed from the host. Its containers are rotated (3 of them) so its own restart backoff (100 ms doubling, reset "
            "after 10 s up) does not inflate its numbers.",
        ]
        bare = statistics.median(bare_s)
        floor = THRESHOLD * PERIOD + bare
        hang_table = Table(
            f"Hang MTTR: health endpoint stops answering, process still running ({samples} hangs)",
            ["probe, and where the time goes", "p50 s", "p95 s", "max s", "floor s"],
        )

        def row(name: str, values: list[float], reference: str) -> None:
            hang_table.add(name, f"{percentile(values, 0.5):.3f}", f"{percentile(values, 0.95):.3f}",
                           f"{max(values):.3f}", reference)  # fmt: skip

        run = hang_run
        row("autoserve: hang to serving again", run.total, f"{floor:.3f}")
        row("  luck: hang to the first probe due after it", run.phase, f"0..{PERIOD:g}")
        row("autoserve: that probe to serving again", run.from_probe, f"{floor:.3f}")
        row(
            f"  detection: {THRESHOLD} probes time out, unhealthy HealthChanged",
            run.detect,
            f"{THRESHOLD * TIMEOUT:.3f}",
        )
        row("  decision: HealthChanged to the restart call", run.decide, "-")
        row("  restart: docker restart -t 0 to its start event", run.restart, f"{bare:.3f}")
        row("  serving: start event to the first 200", run.serve, "-")
        hang_table.add("Docker --restart=always", "never", "never", "never", "-")
        over = percentile(run.from_probe, 0.95) - floor
        hang_table.notes += [
            f"period_seconds {PERIOD}, timeout_seconds {TIMEOUT} (the seed's minimum), failure_threshold {THRESHOLD}; "
            "the floor is threshold x period + a bare restart (median of the crash table's reference row).",
            "A hang starts anywhere in the probe period (the bench waits a random 0..1 s before each), so the first "
            "probe that can fail comes 0..1 period later (the 'luck' row). That wait is in every health-check-based detector and no recovery work can "
            "shorten it; the floor leaves it out, so hang-to-serving is floor + 0..1 s by construction and its p95 "
            f"is about floor + 0.95 s. Measured from that first probe: p95 - floor = {over:+.3f} s (goal: within 0.5 s).",
            "Detection is threshold x timeout_seconds (a timed-out probe is followed at once by the slot it overlapped); "
            "decision, restart and serving are what recovery adds; HealthChanged is taken when the bench receives it.",
            "The hang is SIGSTOP of the container's process from the host: the kernel still accepts connections, "
            "nothing answers, and Docker reports the container running.",
        ]
        return [crash_table, hang_table]
    finally:
        for child in children:
            child.terminate()
        for child in children:
            stop_child(child, 30)
        await asyncio.to_thread(remove_containers, containers)
        await nc.close()
        server.stop()


if __name__ == "__main__":
    from rich.console import Console

    for table in asyncio.run(recovery_tables()):
        Console().print(table.rich())
