"""HTTP probes. Plain-HTTP GET checks take the lean path in ``http11`` (measured in
bench/RESULTS.md); https, bodies, other methods and redirects to follow use aiohttp.

One shared session and connection pool each. Every field of the seed's ``HealthCheckConfig``
is honoured, ``verify_ssl`` and ``follow_redirects`` included. Redirects are followed by
hand so that they never leave the configured target, and at most ``READ_LIMIT`` bytes of
a body are ever read; a connection left with unread body is closed, not drained. Response
heads are bounded on both paths by ``limits`` (aiohttp by its own line and count limits
while it reads, set from ours, and its total checked once read), with the same error texts.

I/O: this module does the exchange; ``request`` says what is sent and ``outcome`` what the
answer means.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from urllib.parse import urljoin

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from autoserve_events import ErrorKind

from .attempt import Attempt
from .http11 import Http11Pool, ProtocolError, ServerClosed
from .limits import LINE_TOO_LONG, MAX_HEAD_LINE, MAX_RESPONSE_HEADERS, TOO_MANY_HEADERS, head_problem
from .outcome import (
    MAX_REDIRECTS,
    READ_LIMIT,
    REDIRECT_STATUSES,
    Verdict,
    body_text,
    failure,
    public_headers,
    same_origin,
    status_verdict,
)
from .request import BASE_HEADERS, probe_headers, target_url
from .target import Target


def classify_exception(exc: BaseException, timeout: float) -> Verdict:
    """Map what a probe raised to an error kind. Order matters: subclasses first."""
    if isinstance(exc, ProtocolError):
        return failure(ErrorKind.PROTOCOL_ERROR, str(exc))
    if isinstance(exc, ServerClosed):
        return failure(ErrorKind.CONNECTION_ERROR, str(exc))
    if isinstance(exc, ConnectionRefusedError):
        return failure(ErrorKind.CONNECTION_REFUSED)
    if isinstance(exc, socket.gaierror):
        return failure(ErrorKind.DNS, exc.strerror or str(exc))
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return failure(ErrorKind.TIMEOUT, f"no response within {timeout:g}s")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return failure(ErrorKind.DNS, str(exc.os_error))
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return failure(ErrorKind.TLS, str(exc.certificate_error))
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return failure(ErrorKind.TLS, str(exc))
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return failure(ErrorKind.CONNECTION_REFUSED)
        return failure(ErrorKind.CONNECTION_ERROR, exc.os_error.strerror or str(exc.os_error))
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return failure(ErrorKind.CONNECTION_ERROR, "server closed the connection without a response")
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return failure(ErrorKind.PROTOCOL_ERROR, _limit_passed(exc) or str(exc))
    if isinstance(exc, aiohttp.ClientOSError | OSError):
        return failure(ErrorKind.CONNECTION_ERROR, str(exc))
    return failure(ErrorKind.PROTOCOL_ERROR, f"{type(exc).__name__}: {exc}")


def _limit_passed(exc: BaseException) -> str | None:
    """Our text for aiohttp's parser stopping at a limit (its own would echo the target's bytes)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, LineTooLong):
            return LINE_TOO_LONG
        if isinstance(cause, HttpProcessingError) and "Too many headers" in str(cause.message):
            return TOO_MANY_HEADERS
        cause = cause.__cause__
    return None


class HttpProbe:
    def __init__(self, *, pool_size: int = 1024) -> None:
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._lean = Http11Pool()

    async def start(self) -> HttpProbe:
        connector = aiohttp.TCPConnector(
            limit=self._pool_size, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=75
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
            headers=BASE_HEADERS,
            # aiohttp stops reading at these while it parses; its sizes leave out ": " and the
            # line endings, so a raw line is bounded at MAX_HEAD_LINE bytes as on the lean path.
            max_line_size=MAX_HEAD_LINE - 2,
            max_field_size=MAX_HEAD_LINE - 4,
            max_headers=MAX_RESPONSE_HEADERS,
        )
        return self

    async def close(self) -> None:
        self._lean.close()
        if self._session is not None:
            await self._session.close()

    async def attempt(self, target: Target) -> Attempt:
        assert self._session is not None, "start() first"
        check = target.check
        if Http11Pool.handles(target):
            try:
                async with asyncio.timeout(check.timeout_seconds):
                    status, headers, raw = await self._lean.get(target, BASE_HEADERS)
            except (Exception, TimeoutError) as exc:  # every failure is a verdict, never a crash
                return Attempt(classify_exception(exc, check.timeout_seconds))
            return Attempt(
                status_verdict(status, check.expected_status_codes), status, body_text(raw), public_headers(headers)
            )
        headers = probe_headers(target)  # the session adds BASE_HEADERS
        url, method = target_url(target), check.method
        verify: bool | None = None if check.verify_ssl else False
        try:
            async with asyncio.timeout(check.timeout_seconds):
                for _ in range(MAX_REDIRECTS + 1):
                    async with self._session.request(
                        method, url, headers=headers, data=check.body, allow_redirects=False, ssl=verify
                    ) as response:
                        problem = head_problem(_status_line(response), response.raw_headers)
                        if problem is not None:
                            response.close()  # never reused: the rest is not read
                            return Attempt(failure(ErrorKind.PROTOCOL_ERROR, problem))
                        location = response.headers.get("Location")
                        if check.follow_redirects and response.status in REDIRECT_STATUSES and location:
                            next_url = urljoin(url, location)
                            if not same_origin(url, next_url):
                                verdict = failure(
                                    ErrorKind.REDIRECT_BLOCKED, f"{response.status} to {next_url} leaves the target"
                                )
                                return Attempt(verdict, response.status)
                            url = next_url
                            method = "GET" if response.status == 303 else method
                            continue
                        raw = await _read_bounded(response)
                        return Attempt(
                            status_verdict(response.status, check.expected_status_codes),
                            response.status,
                            body_text(raw),
                            public_headers(response.headers.items()),
                        )
                return Attempt(failure(ErrorKind.REDIRECT_BLOCKED, f"more than {MAX_REDIRECTS} redirects"))
        except (Exception, TimeoutError) as exc:  # every failure is a verdict, never a crash
            return Attempt(classify_exception(exc, check.timeout_seconds))


def _status_line(response: aiohttp.ClientResponse) -> str:
    version = response.version
    major, minor = (version.major, version.minor) if version is not None else (1, 1)
    return f"HTTP/{major}.{minor} {response.status} {response.reason or ''}"


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < READ_LIMIT:
        chunk = await response.content.read(READ_LIMIT - size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
    if not response.content.at_eof():
        response.close()  # the rest is never read: drop the connection instead of draining it
    return b"".join(chunks)
