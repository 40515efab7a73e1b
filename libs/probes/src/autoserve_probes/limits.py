"""How much of a response a probe reads, whatever the target sends.

A probe needs the status line, a few headers and the start of the body; a target that is
broken or hostile may send megabytes of headers, header lines without end, or a body without
end. Every read path stops at these bounds and drops the connection, so a probe costs at most
one timeout and a bounded amount of memory (DESIGN.md, Guarantees).

The numbers, and why:
- ``MAX_HEAD_BYTES`` 64 KiB for the status line and all headers together: Envoy's default
  (``max_response_headers_kb``, 60 KiB) is the same order; Node.js stops at 16 KiB and nginx's
  upstream buffer is 4-8 KiB. Go's http.Transport allows 10 MiB (blackbox_exporter inherits
  it), which across a thousand concurrent probes of misbehaving targets is gigabytes.
- ``MAX_HEAD_LINE`` 8 KiB for one line (status or header): aiohttp's and Apache's limit, above
  any real cookie or Content-Security-Policy header.
- ``MAX_RESPONSE_HEADERS`` 100 header lines: Envoy's ``max_headers_count`` and Apache's
  ``LimitRequestFields`` default.
- ``BODY_WIRE_LIMIT`` 64 KiB of bytes after the head (the body as framed, chunk sizes and
  trailers included) when fewer than ``READ_LIMIT`` bytes of content came out of them.

This module is pure: it counts bytes handed to it and says which bound was passed.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_HEAD_BYTES = 64 * 1024
MAX_HEAD_LINE = 8 * 1024
MAX_RESPONSE_HEADERS = 100
BODY_WIRE_LIMIT = 64 * 1024

HEAD_TOO_LARGE = f"response headers exceed {MAX_HEAD_BYTES} bytes"
LINE_TOO_LONG = f"a response header line exceeds {MAX_HEAD_LINE} bytes"
TOO_MANY_HEADERS = f"response has more than {MAX_RESPONSE_HEADERS} headers"
FRAMING_TOO_LARGE = f"response body framing or trailers exceed {BODY_WIRE_LIMIT} bytes"


class HeadScanner:
    """Counts a response head (status line, header lines, the blank line) as its bytes arrive,
    before any parser buffers them, and stops counting at the blank line that ends it."""

    __slots__ = ("_line", "_lines", "_short", "_size", "done")

    def __init__(self) -> None:
        self.done = False
        self._size = 0
        self._lines = 0  # complete lines, the status line included
        self._line = 0  # bytes of the line being read, its line ending included
        self._short = b""  # the line so far while it is at most 2 bytes: it may be the blank one

    def feed(self, data: bytes) -> tuple[int, str | None]:
        """Account for ``data``: how many of its bytes belong to the head, and the bound it
        passed (then reading must stop) or None."""
        if self._size == 0:  # usually a whole, small head in one piece: a few scans in C
            end = data.find(b"\r\n\r\n") + 4
            if (
                4 < end <= MAX_HEAD_LINE  # then no line and not the whole can pass a bound
                and data[:1] not in b"\r\n"  # no blank line before the status line
                and data.count(b"\n", 0, end) <= MAX_RESPONSE_HEADERS + 2  # status and blank line too
                and data.find(b"\n\n", 0, end) < 0  # and no earlier blank line ends it
                and data.find(b"\n\r\n", 0, end - 2) < 0
            ):
                self._size, self.done = end, True
                return end, None
        pos, size = 0, len(data)
        while pos < size:
            newline = data.find(b"\n", pos)
            end = size if newline < 0 else newline + 1
            self._line += end - pos
            self._size += end - pos
            if self._line > MAX_HEAD_LINE:
                return end, LINE_TOO_LONG
            if self._size > MAX_HEAD_BYTES:
                return end, HEAD_TOO_LARGE
            if self._line <= 2:
                self._short += data[pos:end]
            if newline < 0:
                return size, None
            if self._short in (b"\r\n", b"\n"):
                if self._lines:  # the blank line after the headers: the head is complete
                    self.done = True
                    return end, None
                self._line, self._short = 0, b""  # blank lines before the status line are skipped
                pos = end
                continue
            self._lines += 1
            if self._lines > MAX_RESPONSE_HEADERS + 1:
                return end, TOO_MANY_HEADERS
            self._line, self._short = 0, b""
            pos = end
        return size, None


def head_problem(status_line: str, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The same bounds for a head that another parser already read (aiohttp's, which bounds
    lines and their number while reading but has no limit on the total): its size as sent
    with the usual ``Name: value`` spacing."""
    size = len(status_line) + 4  # its CRLF and the blank line's
    count = 0
    for name, value in headers:
        count += 1
        size += len(name) + len(value) + 4
    if count > MAX_RESPONSE_HEADERS:
        return TOO_MANY_HEADERS
    if size > MAX_HEAD_BYTES:
        return HEAD_TOO_LARGE
    return None
