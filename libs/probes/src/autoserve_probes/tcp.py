"""TCP probes: connect, optionally send ``probe_data``, optionally expect a response.

Unlike the seed, the response time covers the whole exchange, and a banner protocol
(``expected_response`` without ``probe_data``) works too. At most ``READ_LIMIT`` bytes
are read. I/O: the connection; ``outcome`` says what the response means.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from autoserve_events import ErrorKind

from .attempt import Attempt
from .outcome import HEALTHY, READ_LIMIT, Verdict, failure, tcp_response_verdict
from .target import Target


def classify_exception(exc: BaseException, timeout: float) -> Verdict:
    if isinstance(exc, TimeoutError):
        return failure(ErrorKind.TIMEOUT, f"no connection or response within {timeout:g}s")
    if isinstance(exc, ConnectionRefusedError):
        return failure(ErrorKind.CONNECTION_REFUSED)
    if isinstance(exc, socket.gaierror):
        return failure(ErrorKind.DNS, exc.strerror or str(exc))
    if isinstance(exc, OSError):
        return failure(ErrorKind.CONNECTION_ERROR, exc.strerror or str(exc))
    return failure(ErrorKind.PROTOCOL_ERROR, f"{type(exc).__name__}: {exc}")


async def tcp_attempt(target: Target) -> Attempt:
    check = target.check
    try:
        async with asyncio.timeout(check.timeout_seconds):
            reader, writer = await asyncio.open_connection(target.host, target.port)
            try:
                if check.probe_data:
                    writer.write(check.probe_data.encode())
                    await writer.drain()
                if check.expected_response is None:
                    return Attempt(HEALTHY)
                received = await _read_until(reader, check.expected_response.encode())
                return Attempt(tcp_response_verdict(received, check.expected_response))
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (Exception, TimeoutError) as exc:
        return Attempt(classify_exception(exc, check.timeout_seconds))


async def _read_until(reader: asyncio.StreamReader, expected: bytes) -> bytes:
    received = b""
    while expected not in received and len(received) < READ_LIMIT:
        chunk = await reader.read(READ_LIMIT - len(received))
        if not chunk:
            break
        received += chunk
    return received
