"""The lean HTTP/1.1 path against raw servers that answer in every framing HTTP allows,
and in ways it does not: a real socket each time, 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from autoserve_config import HealthCheckConfig
from autoserve_events import ErrorKind
from autoserve_probes import HttpProbe, Target
from autoserve_probes.http11 import Http11Pool
from autoserve_probes.outcome import READ_LIMIT
from autoserve_probes.request import BASE_HEADERS

Responder = Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]


@contextlib.asynccontextmanager
async def raw_server(respond: Responder) -> AsyncIterator[int]:
    server = await asyncio.start_server(respond, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def target(port: int, **check: object) -> Target:
    return Target("app", "i-1", "127.0.0.1", port, HealthCheckConfig(timeout_seconds=1, period_seconds=1, **check))


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def answering(*responses: bytes, close: bool = False) -> tuple[Responder, list[bytes]]:
    """A server that answers each request on a connection with the next response."""
    heads: list[bytes] = []

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            for response in responses:
                heads.append(await read_head(reader))
                writer.write(response)
                await writer.drain()
                if close:
                    break
        writer.close()

    return respond, heads


async def test_content_length_keep_alive_reuses_the_connection() -> None:
    respond, heads = answering(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nok" * 1, *[b"HTTP/1.1 204 No Content\r\n\r\n"]
    )
    async with raw_server(respond) as port:
        pool = Http11Pool()
        assert await pool.get(target(port), BASE_HEADERS) == (200, [("Content-Length", "2"), ("X-A", "1")], b"ok")
        status, _, body = await pool.get(target(port), BASE_HEADERS)
        assert (status, body) == (204, b"")
        pool.close()
    assert len(heads) == 2  # both requests on one connection
    assert heads[0].startswith(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"X-Health-Check: true\r\n" in heads[0] and b"X-App-Name: app\r\n" in heads[0]


async def test_chunked_and_close_delimited_bodies() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    respond, _ = answering(chunked)
    async with raw_server(respond) as port:
        assert (await Http11Pool().get(target(port), BASE_HEADERS))[2] == b"abcde"
    respond, _ = answering(b"HTTP/1.0 200 OK\r\n\r\nuntil close", close=True)
    async with raw_server(respond) as port:
        assert (await Http11Pool().get(target(port), BASE_HEADERS))[2] == b"until close"


async def test_a_stale_pooled_connection_is_retried_on_a_fresh_one() -> None:
    respond, heads = answering(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", close=True
    )  # keep-alive promised, then closed
    async with raw_server(respond) as port:
        pool = Http11Pool()
        assert (await pool.get(target(port), BASE_HEADERS))[0] == 200
        await asyncio.sleep(0)  # the server's close reaches us, or it does not: both must work
        assert (await pool.get(target(port), BASE_HEADERS))[0] == 200
        pool.close()
    assert len(heads) == 2


async def test_an_endless_body_is_cut_at_the_read_limit() -> None:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(1000):  # bounded
                writer.write(b"x" * 65536)
                await writer.drain()
        writer.close()

    async with raw_server(respond) as port:
        status, _, body = await Http11Pool().get(target(port), BASE_HEADERS)
    assert (status, len(body)) == (200, READ_LIMIT)


@pytest.mark.parametrize(
    ("response", "kind"),
    [
        (b"SMTP ready\r\n\r\n", ErrorKind.PROTOCOL_ERROR),
        (b"", ErrorKind.CONNECTION_ERROR),  # accepted, then closed without a word
    ],
)
async def test_bad_answers_classify(response: bytes, kind: ErrorKind) -> None:
    respond, _ = answering(response, close=True)
    async with raw_server(respond) as port:
        probe = await HttpProbe().start()
        try:
            attempt = await probe.attempt(target(port))
        finally:
            await probe.close()
    assert (attempt.verdict.healthy, attempt.verdict.error_kind) == (False, kind)
