"""Real components for integration tests, all on 127.0.0.1: nats-server, HTTP/TCP targets,
and the prober service running in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg

from autoserve_cli.apply import store_config
from autoserve_config import load_config_text
from autoserve_events import EVENTS_STREAM, ProbeCompleted, decode, wildcard
from autoserve_prober.service import ProberService
from autoserve_runtime import EmbeddedNatsServer, connect, free_port, provision

from ..support.processes import LOCALHOST, http_server, recorded_process
from ..support.waiting import wait_for
from ..support.web import serving_app


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
    with EmbeddedNatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
async def nc(nats_server: EmbeddedNatsServer) -> AsyncIterator[Client]:
    client = await connect(nats_server.url, "test", timeout=10)
    yield client
    await client.close()


@dataclass
class Received:
    """Events that arrived on the documented subjects, read with plain nats-py."""

    messages: list[tuple[str, ProbeCompleted]] = field(default_factory=list)

    def of(self, app: str, instance: str) -> list[ProbeCompleted]:
        return [event for _, event in self.messages if (event.app_name, event.instance_id) == (app, instance)]

    def count(self, app: str, instance: str) -> int:
        return len(self.of(app, instance))


@pytest.fixture
async def probes(nc: Client) -> Received:
    received = Received()

    async def on_message(msg: Msg) -> None:
        event = decode(msg.data)
        assert isinstance(event, ProbeCompleted)
        received.messages.append((msg.subject, event))

    await nc.subscribe(wildcard(ProbeCompleted, "*", "*"), cb=on_message)
    return received


async def apply_yaml(nc: Client, text: str) -> None:
    await provision(nc.jetstream())
    await store_config(nc.jetstream(), load_config_text(text))


@pytest.fixture
async def prober(nats_server: EmbeddedNatsServer, nc: Client) -> AsyncIterator[ProberService]:
    """The real prober service, started against the real nats-server; stopped cleanly."""
    await provision(nc.jetstream())
    service = ProberService(nats_server.url, docker=False)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await wait_for(lambda: service.ready.is_set() or task.done(), what="prober ready")
    yield service
    stop.set()
    await asyncio.wait_for(task, 20)


def config_for(apps: dict) -> str:
    return yaml.safe_dump({"apps": apps})


def check(**overrides: object) -> dict:
    """A fast health check for tests: 1 s period, 1 s timeout, no initial delay."""
    return {"initial_delay_seconds": 0, "period_seconds": 1, "timeout_seconds": 1, **overrides}


# -- HTTP targets ----------------------------------------------------------------------


@dataclass
class HttpTarget:
    port: int
    requests: list[web.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    flaky_remaining: dict[str, int] = field(default_factory=dict)


async def _huge(request: web.Request) -> web.StreamResponse:
    """Sends without end; the prober must read a small bound and hang up."""
    response = web.StreamResponse()
    await response.prepare(request)
    chunk = b"x" * 65536
    with contextlib.suppress(ConnectionError, RuntimeError):
        for _ in range(2000):  # bounded: 128 MiB at most
            await response.write(chunk)
    return response


def respond(status: int = 200, text: str = "ok", headers: dict[str, str] | None = None):
    async def handler(_: web.Request) -> web.Response:
        return web.Response(status=status, text=text, headers=headers)

    return handler


def redirect(location: str):
    async def handler(_: web.Request) -> web.Response:
        raise web.HTTPFound(location)

    return handler


@pytest.fixture
async def http_target() -> AsyncIterator[HttpTarget]:
    target = HttpTarget(port=free_port())

    @web.middleware
    async def record(request: web.Request, handler):
        target.requests.append(request)
        target.bodies.append(await request.read())
        return await handler(request)

    async def flaky(request: web.Request) -> web.Response:
        """Fails the first N requests of each instance (N from the query), then succeeds."""
        instance = request.headers.get("X-Instance-ID", "")
        left = target.flaky_remaining.setdefault(instance, int(request.query.get("fail", "2")))
        if left > 0:
            target.flaky_remaining[instance] = left - 1
            return web.Response(status=503, text="warming up")
        return web.Response(text="ok")

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="too late")

    async def slowish(_: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response(text="ok, eventually")

    app = web.Application(middlewares=[record])
    app.router.add_route("*", "/ok", respond(text='{"status":"ok"}', headers={"Set-Cookie": "s=secret"}))
    app.router.add_get("/fail", respond(500, "boom"))
    app.router.add_get("/slow", slow)
    app.router.add_get("/slowish", slowish)
    app.router.add_get("/flaky", flaky)
    app.router.add_get("/huge", _huge)
    app.router.add_get("/redirect", redirect("/ok"))
    app.router.add_get("/redirect-loop", redirect("/redirect-loop"))
    app.router.add_get("/redirect-away", redirect(f"http://localhost:{target.port}/ok"))
    async with serving_app(app, target.port):
        yield target


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def named_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate that names 127.0.0.1 in its subjectAltName, as a verifying
    TLS client requires (trust it by pointing the client at it as its CA)."""
    cert, key = tmp_path / "named-cert.pem", tmp_path / "named-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def stored_events(nc: Client, kind: type) -> list:
    """Everything of ``kind`` AUTOSERVE_EVENTS holds (JetStream dropped duplicates), read
    back in full."""
    js = nc.jetstream()
    total = (await js.stream_info(EVENTS_STREAM)).state.messages
    sub = await js.subscribe("autoserve.event.>", ordered_consumer=True)
    found = []
    try:
        for _ in range(total):
            event = decode((await sub.next_msg(timeout=10)).data)
            if isinstance(event, kind):
                found.append(event)
    finally:
        await sub.unsubscribe()
    return found


@pytest.fixture
async def https_target(tls_cert: tuple[Path, Path]) -> AsyncIterator[int]:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_cert)
    port = free_port()
    app = web.Application()
    app.router.add_get("/health", respond(text="secure ok"))
    async with serving_app(app, port, ssl_context=context):
        yield port


# -- TCP targets -----------------------------------------------------------------------


@pytest.fixture
async def tcp_pong() -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            line = await reader.readline()
            writer.write(b"+PONG\r\n" if line.strip() == b"PING" else b"-ERR unknown\r\n")
            await writer.drain()
        writer.close()

    port = free_port()
    server = await asyncio.start_server(handle, LOCALHOST, port)
    yield port
    server.close()


@pytest.fixture
def black_hole() -> Iterator[int]:
    """Accepts connections (the kernel completes the handshake) and never answers."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        sock.listen(128)
        yield sock.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    return free_port()  # nothing listens there


def to_builtins(event: ProbeCompleted) -> dict:
    return msgspec.to_builtins(event)


# -- Docker ----------------------------------------------------------------------------

TEST_IMAGE = "autoserve-test/busybox:1"


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local image (nothing can be pulled here): Debian's static busybox and a /www/health file."""
    root = tmp_path_factory.mktemp("image")
    (root / "bin").mkdir()
    (root / "www").mkdir()
    (root / "bin" / "busybox").write_bytes(Path("/bin/busybox").read_bytes())
    (root / "bin" / "busybox").chmod(0o755)
    (root / "www" / "health").write_text("ok\n")
    tar = subprocess.run(["tar", "-C", str(root), "-c", "."], check=True, capture_output=True).stdout
    subprocess.run(["docker", "import", "-", TEST_IMAGE], input=tar, check=True, capture_output=True)
    return TEST_IMAGE


@pytest.fixture
def docker_containers() -> Iterator[list[str]]:
    """Container ids a test started; all removed afterwards."""
    started: list[str] = []
    yield started
    if started:
        subprocess.run(["docker", "rm", "-f", *started], capture_output=True)


def run_httpd(image: str, port: int, labels: dict[str, str]) -> str:
    """busybox httpd on 127.0.0.1:port with host networking (never the Docker bridge)."""
    label_args = [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]
    command = ["docker", "run", "-d", "--network", "host", *label_args, image,
               "/bin/busybox", "httpd", "-f", "-p", f"{LOCALHOST}:{port}", "-h", "/www"]  # fmt: skip
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


# -- the detector and the events it publishes -------------------------------------------


@dataclass
class Outputs:
    """Everything published on autoserve.event.> and autoserve.deadletter.>."""

    messages: list[Msg] = field(default_factory=list)

    def events(self, kind: type | None = None) -> list:
        decoded = [decode(m.data) for m in self.messages if m.subject.startswith("autoserve.event.")]
        return [e for e in decoded if kind is None or isinstance(e, kind)]

    def dead_letters(self) -> list[Msg]:
        return [m for m in self.messages if m.subject.startswith("autoserve.deadletter.")]


@pytest.fixture
async def outputs(nc: Client) -> Outputs:
    collected = Outputs()

    async def on_message(msg: Msg) -> None:
        collected.messages.append(msg)

    await nc.subscribe("autoserve.event.>", cb=on_message)
    await nc.subscribe("autoserve.deadletter.>", cb=on_message)
    return collected


class ServiceRunner:
    """Starts and stops a service in the test's loop, as often as a test needs."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self.service: Any = None
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Any:
        self.service = self._factory()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.service.run(self._stop))
        await wait_for(lambda: self.service.ready.is_set() or self._task.done(), timeout=30, what="service ready")
        if self._task.done():
            self._task.result()  # raise what went wrong
        return self.service

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._stop.set()
            await asyncio.wait_for(self._task, 30)


@pytest.fixture
async def detector_runner(nats_server: EmbeddedNatsServer, nc: Client) -> AsyncIterator[ServiceRunner]:
    from autoserve_detector.service import DetectorService

    await provision(nc.jetstream())
    runner = ServiceRunner(lambda: DetectorService(nats_server.url))
    yield runner
    await runner.stop()


@pytest.fixture
def http_process(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """``python -m http.server`` on 127.0.0.1, recorded as restartable instance demo/web-1:
    yields the records' directory and the port."""
    port = free_port()
    directory = tmp_path / "processes"
    with recorded_process(http_server(port, tmp_path), directory, "demo", "web-1", port):
        yield directory, port


WatchLocally = Callable[..., Awaitable[None]]


@pytest.fixture
async def watch_locally(
    nats_server: EmbeddedNatsServer, nc: Client, detector_runner: ServiceRunner
) -> AsyncIterator[WatchLocally]:
    """``await watch_locally(instance, port, **app)``: app demo with that one instance applied,
    then the detector and a prober without Docker started, as the local-process tests need."""
    probers: list[ServiceRunner] = []

    async def watch(instance: str, port: int, **app: object) -> None:
        instances = [{"id": instance, "host": LOCALHOST, "port": port}]
        await apply_yaml(nc, config_for({"demo": {**app, "instances": instances}}))
        await detector_runner.start()
        probers.append(ServiceRunner(lambda: ProberService(nats_server.url, docker=False)))
        await probers[-1].start()

    yield watch
    for prober in probers:
        await prober.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Any]:
    """A 3-node NATS JetStream cluster on 127.0.0.1 (``EmbeddedNatsCluster``), healthy;
    every node stopped afterwards (tests/support/cluster.py)."""
    from ..support.cluster import running_cluster

    with running_cluster(tmp_path / "cluster") as nodes:
        yield nodes
