"""The container image, built and run for real: ``make image`` (a Debian base made here
with debootstrap, since nothing can be pulled, then deploy/Dockerfile), ``--help`` from the
image, and the detector from the image against the test's nats-server on 127.0.0.1
(host networking): it becomes ready, its durable consumer appears on the server, and
``docker stop`` (SIGTERM) ends it with exit status 0.

The first build on a machine takes minutes (base ~45 s, image ~80 s measured here, more on
a busy machine); later ones reuse the base and Docker's layer cache."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from nats.aio.client import Client

from autoserve_cli.services import SERVICES
from autoserve_events import PROBES_STREAM
from autoserve_runtime import EmbeddedNatsServer, free_port, provision

from .conftest import LOCALHOST

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "autoserve:dev"
BUILD_TIMEOUT = 840.0  # seconds; the test's own timeout is 900

pytestmark = pytest.mark.timeout(900)


def progress(started: float, line: str) -> None:
    print(f"[image {time.monotonic() - started:6.1f}s] {line}", flush=True)


def docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    """``make image``, its output printed as it goes (``pytest -s`` shows it live)."""
    started = time.monotonic()
    progress(started, "make image (reuses autoserve-base:bookworm and the layer cache when present)")
    build = subprocess.Popen(
        ["make", "--no-print-directory", "image", f"IMAGE={IMAGE}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    tail: list[str] = []
    assert build.stdout is not None
    for line in build.stdout:  # ends when make exits; pytest-timeout bounds the whole
        line = line.rstrip()
        if line.startswith("WARNING: Location"):  # this host's pip config, not the build
            continue
        tail = [*tail[-40:], line]
        progress(started, line)
    returncode = build.wait(timeout=BUILD_TIMEOUT)
    assert returncode == 0, "make image failed:\n" + "\n".join(tail)
    progress(started, "built")
    return IMAGE


def test_the_image_runs_autoserve_as_a_non_root_user_with_nothing_secret_in_it(image: str) -> None:
    helped = docker("run", "--rm", "--network", "host", image, "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: autoserve run")
    assert "{" + ",".join(SERVICES) + "}" in helped.stdout  # the service is the command

    (config,) = json.loads(docker("image", "inspect", image).stdout)
    assert config["Config"]["User"] == "10001"
    assert config["Config"]["Entrypoint"] == ["autoserve", "run"]
    env = dict(item.split("=", 1) for item in config["Config"]["Env"])
    assert not [name for name in env if any(word in name for word in ("PASSWORD", "TOKEN", "SECRET", "CREDS"))]
    assert env["AUTOSERVE_METRICS_HOST"] == "0.0.0.0"

    # Installed packages (not editable, no sources), Python 3.11, the embedded ClickHouse
    # (the reporter's heaviest native dependency) loads on this base, no pip left.
    script = (
        "import sys, importlib.util, autoserve_detector, autoserve_reporter, chdb;"
        "print(sys.version_info[:2] == (3, 11));"
        "print(autoserve_detector.__file__.startswith('/opt/autoserve/lib/python3.11/site-packages/'));"
        "print(chdb.query('SELECT 40 + 2', 'CSV').bytes().decode().strip());"
        "print(importlib.util.find_spec('pip') is None)"
    )
    checked = docker("run", "--rm", "--network", "host", "--entrypoint", "python3", image, "-c", script)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.split() == ["True", "True", "42", "True"]
    listing = docker(
        "run", "--rm", "--network", "host", "--entrypoint", "sh", image, "-c", "id -u; ls -A /src 2>&1 || true"
    )
    uid, *rest = listing.stdout.splitlines()
    assert uid == "10001"
    assert "No such file" in " ".join(rest)  # the build's sources and wheels stay in the build stage


async def test_the_detector_from_the_image_becomes_ready_and_stops_with_exit_0_on_sigterm(
    image: str, nats_server: EmbeddedNatsServer, nc: Client, docker_containers: list[str]
) -> None:
    await provision(nc.jetstream())
    port = free_port()
    started = await asyncio.to_thread(
        docker, "run", "-d", "--network", "host",
        "-e", f"AUTOSERVE_NATS_URL={nats_server.url}",
        "-e", f"AUTOSERVE_METRICS_PORT={port}", "-e", f"AUTOSERVE_METRICS_HOST={LOCALHOST}",
        image, "detector",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    container = started.stdout.strip()
    docker_containers.append(container)

    def logs() -> str:
        shown = docker("logs", container)
        return shown.stdout + shown.stderr

    def running() -> bool:
        return docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip() == "true"

    # Ready: /readyz answers 200 (NATS connected, consumer bound, replay done).
    deadline = time.monotonic() + 90
    status, body = 0, ""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while status != 200:
            assert time.monotonic() < deadline, f"not ready after 90 s (last {status} {body}); logs:\n{logs()}"
            assert running(), f"the container exited; logs:\n{logs()}"
            try:
                async with http.get(f"http://{LOCALHOST}:{port}/readyz") as response:
                    status, body = response.status, await response.text()
            except aiohttp.ClientError as error:
                status, body = 0, repr(error)
            if status != 200:
                await asyncio.sleep(0.2)
        async with http.get(f"http://{LOCALHOST}:{port}/metrics") as response:
            assert response.status == 200 and "autoserve_ready 1.0" in await response.text()

    # It really is the detector on the test's server: its durable consumer is there.
    info = await nc.jetstream().consumer_info(PROBES_STREAM, "autoserve-detector")
    assert info.config.durable_name == "autoserve-detector"

    # SIGTERM drains it; Docker would SIGKILL (exit 137) after 30 s, so 0 means a clean stop.
    stopped = await asyncio.to_thread(docker, "stop", "-t", "30", container, timeout=90)
    assert stopped.returncode == 0, stopped.stderr
    state = json.loads(docker("inspect", "-f", "{{json .State}}", container).stdout)
    assert (state["Status"], state["ExitCode"], state["OOMKilled"]) == ("exited", 0, False), logs()
    lines = [line for line in logs().splitlines() if line.startswith("{")]
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)  # JSON logs, as configured
