"""Chaos under ``autoserve up --demo``: real processes killed for real, on 127.0.0.1.

One ``up`` (embedded nats-server, the six services, the demo targets) runs for the module,
and the tests take it through what happens in any real week, in order:

1. nats-server SIGKILLed three times: ``up`` starts it again on the same store, and each
   time a broken target still goes FailureDetected -> RecoveryExecuted -> healthy;
2. each service SIGKILLed in turn: ``up`` starts it again, the others keep running, and
   what ``status --json`` says of the steady instances is the same before and after;
3. the bad inputs of the fault-tolerance issue (items 3-8), each with its outcome;
4. ``up`` itself SIGKILLed: no process it started is left.

It uses the demo's fixed ports (services 9461-9466, targets 18081-18095, report API 8710),
so nothing else may run beside it, as in ``make test``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from nats.aio.msg import Msg

from autoserve_cli.services import SERVICES
from autoserve_events import (
    APPS_BUCKET,
    EVENTS_STREAM,
    PROBES_STREAM,
    FailureDetected,
    HealthChanged,
    ProbeCompleted,
    RecoveryExecuted,
    decode,
    durables,
    encode,
    subject_for,
)
from autoserve_runtime import connect, free_port, live_keys
from autoserve_runtime.nats_server import free_ports

from ..support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo.yaml"
# Instances whose health holds still in the demo: web-2 flaps and web-3 crashes by design.
STEADY = {("web", "web-1"), ("slow-api", "api-1"), ("cache", "cache-1"), ("missing", "gone-1")}

pytestmark = pytest.mark.timeout(600)


# -- the processes ---------------------------------------------------------------------------


def children_of(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid``: its command line, by pid (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(stat.parent.name)] = int(fields[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                with contextlib.suppress(OSError):
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    frontier.append(child)
    return found


def rss_kib(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1])  # type: ignore[index]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Up:
    data_dir: Path
    process: subprocess.Popen[bytes]
    log: Path
    nats_url: str = ""
    started: dict[str, int] = field(default_factory=dict)

    def pids(self) -> dict[str, int]:
        """``up``'s children by name: each service, nats-server, the demo targets."""
        named: dict[str, int] = {}
        for pid, command in children_of(self.process.pid).items():
            if match := re.search(r"autoserve_cli\.main run (\w+)", command):
                named[match.group(1)] = pid
            elif "nats-server" in command.split(" ")[0]:
                named["nats-server"] = pid
        return named

    def target_pid(self, app: str, instance: str) -> int:
        return int(json.loads((self.data_dir / "processes" / app / f"{instance}.json").read_text())["pid"])

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


# Each service's /healthz /readyz /metrics: `up` gives them this base port plus their place
# in its start order, so nothing else on the machine can answer for them.
METRICS_BASE = free_ports(len(SERVICES))


def ready(service: str) -> bool:
    port = METRICS_BASE + list(SERVICES).index(service)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


# The conditions here are HTTP and NATS round trips: look five times a second, not twenty.
until = functools.partial(wait_for, every=0.2)


async def all_ready(timeout: float = 90) -> None:
    for service in SERVICES:
        await until(lambda s=service: ready(s), timeout, f"{service} /readyz 200")


def autoserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autoserve_cli.main", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    data_dir = tmp_path_factory.mktemp("chaos")
    log = data_dir / "up.log"
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "autoserve_cli.main", "up", "--demo", "-c", str(DEMO), "--no-status",
             "--data-dir", str(data_dir), "--nats-port", str(port)],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "AUTOSERVE_METRICS_PORT": str(METRICS_BASE)},
        )  # fmt: skip
    running = Up(data_dir, process, log, nats_url=f"nats://127.0.0.1:{port}")
    try:
        asyncio.run(all_ready(timeout=120))
        running.started = running.pids()
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        for pid in children_of(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- watching the bus --------------------------------------------------------------------------


@dataclass
class Trail:
    """Events as they arrive (a core subscription: it follows reconnects by itself)."""

    events: list[tuple[float, object]] = field(default_factory=list)

    async def on_message(self, msg: Msg) -> None:
        with contextlib.suppress(Exception):
            self.events.append((time.time(), decode(msg.data)))

    def after(self, since: float, kind: type, app: str, instance: str) -> list:
        return [
            e for at, e in self.events
            if at >= since and isinstance(e, kind) and (e.app_name, e.instance_id) == (app, instance)
        ]  # fmt: skip


@contextlib.asynccontextmanager
async def watching(up: Up):  # type: ignore[no-untyped-def]
    nc = await connect(up.nats_url, "chaos-test", timeout=30)
    trail = Trail()
    await nc.subscribe("autoserve.event.>", cb=trail.on_message)
    try:
        yield nc, trail
    finally:
        await nc.close()


async def break_and_recover(up: Up, trail: Trail, app: str = "web", instance: str = "web-1") -> None:
    """SIGKILL a demo target: it must be detected, restarted by recovery and healthy again."""
    since = time.time()
    os.kill(up.target_pid(app, instance), signal.SIGKILL)
    await until(lambda: trail.after(since, FailureDetected, app, instance), 60, f"{instance}: FailureDetected")
    await until(
        lambda: any(r.success for r in trail.after(since, RecoveryExecuted, app, instance)),
        60, f"{instance}: a successful RecoveryExecuted",
    )  # fmt: skip
    await until(
        lambda: any(h.healthy for h in trail.after(since, HealthChanged, app, instance)), 60, f"{instance}: healthy"
    )


def status(url: str) -> list[dict]:
    result = autoserve("status", "--json", "--nats-url", url)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def changed_by_restart(before: list[dict], after: list[dict]) -> list[str]:
    """What the restart changed that time alone does not explain, for the steady instances:
    a health transition published again (its ``health_since`` moves), a closed breaker
    that moved, a last failure lost, gone back in time or published a second time. Newer
    failures are the demo going on (a high error rate is repeated every minute), not the
    restart."""
    old = {(r["app_name"], r["instance_id"]): r for r in before}
    new = {(r["app_name"], r["instance_id"]): r for r in after}
    problems = []
    for key in sorted(STEADY):
        b, a = old[key], new[key]
        if (a["health"], a["health_since"]) != (b["health"], b["health_since"]):
            problems.append(
                f"{key}: health {b['health']} since {b['health_since']} -> {a['health']} since {a['health_since']}"
            )
        if b["breaker"] == "closed" and (a["breaker"], a["breaker_since"]) != (b["breaker"], b["breaker_since"]):
            problems.append(f"{key}: breaker closed -> {a['breaker']}")
        failure_before, failure_after = b["last_failure"] or {}, a["last_failure"] or {}
        if failure_before and not (
            failure_after.get("timestamp", 0) > failure_before["timestamp"]
            or failure_after.get("event_id") == failure_before["event_id"]
        ):  # lost, gone back in time, or the same input's failure published a second time
            problems.append(f"{key}: last failure {failure_before} -> {failure_after}")
    return problems


# -- 0. a fresh system ---------------------------------------------------------------------------


async def test_the_first_events_of_the_fresh_system_reached_every_service(up: Up) -> None:
    async with watching(up) as (nc, _):
        js = nc.jetstream()
        for spec in durables.durable_specs():  # first in the module: before any restart recreates one
            info = await js.consumer_info(spec.stream, spec.name)
            first = await js.get_msg(spec.stream, 1)
            assert info.created <= first.time, f"{spec.name} was created after the first message was stored"
            if spec.stream == PROBES_STREAM and not spec.pull:
                await until(
                    lambda s=spec: _acked_past_first(js, s), 30, f"{spec.name}: sequence 1 acknowledged (stored)"
                )


async def _acked_past_first(js, spec: durables.DurableSpec) -> bool:  # type: ignore[no-untyped-def]
    info = await js.consumer_info(spec.stream, spec.name)
    return bool(info.ack_floor and info.ack_floor.stream_seq >= 1)


# -- 1. the bus ---------------------------------------------------------------------------------


async def test_a_nats_server_sigkilled_three_times_is_restarted_and_recovery_still_acts(up: Up) -> None:
    async with watching(up) as (nc, trail):
        await break_and_recover(up, trail)  # the baseline, before any fault
        for round_ in range(3):
            old = up.pids()["nats-server"]
            os.kill(old, signal.SIGKILL)
            await until(lambda o=old: up.pids().get("nats-server", o) != o, 30, f"nats-server restarted ({round_})")
            await until(lambda: nc.is_connected, 30, "the test's client reconnected")
            await all_ready(timeout=60)
            await break_and_recover(up, trail)
        assert up.process.poll() is None, up.output()


# -- 2. the services ------------------------------------------------------------------------------


async def test_each_service_sigkilled_is_restarted_alone_and_state_is_rebuilt(up: Up) -> None:
    for service in SERVICES:
        before_pids = up.pids()
        before = await asyncio.to_thread(status, up.nats_url)
        assert {(r["app_name"], r["instance_id"]) for r in before} >= STEADY, before
        os.kill(before_pids[service], signal.SIGKILL)
        await until(lambda s=service, p=before_pids: up.pids().get(s, p[s]) != p[s], 60, f"{service} restarted")
        await until(lambda s=service: ready(s), 90, f"{service} ready again")
        after_pids = up.pids()
        others = {n: p for n, p in before_pids.items() if n != service}
        assert {n: after_pids.get(n) for n in others} == others, f"only {service} may have a new process"
        after = await asyncio.to_thread(status, up.nats_url)
        assert not changed_by_restart(before, after), f"after {service} was restarted"
    assert up.process.poll() is None, up.output()


# -- 3. bad input, each with its outcome (items 3-8 of the fault-tolerance issue) -------------------


async def test_an_empty_config_file_changes_nothing_and_exits_2(up: Up, tmp_path: Path) -> None:
    async with watching(up) as (nc, _):
        apps = await live_keys(nc.jetstream(), APPS_BUCKET)
        for text in ("", "# nothing but a comment\n", "apps:\n"):
            empty = tmp_path / "empty.yaml"
            empty.write_text(text)
            result = await asyncio.to_thread(autoserve, "apply", "-c", str(empty), "--nats-url", up.nats_url)
            assert result.returncode == 2, (text, result.stdout, result.stderr)
            assert await live_keys(nc.jetstream(), APPS_BUCKET) == apps


async def test_a_bad_value_in_kv_survives_a_restarted_detector(up: Up) -> None:
    """A service started after a bad write keeps the app's last good spec: the detector
    goes on folding web's probes instead of refusing them as unconfigured."""
    letters: list[Msg] = []
    probes: list[Msg] = []
    async with watching(up) as (nc, _):
        await nc.subscribe("autoserve.deadletter.detector", cb=functools.partial(_append, letters))
        kv = await nc.jetstream().key_value("autoserve-apps")
        await kv.put("web", b'{"health_check": {"port": "not a port"}}')
        old = up.pids()["detector"]
        os.kill(old, signal.SIGKILL)
        await until(lambda: up.pids().get("detector", old) != old, 60, "detector restarted")
        await until(lambda: ready("detector"), 90, "detector ready")
        await nc.subscribe("autoserve.probe.completed.web.web-1", cb=functools.partial(_append, probes))
        await until(lambda: len(probes) >= 5, 30, "five more probes of web-1")
        metrics = await asyncio.to_thread(scrape, "detector")
        result = await asyncio.to_thread(autoserve, "apply", "-c", str(DEMO), "--nats-url", up.nats_url)
        assert result.returncode == 0, result.stderr
    assert not [m for m in letters if "'web'" in m.headers.get("Autoserve-Reason", "")]
    assert re.search(r'autoserve_config_invalid_keys\{[^}]*outcome="last_good"[^}]*\} 1\.0', metrics), metrics


async def _append(into: list[Msg], msg: Msg) -> None:
    into.append(msg)


def scrape(service: str) -> str:
    port = METRICS_BASE + list(SERVICES).index(service)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def test_a_hostile_target_costs_the_prober_no_memory(up: Up, tmp_path: Path) -> None:
    sent = 0

    async def eight_mb_of_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n")
            for _ in range(1024):
                line = b"X-Filler: " + b"a" * 8180 + b"\r\n"
                writer.write(line)
                await writer.drain()
                sent += len(line)
            writer.write(b"\r\n")
            await writer.drain()
        writer.close()

    port = free_port()
    server = await asyncio.start_server(eight_mb_of_headers, "127.0.0.1", port)
    config = yaml.safe_load(DEMO.read_text())
    config["apps"]["hostile"] = {
        "health_check": {"path": "/", "initial_delay_seconds": 0, "period_seconds": 1, "timeout_seconds": 1},
        "instances": [{"id": "h-1", "host": "127.0.0.1", "port": port}],
    }
    with_hostile = tmp_path / "hostile.yaml"
    with_hostile.write_text(yaml.safe_dump(config))
    probes: list[ProbeCompleted] = []
    async with watching(up) as (nc, _):

        async def on_probe(msg: Msg) -> None:
            probes.append(decode(msg.data))  # type: ignore[arg-type]

        await nc.subscribe("autoserve.probe.completed.hostile.h-1", cb=on_probe)
        try:
            result = await asyncio.to_thread(autoserve, "apply", "-c", str(with_hostile), "--nats-url", up.nats_url)
            assert result.returncode == 0, result.stderr
            await until(lambda: len(probes) >= 5, 60, "five probes of the hostile target")
        finally:
            server.close()
            result = await asyncio.to_thread(autoserve, "apply", "-c", str(DEMO), "--nats-url", up.nats_url)
            assert result.returncode == 0, result.stderr
    # The five received while the server answered (later ones, once it is closed, are refused).
    hostile = probes[:5]
    assert not any(p.is_healthy for p in hostile), [p.error for p in hostile]
    assert all("header" in (p.error or "").lower() for p in hostile), [p.error for p in hostile]
    rss_kb = rss_kib(up.pids()["prober"])
    assert rss_kb < 150_000, f"prober RSS {rss_kb} kB after 8 MB header responses"


async def test_dead_letters_of_several_services_are_each_stored(up: Up) -> None:
    async with watching(up) as (nc, _):
        js = nc.jetstream()
        before = (await js.stream_info(EVENTS_STREAM, subjects_filter="autoserve.deadletter.>")).state.subjects or {}
        await js.publish("autoserve.probe.completed.web.web-1", b"\x00\xffnot json")

        async def each_stored_one_more() -> bool:
            info = await js.stream_info(EVENTS_STREAM, subjects_filter="autoserve.deadletter.>")
            now = info.state.subjects or {}
            return all(
                now.get(f"autoserve.deadletter.{s}", 0) > before.get(f"autoserve.deadletter.{s}", 0)
                for s in ("detector", "breaker", "reporter")
            )

        await until(each_stored_one_more, 30, "a stored dead letter from the detector, the breaker and the reporter")


async def test_a_probe_for_an_app_nobody_configured_becomes_no_instance(up: Up) -> None:
    letters: list[Msg] = []
    async with watching(up) as (nc, _):

        async def on_letter(msg: Msg) -> None:
            letters.append(msg)

        await nc.subscribe("autoserve.deadletter.detector", cb=on_letter)
        phantom = ProbeCompleted(instance_id="g-1", app_name="ghost", check_type="http", is_healthy=False,
                                 response_time_ms=1.0, timestamp=time.time(), error="made up")  # fmt: skip
        for _ in range(5):
            await nc.jetstream().publish(subject_for(phantom), encode(phantom))
        await until(
            lambda: any("app 'ghost' is not configured" in m.headers.get("Autoserve-Reason", "") for m in letters),
            30, "the phantom probe dead-lettered as unconfigured",
        )  # fmt: skip
    rows = await asyncio.to_thread(status, up.nats_url)
    assert not [r for r in rows if r["app_name"] == "ghost" and r["health"] != "unknown"]
    assert not [r for r in rows if r["app_name"] == "ghost" and r["alert"]]


# -- 4. up itself -------------------------------------------------------------------------------------


async def test_a_sigkilled_up_leaves_no_process_behind(up: Up) -> None:
    started = children_of(up.process.pid)
    records = [json.loads(p.read_text())["pid"] for p in (up.data_dir / "processes").glob("*/*.json")]
    restarted = [pid for pid in records if alive(pid) and pid not in started]
    assert restarted, "a target recovery restarted (not up's child) should be running"
    everything = set(started) | {pid for pid in records if alive(pid)}
    up.process.kill()
    up.process.wait()
    await until(lambda: not [pid for pid in everything if alive(pid)], 30, "every process up started to be gone")
