"""Hostile targets on 127.0.0.1: megabytes of headers, header lines without end, one huge
line, bodies and trailers without end. Every read path of the prober (the lean HTTP/1.1
client and aiohttp, keep-alive on and off; TCP) must stop at its bound, fail the probe with a
clear error and hang up, so memory stays bounded whatever the target sends.

What the prober read is measured twice: the server counts the bytes it managed to hand over
before the prober hung up (a small send buffer keeps the kernel's share small), and
tracemalloc reports the peak of Python memory while the probe ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest
from nats.aio.client import Client

from autoserve_config import HealthCheckConfig
from autoserve_events import ErrorKind
from autoserve_probes import Attempt, HttpProbe, Target, tcp_attempt
from autoserve_probes.limits import (
    FRAMING_TOO_LARGE,
    HEAD_TOO_LARGE,
    LINE_TOO_LONG,
    MAX_HEAD_BYTES,
    MAX_HEAD_LINE,
    MAX_RESPONSE_HEADERS,
    TOO_MANY_HEADERS,
)
from autoserve_probes.outcome import READ_LIMIT

from .conftest import LOCALHOST, Received, apply_yaml, check, config_for, wait_for

MiB = 1024 * 1024
HOSTILE_TOTAL = 8 * MiB  # what each hostile response would send if it were read to the end
SENT_BOUND = 2 * MiB  # what the prober may let in before it hangs up, socket buffers included
PEAK_BOUND = 4 * MiB  # Python memory at its peak during one probe, the test's server included

# Every client path the prober takes for HTTP: plain GET goes to the lean HTTP/1.1 client,
# anything else (here: redirects to follow) to aiohttp; each with and without keep-alive.
PATHS = {
    "lean": {},
    "lean-fresh": {"keep_alive": False},
    "aiohttp": {"follow_redirects": True},
    "aiohttp-fresh": {"follow_redirects": True, "keep_alive": False},
}

Pieces = Callable[[], Iterator[bytes]]


@dataclass
class Hostile:
    port: int = 0
    sent: list[int] = field(default_factory=list)  # per connection: bytes handed to the socket
    completed: list[bool] = field(default_factory=list)  # per connection: every piece was sent


@contextlib.asynccontextmanager
async def hostile_server(pieces: Pieces, pause: float = 0.0) -> AsyncIterator[Hostile]:
    """Answers each request with ``pieces()``, counting what it could send until the
    prober hung up."""
    state = Hostile()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sent, completed = 0, False
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            for piece in pieces():
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
                if pause:
                    await asyncio.sleep(pause)
            completed = True
        state.sent.append(sent)
        state.completed.append(completed)
        writer.close()

    server = await asyncio.start_server(serve, LOCALHOST, 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()


def target(port: int, **check_fields: object) -> Target:
    config = HealthCheckConfig(timeout_seconds=5, period_seconds=6, **check_fields)
    return Target("app", "i-1", LOCALHOST, port, config)


async def probe_measured(probe_target: Target) -> tuple[Attempt, int]:
    """One probe of ``probe_target`` and the peak of Python memory while it ran."""
    tracemalloc.start()
    try:
        if probe_target.check.protocol == "TCP":
            attempt = await tcp_attempt(probe_target)
        else:
            probe = await HttpProbe().start()
            try:
                attempt = await probe.attempt(probe_target)
            finally:
                await probe.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return attempt, peak


# -- what hostile targets send ------------------------------------------------------------


def up_to(total: int, head: bytes, unit: bytes, tail: bytes = b"") -> Iterator[bytes]:
    """``head``, then ``unit`` until about ``total`` bytes (bounded), then ``tail``."""
    yield head
    for _ in range(total // len(unit)):
        yield unit
    yield tail


def big_headers() -> Iterator[bytes]:
    """8 MiB of headers in 4 KiB lines: each line fine, the whole far too big."""
    line = b"X-Pad: " + b"a" * 4089 + b"\r\n"
    return up_to(HOSTILE_TOTAL, b"HTTP/1.1 200 OK\r\n", line * 16, b"Content-Length: 2\r\n\r\nok")


def endless_header_lines() -> Iterator[bytes]:
    return up_to(HOSTILE_TOTAL, b"HTTP/1.1 200 OK\r\n", b"X-A: b\r\n" * 8192, b"Content-Length: 2\r\n\r\nok")


def slow_header_lines() -> Iterator[bytes]:
    """Short header lines, each split in two writes with a pause after each: a slow target."""
    yield b"HTTP/1.1 200 OK\r\n"
    for i in range(10_000):  # bounded: far more than any limit, and more than a timeout's worth
        yield b"X-Slow-%d: " % i
        yield b"v\r\n"


def huge_line() -> Iterator[bytes]:
    return up_to(HOSTILE_TOTAL, b"HTTP/1.1 200 OK\r\nX-Big: ", b"a" * 65536, b"\r\nContent-Length: 2\r\n\r\nok")


def huge_status_line() -> Iterator[bytes]:
    return up_to(HOSTILE_TOTAL, b"HTTP/1.1 200 ", b"K" * 65536, b"\r\nContent-Length: 2\r\n\r\nok")


def endless_trailers() -> Iterator[bytes]:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
    return up_to(HOSTILE_TOTAL, head, b"X-Trailer: t\r\n" * 4096, b"\r\n")


def endless_chunk_extension() -> Iterator[bytes]:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;ext="
    return up_to(HOSTILE_TOTAL, head, b"e" * 65536, b"\r\nok\r\n0\r\n\r\n")


def endless_body_until_close() -> Iterator[bytes]:
    """No Content-Length, no chunking: the body ends when the connection does."""
    return up_to(HOSTILE_TOTAL, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"x" * 65536)


def endless_chunked_body() -> Iterator[bytes]:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    return up_to(HOSTILE_TOTAL, head, b"10000\r\n" + b"x" * 65536 + b"\r\n", b"0\r\n\r\n")


def assert_bounded(server: Hostile, peak: int) -> None:
    """The prober hung up long before the target was done, having let in a bounded amount."""
    assert len(server.sent) == 1, server
    assert server.completed == [False], f"the prober read all {server.sent[0]} bytes"
    assert server.sent[0] < SENT_BOUND, f"{server.sent[0]} bytes went out before the prober hung up"
    assert peak < PEAK_BOUND, f"peak Python memory {peak} bytes during one probe"


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("pieces", "errors"),
    [
        # aiohttp has no limit on the total: it stops at the number of headers first, still
        # having read at most MAX_RESPONSE_HEADERS lines of MAX_HEAD_LINE bytes.
        pytest.param(big_headers, {"lean": HEAD_TOO_LARGE, "aiohttp": TOO_MANY_HEADERS}, id="8MiB-of-headers"),
        pytest.param(endless_header_lines, {"lean": TOO_MANY_HEADERS, "aiohttp": TOO_MANY_HEADERS}, id="header-lines"),
        pytest.param(huge_line, {"lean": LINE_TOO_LONG, "aiohttp": LINE_TOO_LONG}, id="8MiB-header-line"),
        pytest.param(huge_status_line, {"lean": LINE_TOO_LONG, "aiohttp": LINE_TOO_LONG}, id="8MiB-status-line"),
    ],
)
async def test_an_oversized_head_fails_the_probe_and_is_not_read(pieces: Pieces, errors: dict, path: str) -> None:
    async with hostile_server(pieces) as server:
        attempt, peak = await probe_measured(target(server.port, **PATHS[path]))
        await wait_for(lambda: len(server.sent) == 1, what="the hostile server to see the hang-up")
    error = errors[path.split("-")[0]]
    assert (attempt.verdict.healthy, attempt.verdict.error_kind) == (False, ErrorKind.PROTOCOL_ERROR)
    assert attempt.verdict.error == f"Protocol error: {error}"
    assert_bounded(server, peak)


@pytest.mark.parametrize("path", PATHS)
async def test_header_lines_dribbled_slowly_stop_at_the_count_not_the_timeout(path: str) -> None:
    async with hostile_server(slow_header_lines, pause=0.001) as server:
        attempt, peak = await probe_measured(target(server.port, **PATHS[path]))
        await wait_for(lambda: len(server.sent) == 1, what="the hostile server to see the hang-up")
    assert attempt.verdict.error == f"Protocol error: {TOO_MANY_HEADERS}"
    assert_bounded(server, peak)


@pytest.mark.parametrize(
    ("pieces", "path", "error"),
    [
        *[pytest.param(endless_trailers, path, FRAMING_TOO_LARGE, id=f"trailers-{path}") for path in ("lean", "lean-fresh")],
        # aiohttp counts trailers with the headers.
        *[pytest.param(endless_trailers, path, TOO_MANY_HEADERS, id=f"trailers-{path}") for path in ("aiohttp", "aiohttp-fresh")],
        # aiohttp skips a chunk extension without keeping it (constant memory; the timeout
        # bounds the time): only the lean client counts it.
        *[pytest.param(endless_chunk_extension, path, FRAMING_TOO_LARGE, id=f"extension-{path}") for path in ("lean", "lean-fresh")],
    ],
)  # fmt: skip
async def test_endless_chunk_framing_fails_the_probe_and_is_not_read(pieces: Pieces, path: str, error: str) -> None:
    """Past the body's first bytes: what follows the head is counted too."""
    async with hostile_server(pieces) as server:
        attempt, peak = await probe_measured(target(server.port, **PATHS[path]))
        await wait_for(lambda: len(server.sent) == 1, what="the hostile server to see the hang-up")
    assert attempt.verdict.error == f"Protocol error: {error}"
    assert_bounded(server, peak)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("pieces", [endless_body_until_close, endless_chunked_body], ids=["until-close", "chunked"])
async def test_an_endless_body_is_cut_while_reading(pieces: Pieces, path: str) -> None:
    """The body was bounded before the head was: a guard that it stays so on every path."""
    async with hostile_server(pieces) as server:
        attempt, peak = await probe_measured(target(server.port, **PATHS[path]))
        await wait_for(lambda: len(server.sent) == 1, what="the hostile server to see the hang-up")
    assert (attempt.verdict.healthy, attempt.status_code) == (True, 200)
    assert attempt.body == "x" * min(READ_LIMIT, 1000)
    assert_bounded(server, peak)


async def test_an_endless_tcp_answer_is_cut_while_reading() -> None:
    """A TCP probe waiting for a response that never comes stops at READ_LIMIT bytes."""

    async with hostile_server(lambda: up_to(HOSTILE_TOTAL, b"", b"z" * 65536)) as server:
        tcp = target(server.port, protocol="TCP", probe_data="PING\r\n\r\n", expected_response="PONG")
        attempt, peak = await probe_measured(tcp)
        await wait_for(lambda: len(server.sent) == 1, what="the hostile server to see the hang-up")
    assert (attempt.verdict.healthy, attempt.verdict.error_kind) == (False, ErrorKind.UNEXPECTED_RESPONSE)
    assert_bounded(server, peak)


def head_of(size: int, lines: int, longest: int) -> bytes:
    """A valid response head of exactly ``size`` bytes with ``lines`` header lines, the first
    one ``longest`` bytes long (line endings included)."""
    status = b"HTTP/1.1 200 OK\r\n"
    fixed = [b"Content-Length: 2\r\n"]
    first = b"X-Long: " + b"l" * (longest - 10) + b"\r\n"
    rest = lines - 2
    room = size - len(status) - len(fixed[0]) - len(first) - 2
    each, extra = divmod(room, rest)
    pads = [b"X-P%03d: " % i + b"p" * (each - 10 + (1 if i < extra else 0)) + b"\r\n" for i in range(rest)]
    head = status + first + b"".join(pads) + fixed[0] + b"\r\n"
    assert len(head) == size and head.count(b"\r\n") == lines + 2
    return head


@pytest.mark.parametrize("path", PATHS)
async def test_a_head_at_the_bounds_is_read_and_one_byte_more_is_not(path: str) -> None:
    """The limits refuse only what passes them: a head of exactly MAX_HEAD_BYTES, with
    MAX_RESPONSE_HEADERS lines and one of MAX_HEAD_LINE bytes, is healthy; one more byte in
    its longest line or in total, or one more line, fails it."""
    fitting = head_of(MAX_HEAD_BYTES, MAX_RESPONSE_HEADERS, MAX_HEAD_LINE)
    cases = {
        fitting: None,
        head_of(MAX_HEAD_BYTES, MAX_RESPONSE_HEADERS, MAX_HEAD_LINE + 1): LINE_TOO_LONG,
        head_of(MAX_HEAD_BYTES + 1, MAX_RESPONSE_HEADERS, MAX_HEAD_LINE): HEAD_TOO_LARGE,
        head_of(MAX_HEAD_BYTES, MAX_RESPONSE_HEADERS + 1, MAX_HEAD_LINE): TOO_MANY_HEADERS,
    }
    for head, error in cases.items():
        # Sent in small pieces, so that lines and the blank line ending the head may arrive split.
        pieces = [head[i : i + 997] for i in range(0, len(head), 997)] + [b"ok"]
        async with hostile_server(lambda pieces=pieces: iter(pieces)) as server:
            attempt, _ = await probe_measured(target(server.port, **PATHS[path]))
        if error is None:
            assert (attempt.verdict.healthy, attempt.status_code, attempt.body) == (True, 200, "ok")
        else:
            assert attempt.verdict.error == f"Protocol error: {error}", len(head)


async def test_the_running_prober_reports_an_oversized_head(prober, nc: Client, probes: Received) -> None:
    """End to end: the prober service probing a hostile target publishes an unhealthy
    ProbeCompleted with the error, probe after probe, on every path."""
    async with hostile_server(huge_line) as server:
        apps = {
            name: {
                "health_check": check(**fields),
                "instances": [{"id": "i-1", "host": LOCALHOST, "port": server.port}],
            }
            for name, fields in PATHS.items()
        }
        await apply_yaml(nc, config_for(apps))
        await wait_for(lambda: all(probes.count(name, "i-1") >= 2 for name in apps), timeout=30, what="two probes each")
    for name in apps:
        for event in probes.of(name, "i-1")[:2]:
            assert (event.is_healthy, event.error_kind) == (False, ErrorKind.PROTOCOL_ERROR), name
            assert event.error == f"Protocol error: {LINE_TOO_LONG}", name
            assert event.headers == {} and event.status_code is None, name
