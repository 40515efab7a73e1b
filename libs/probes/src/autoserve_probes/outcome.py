"""Turning a raw probe outcome into a verdict and an error text that classifies cleanly.

Like Consul's check types, each probe only reports what happened; this module decides
what it means. Error texts start with a stable phrase per kind ("Request timeout",
"Connection refused", "DNS resolution failed", "TLS error", "Unexpected status code"),
so the seed's substring classifier still works, and ``ErrorKind`` says it exactly.
Pure: values in, verdicts and publishable texts out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from autoserve_events import ErrorKind

RESPONSE_BODY_LIMIT = 1000  # characters published, as in the seed
READ_LIMIT = 4096  # bytes ever read from a target, whatever it sends
MAX_HEADERS = 32
MAX_HEADER_VALUE = 256
# Never published: they can carry session secrets.
SECRET_HEADERS = frozenset({"set-cookie", "www-authenticate", "proxy-authenticate", "authorization"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    error_kind: ErrorKind | None = None
    error: str | None = None


HEALTHY = Verdict(True)

_PREFIX = {
    ErrorKind.TIMEOUT: "Request timeout",
    ErrorKind.CONNECTION_REFUSED: "Connection refused",
    ErrorKind.CONNECTION_ERROR: "Connection error",
    ErrorKind.DNS: "DNS resolution failed",
    ErrorKind.TLS: "TLS error",
    ErrorKind.UNEXPECTED_STATUS: "Unexpected status code",
    ErrorKind.UNEXPECTED_RESPONSE: "Unexpected response content",
    ErrorKind.REDIRECT_BLOCKED: "Redirect blocked",
    ErrorKind.PROTOCOL_ERROR: "Protocol error",
}


def failure(kind: ErrorKind, detail: str | None = None) -> Verdict:
    text = _PREFIX[kind] if not detail else f"{_PREFIX[kind]}: {detail}"
    return Verdict(False, kind, text[:500])


def status_verdict(status: int, expected: Iterable[int]) -> Verdict:
    if status in expected:
        return HEALTHY
    return failure(ErrorKind.UNEXPECTED_STATUS, str(status))


def tcp_response_verdict(received: bytes, expected: str | None) -> Verdict:
    if expected is None or expected.encode() in received:
        return HEALTHY
    return failure(ErrorKind.UNEXPECTED_RESPONSE, f"expected {expected!r}, got {received[:64]!r}")


def same_origin(url: str, location: str) -> bool:
    """A redirect may only stay on the configured target: only configured targets are probed."""
    a, b = urlsplit(url), urlsplit(location)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def body_text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")[:RESPONSE_BODY_LIMIT]


def public_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Response headers fit to publish: no secrets, bounded in number and size."""
    kept: dict[str, str] = {}
    for name, value in headers:
        if name.lower() in SECRET_HEADERS:
            continue
        if len(kept) >= MAX_HEADERS:
            break
        kept[name] = value[:MAX_HEADER_VALUE]
    return kept
