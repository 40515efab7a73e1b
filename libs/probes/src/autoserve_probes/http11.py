"""The probe hot path for plain-HTTP GET checks: HTTP/1.1 on ``asyncio.Protocol``, parsed
by httptools (llhttp, the parser behind uvicorn and Node.js), with a keep-alive pool.

Why not aiohttp here: measured side by side (bench/RESULTS.md), aiohttp's per-request
machinery cost the prober well over half its CPU, and the goal of three times
blackbox_exporter's probes per CPU-second was out of reach with it. This path does one
thing: send a prepared GET, read the status, headers and at most ``READ_LIMIT`` bytes of
body. The head is counted before the parser sees it and the bytes after it are counted too
(``limits``): a response past a bound fails the probe and its connection is closed, so
memory stays bounded whatever the target sends. Everything else (https, bodies, other
methods, redirects to follow) stays on aiohttp. I/O: sockets; the bounds are the pure ``limits``.
"""

from __future__ import annotations

import asyncio
import contextlib

import httptools

from .limits import BODY_WIRE_LIMIT, FRAMING_TOO_LARGE, HeadScanner
from .outcome import READ_LIMIT
from .request import probe_headers
from .target import Target

Endpoint = tuple[str, int]
MAX_CACHED_REQUESTS = 100_000


class ServerClosed(ConnectionError):
    """The server closed the connection before a complete response."""


class ProtocolError(ValueError):
    """The server's bytes are not an HTTP/1.x response."""


class ResponseTooLarge(ProtocolError):
    """The response passed a bound of ``limits``; reading stopped there."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reusable = False
        self.received_any = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[tuple[int, list[tuple[str, str]], bytes]] | None = None
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()
        self._headers_done = False
        self._head = HeadScanner()
        self._after_head = 0  # bytes received after the head: body, its framing, trailers

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        if self._waiter is None or self._waiter.done():
            self._close()  # bytes nobody asked for: this connection is not to be trusted
            return
        head_bytes = 0
        if not self._head.done:  # counted before the parser buffers any of it
            head_bytes, problem = self._head.feed(data)
            if problem is not None:
                self._fail(ResponseTooLarge(problem))
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(error=ProtocolError(f"not an HTTP/1.x response: {exc}"))
            return
        if self._waiter.done():
            return
        # Still not complete and short of READ_LIMIT bytes of body: what keeps coming is
        # framing (tiny chunks, chunk extensions) or trailers, and it is not read without end.
        self._after_head += len(data) - head_bytes
        if self._after_head > BODY_WIRE_LIMIT:
            self._fail(ResponseTooLarge(FRAMING_TOO_LARGE))

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self._headers_done:  # a body delimited by the connection's close is complete now
            self._finish()
        else:
            self._finish(error=ServerClosed("server closed the connection without a response"))

    # -- httptools callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:  # a trailer after a chunked body: not one of the response's headers
            return
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        room = READ_LIMIT - len(self._body)
        self._body += body[:room]
        if len(body) >= room:  # enough read: the rest is never read, the connection is dropped
            self._finish()
            self._close()

    def on_message_complete(self) -> None:
        self.reusable = self._parser.should_keep_alive()
        self._finish()

    # -- one exchange ------------------------------------------------------------------------

    def send(self, request: bytes) -> asyncio.Future[tuple[int, list[tuple[str, str]], bytes]]:
        assert self.transport is not None
        self.reusable = False
        self.received_any = False
        self._parser = httptools.HttpResponseParser(self)
        self._status, self._headers, self._body, self._headers_done = 0, [], bytearray(), False
        self._head, self._after_head = HeadScanner(), 0
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._waiter

    def _finish(self, error: Exception | None = None) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result((self._status, self._headers, bytes(self._body)))

    def _fail(self, error: Exception) -> None:
        """Stop reading: the exchange fails and the connection is dropped, never drained."""
        self._finish(error=error)
        self._close()

    def _close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


class Http11Pool:
    def __init__(self) -> None:
        self._idle: dict[Endpoint, list[_Connection]] = {}
        self._requests: dict[tuple[str, str], tuple[Target, bytes]] = {}

    @staticmethod
    def handles(target: Target) -> bool:
        check = target.check
        return (check.scheme, check.method, check.body, check.follow_redirects) == ("http", "GET", None, False)

    async def get(self, target: Target, base_headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        """One GET; a pooled connection that the server closed meanwhile is retried once."""
        request = self._request(target, base_headers)
        endpoint = (target.host, target.port)
        connection = self._take(endpoint)
        if connection is not None:
            try:
                return await self._exchange(connection, endpoint, request, target.check.keep_alive)
            except ServerClosed:
                if connection.received_any:
                    raise
        connection = await self._connect(endpoint)
        return await self._exchange(connection, endpoint, request, target.check.keep_alive)

    def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection._close()
        self._idle.clear()

    def _take(self, endpoint: Endpoint) -> _Connection | None:
        idle = self._idle.get(endpoint)
        while idle:
            connection = idle.pop()
            if connection.transport is not None and not connection.transport.is_closing():
                return connection
        return None

    @staticmethod
    async def _connect(endpoint: Endpoint) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(_Connection, *endpoint)
        return connection

    async def _exchange(
        self, connection: _Connection, endpoint: Endpoint, request: bytes, keep_alive: bool
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        try:
            response = await connection.send(request)
        except BaseException:  # a timeout or an error mid-exchange: never reuse the connection
            connection._close()
            raise
        if keep_alive and connection.reusable:
            self._idle.setdefault(endpoint, []).append(connection)
        else:
            with contextlib.suppress(Exception):
                connection._close()
        return response

    def _request(self, target: Target, base_headers: dict[str, str]) -> bytes:
        """The request bytes, built once per target spec."""
        cached = self._requests.get(target.key)
        if cached is not None and cached[0] is target:
            return cached[1]
        headers = {"Host": target.authority, **base_headers, **probe_headers(target)}
        lines = [f"GET {target.check.path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items()), "", ""]
        data = "\r\n".join(lines).encode("latin-1")
        if len(self._requests) > MAX_CACHED_REQUESTS:  # targets come and go: keep it bounded
            self._requests.clear()
        self._requests[target.key] = (target, data)
        return data
