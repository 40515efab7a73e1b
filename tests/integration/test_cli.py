"""The ``autoserve`` command line as an operator runs it: real processes, real NATS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from autoserve_events import APPS_BUCKET
from autoserve_runtime import EmbeddedNatsServer, free_port, live_keys

from ..conftest import plant_secret
from ..support.processes import http_server
from .conftest import LOCALHOST, check, config_for

ROOT = Path(__file__).resolve().parents[2]
AUTOSERVE = str(Path(sys.executable).parent / "autoserve")


def autoserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AUTOSERVE, *args], capture_output=True, text=True, timeout=timeout)


def apply(path: Path, url: str) -> subprocess.CompletedProcess[str]:
    return autoserve("apply", "-c", str(path), "--nats-url", url)


def write(path: Path, apps: dict) -> Path:
    path.write_text(config_for(apps))
    return path


def web(port: int = 18081, *ids: str) -> dict:
    return {
        "health_check": check(path="/ok"),
        "instances": [{"id": i, "host": LOCALHOST, "port": port} for i in ids or ("w-1",)],
    }


async def kv_keys(nc: Client) -> set[str]:
    return set(await live_keys(nc.jetstream(), APPS_BUCKET))


def test_check_accepts_a_good_file(tmp_path: Path) -> None:
    result = autoserve("check", "-c", str(write(tmp_path / "ok.yaml", {"web": web()})))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tmp_path / 'ok.yaml'}: ok (1 apps, 1 static instances)"


def test_check_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    bad = {"web": {"health_check": {"port": 0, "methd": "GET"}, "instances": [{"id": "a b", "host": LOCALHOST}]}}
    result = autoserve("check", "-c", str(write(tmp_path / "bad.yaml", bad)))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{tmp_path / 'bad.yaml'}: 3 problem(s), nothing applied:",
        "  apps.web.health_check.methd: unknown key (did you mean 'method'?)",
        "  apps.web.health_check.port: must be between 1 and 65535, got 0",
        "  apps.web.instances[0].id: name 'a b' must be 1-128 characters of [A-Za-z0-9_-]",
    ]


@pytest.fixture
def web_and_api(tmp_path: Path, nats_server: EmbeddedNatsServer) -> tuple[Path, str]:
    """A file with apps web and api, and the URL of the nats-server to apply it to."""
    return write(tmp_path / "both.yaml", {"web": web(), "api": web()}), nats_server.url


async def test_apply_is_declarative_and_a_bad_file_changes_nothing(
    tmp_path: Path, web_and_api: tuple[Path, str], nc: Client
) -> None:
    both, url = web_and_api
    result = apply(both, url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"applied to {url}: created: api, web"
    assert await kv_keys(nc) == {"web", "api"}

    assert apply(both, url).stdout.strip() == f"applied to {url}: unchanged: api, web"

    bad = write(tmp_path / "bad.yaml", {"web": {"health_check": {"port": -1}}})
    result = apply(bad, url)
    assert result.returncode == 2
    assert await kv_keys(nc) == {"web", "api"}  # nothing applied

    one = write(tmp_path / "one.yaml", {"web": web(18082)})
    assert apply(one, url).stdout.strip() == f"applied to {url}: updated: web; removed: api"
    assert await kv_keys(nc) == {"web"}


def test_apply_without_nats_says_so(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    result = apply(write(tmp_path / "ok.yaml", {"web": web()}), url)
    assert result.returncode == 1
    assert f"cannot reach NATS at {url}" in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "command"),
    [
        ("AUTOSERVE_DOCKER", "maybe", ["run", "prober"]),
        ("AUTOSERVE_RECOVERY_DOCKER", "yes", ["run", "recovery"]),
        ("AUTOSERVE_RECOVERY_DRAIN_SECONDS", "soon", ["run", "recovery"]),
        ("AUTOSERVE_RECOVERY_LEASE_SECONDS", "0", ["run", "recovery"]),
        ("AUTOSERVE_REPORTER_MIGRATE", "nope", ["run", "reporter"]),
        ("AUTOSERVE_METRICS_RETENTION_DAYS", "0", ["migrate"]),
    ],
)
def test_a_bad_setting_is_named_with_its_value_and_nothing_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str, command: list[str]
) -> None:
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("AUTOSERVE_DATA_DIR", str(tmp_path))
    nats = [] if command == ["migrate"] else ["--nats-url", f"nats://127.0.0.1:{free_port()}", "--metrics-port", "0"]
    result = autoserve(*command, *nats, timeout=60)
    assert result.returncode != 0
    assert value in result.stderr and ("retention" in result.stderr or variable in result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "clickhouse").exists()  # nothing created


def processes_mentioning(marker: str) -> list[int]:
    """Pids whose command line or environment mentions ``marker`` (our data dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in blob:
            found.append(int(entry.name))
    return found


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def start_up(tmp_path: Path, port: int, nats_port: int) -> subprocess.Popen[str]:
    config = write(tmp_path / "up.yaml", {"web": web(port, "w-1", "w-2")})
    return subprocess.Popen(
        [AUTOSERVE, "up", "-c", str(config), "--data-dir", str(tmp_path / "data"), "--nats-port", str(nats_port), "--no-status"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def wait_for_probes(nats_port: int) -> list[dict]:
    rows: list[dict] = []

    def probed() -> bool:
        nonlocal rows
        result = autoserve("status", "--json", "--nats-url", f"nats://127.0.0.1:{nats_port}", timeout=30)
        rows = json.loads(result.stdout) if result.returncode == 0 and result.stdout.strip() else []
        return len(rows) == 2

    wait_until(probed, 60, "both instances to show up in autoserve status")
    return rows


@pytest.fixture
def ok_target(tmp_path: Path) -> Iterator[int]:
    """A target answering /ok in its own process: the ``up`` tests are synchronous, so no
    server runs in their loop. Yields its port."""
    (tmp_path / "ok").write_text("ok")
    port = free_port()
    server = subprocess.Popen(http_server(port, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield port
    server.terminate()
    server.wait()


def test_up_runs_everything_and_stops_cleanly_on_sigterm(tmp_path: Path, ok_target: int) -> None:
    nats_port = free_port()
    up = start_up(tmp_path, ok_target, nats_port)
    try:
        rows = wait_for_probes(nats_port)
        assert {(r["app_name"], r["instance_id"]) for r in rows} == {("web", "w-1"), ("web", "w-2")}
        assert all(r["is_healthy"] and r["status_code"] == 200 for r in rows)
        assert processes_mentioning(str(tmp_path / "data"))  # nats-server and the prober are running

        up.send_signal(signal.SIGTERM)
        output, _ = up.communicate(timeout=60)
        assert up.returncode == 0, output
        assert "stopped" in output
        wait_until(lambda: not processes_mentioning(str(tmp_path / "data")), 10, "no process left behind")
    finally:
        if up.poll() is None:
            up.kill()


def report_of(app: str) -> dict | None:
    """``autoserve report APP --json`` as an operator types it (the default reporter URL)."""
    shown = autoserve("report", app, "--json", timeout=30)
    return json.loads(shown.stdout) if shown.returncode == 0 else None


def test_make_run_demo_gives_a_real_report_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """Issue 6's "done": after ``make run`` (``autoserve up --demo -c examples/demo.yaml``
    from the checkout), ``autoserve report <demo app>`` prints a real report. The data
    directory and the bus port are the test's own; everything else is the default."""
    plant_secret((ROOT / "examples" / "demo-webhook.secret").read_text(), "demo webhook HMAC secret")
    data = tmp_path / "data"
    up = subprocess.Popen(
        [AUTOSERVE, "up", "--demo", "-c", "examples/demo.yaml", "--data-dir", str(data),
         "--nats-port", str(free_port()), "--no-status"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        report: dict | None = None

        def reported() -> bool:
            nonlocal report
            assert up.poll() is None, up.communicate(timeout=30)[0][-3000:]
            report = report_of("web")
            return report is not None and report["total_health_checks"] > 0

        wait_until(reported, 120, "autoserve report web to show stored health checks")
        assert report is not None and report["app_name"] == "web" and report["status"] == "ok"
        assert report["total_health_checks"] == report["successful_checks"] + report["failed_checks"]
        assert report["uptime_percent"] is not None and report["avg_response_time_ms"] is not None
        assert {i["instance_id"] for i in report["instances"]} <= {"web-1", "web-2", "web-3"}

        table = autoserve("report", "web", timeout=30)
        assert table.returncode == 0, table.stderr
        assert table.stdout.startswith("web — last 24 h") and "uptime" in table.stdout, table.stdout
        assert "health checks" in table.stdout and "per instance" in table.stdout and "web-1" in table.stdout

        up.send_signal(signal.SIGINT)  # Ctrl-C, as `make run` is stopped
        output, _ = up.communicate(timeout=60)
        assert up.returncode == 0, output[-3000:]
        assert "stopped" in output
        wait_until(lambda: not processes_mentioning(str(data)), 20, "no process left behind")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_up_killed_outright_leaves_no_orphans(tmp_path: Path, ok_target: int) -> None:
    nats_port = free_port()
    up = start_up(tmp_path, ok_target, nats_port)
    wait_for_probes(nats_port)
    up.kill()  # SIGKILL: no cleanup code runs in `up`
    up.wait()
    wait_until(lambda: not processes_mentioning(str(tmp_path / "data")), 20, "children to die with their parent")


@pytest.mark.parametrize(
    ("service", "signals"),
    [("detector", 1), *((name, 2) for name in ("prober", "detector", "breaker", "recovery", "reporter"))],
)
def test_a_service_still_waiting_for_nats_stops_on_sigterm(tmp_path: Path, service: str, signals: int) -> None:
    """SIGTERM while still connecting: nothing to drain, so the service stops without waiting
    out the drain grace (one signal or two). Exit status 0."""
    dead = f"nats://127.0.0.1:{free_port()}"
    env = {**os.environ, "AUTOSERVE_DATA_DIR": str(tmp_path), "AUTOSERVE_REPORTER_LISTEN": f"127.0.0.1:{free_port()}"}
    log = tmp_path / "service.log"
    with log.open("w") as out:
        process = subprocess.Popen([AUTOSERVE, "run", service, "--nats-url", dead], env=env, stdout=out, stderr=out)
    try:
        wait_until(lambda: "nats error" in log.read_text(), 30, f"{service} to be retrying its connection")
        for _ in range(signals):
            process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()


STUBBORN = """
import asyncio
from autoserve_runtime.lifecycle import serve

async def run(stop):
    print("running", flush=True)  # the signal handlers are installed before run starts
    await stop.wait()
    print("stopping", flush=True)
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        print("cancellation swallowed", flush=True)  # as Python 3.11's wait_for can
    await asyncio.sleep(60)

raise SystemExit(serve("stubborn", run, grace_seconds=0.5))
"""


def test_a_service_that_swallows_its_cancellation_is_cancelled_again_and_stops(tmp_path: Path) -> None:
    env = {**os.environ, "AUTOSERVE_METRICS_PORT": "0"}
    log = tmp_path / "service.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-c", STUBBORN], env=env, stdout=out, stderr=out)
    try:
        wait_until(lambda: "running" in log.read_text() or process.poll() is not None, 30, "started")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert "cancellation swallowed" in text and text.count("stopping by cancellation") == 1, text[-2000:]
