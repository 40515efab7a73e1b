"""Verdicts and error texts: each kind classifies cleanly, secrets are never published."""

from __future__ import annotations

import socket
import ssl

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from autoserve_events import ErrorKind
from autoserve_probes import http, tcp
from autoserve_probes.outcome import (
    RESPONSE_BODY_LIMIT,
    body_text,
    failure,
    public_headers,
    same_origin,
    status_verdict,
    tcp_response_verdict,
)

KEY = ConnectionKey("127.0.0.1", 1, False, True, None, None, None)


def test_expected_status_is_healthy() -> None:
    assert status_verdict(204, [200, 204]).healthy
    verdict = status_verdict(500, [200])
    assert (verdict.healthy, verdict.error_kind, verdict.error) == (
        False,
        ErrorKind.UNEXPECTED_STATUS,
        "Unexpected status code: 500",
    )


def test_tcp_response_match() -> None:
    assert tcp_response_verdict(b"+PONG\r\n", "+PONG").healthy
    assert tcp_response_verdict(b"", None).healthy
    verdict = tcp_response_verdict(b"-ERR", "+PONG")
    assert verdict.error_kind is ErrorKind.UNEXPECTED_RESPONSE
    assert verdict.error == "Unexpected response content: expected '+PONG', got b'-ERR'"


@pytest.mark.parametrize(
    ("url", "location", "same"),
    [
        ("http://127.0.0.1:80/a", "http://127.0.0.1:80/b", True),
        ("http://127.0.0.1:80/a", "http://127.0.0.1:81/b", False),
        ("http://127.0.0.1:80/a", "https://127.0.0.1:80/b", False),
        ("http://127.0.0.1:80/a", "http://localhost:80/b", False),
        ("http://127.0.0.1:80/a", "http://169.254.169.254:80/latest", False),
    ],
)
def test_redirects_stay_on_the_target(url: str, location: str, same: bool) -> None:
    assert same_origin(url, location) is same


def test_body_is_cut_to_the_seed_limit() -> None:
    assert len(body_text(b"x" * 5000)) == RESPONSE_BODY_LIMIT
    assert body_text(b"\xff\xfeok") == "\ufffd\ufffdok"


def test_secret_headers_are_not_published_and_sizes_are_bounded() -> None:
    headers = [("Set-Cookie", "session=s3cret"), ("Content-Type", "text/plain"), ("X-Long", "v" * 1000)]
    headers += [(f"X-{i}", "1") for i in range(100)]
    kept = public_headers(headers)
    assert "Set-Cookie" not in kept
    assert kept["Content-Type"] == "text/plain"
    assert len(kept["X-Long"]) == 256
    assert len(kept) == 32


def test_error_texts_keep_the_seeds_keywords() -> None:
    """The seed's detector looks for 'timeout', 'connection' and 'dns' in the text."""
    assert "timeout" in failure(ErrorKind.TIMEOUT).error.lower()
    assert "connection" in failure(ErrorKind.CONNECTION_REFUSED).error.lower()
    assert "connection" in failure(ErrorKind.CONNECTION_ERROR).error.lower()
    assert "dns" in failure(ErrorKind.DNS).error.lower()
    assert len(failure(ErrorKind.PROTOCOL_ERROR, "x" * 2000).error) == 500


HTTP_EXCEPTIONS = [
    (TimeoutError(), ErrorKind.TIMEOUT),
    (aiohttp.ServerTimeoutError(), ErrorKind.TIMEOUT),
    (aiohttp.ClientConnectorDNSError(KEY, OSError(-2, "Name or service not known")), ErrorKind.DNS),
    (aiohttp.ClientConnectorCertificateError(KEY, ssl.SSLCertVerificationError("self-signed")), ErrorKind.TLS),
    (aiohttp.ClientConnectorSSLError(KEY, ssl.SSLError("bad handshake")), ErrorKind.TLS),
    (aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(111, "refused")), ErrorKind.CONNECTION_REFUSED),
    (aiohttp.ClientConnectorError(KEY, OSError(113, "No route to host")), ErrorKind.CONNECTION_ERROR),
    (aiohttp.ServerDisconnectedError(), ErrorKind.CONNECTION_ERROR),
    (aiohttp.ClientPayloadError("truncated"), ErrorKind.PROTOCOL_ERROR),
    (aiohttp.ClientOSError(104, "reset"), ErrorKind.CONNECTION_ERROR),
    (ValueError("odd"), ErrorKind.PROTOCOL_ERROR),
]


@pytest.mark.parametrize(("exc", "kind"), HTTP_EXCEPTIONS, ids=lambda v: type(v).__name__)
def test_http_exceptions_classify(exc: BaseException, kind: ErrorKind) -> None:
    verdict = http.classify_exception(exc, 2.0)
    assert (verdict.healthy, verdict.error_kind) == (False, kind)
    assert verdict.error


TCP_EXCEPTIONS = [
    (TimeoutError(), ErrorKind.TIMEOUT),
    (ConnectionRefusedError(111, "Connection refused"), ErrorKind.CONNECTION_REFUSED),
    (socket.gaierror(-2, "Name or service not known"), ErrorKind.DNS),
    (ConnectionResetError(104, "Connection reset by peer"), ErrorKind.CONNECTION_ERROR),
    (RuntimeError("odd"), ErrorKind.PROTOCOL_ERROR),
]


@pytest.mark.parametrize(("exc", "kind"), TCP_EXCEPTIONS, ids=lambda v: type(v).__name__)
def test_tcp_exceptions_classify(exc: BaseException, kind: ErrorKind) -> None:
    assert tcp.classify_exception(exc, 1.0).error_kind is kind
