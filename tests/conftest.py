"""Checks over the whole test session.

The planted-secret scan (issue 7: "a log scan over a full test run finds no planted
credential"). Tests register every credential they create with ``plant_secret`` (NATS
passwords, nkey seeds, HMAC secrets, generated deploy secrets ...) and the files that
must carry one on purpose with ``allow_secret_file`` (a password file, a creds file). The
session then fails if any planted secret shows up

- in what pytest captured for any test (stdout, stderr, log records, the failure text),
  scanned as each report arrives; or
- in any file under the session's basetemp that was not allowed: service logs written by
  subprocesses, command output, nats-server logs, configs, scanned at the end.

Secrets are random per test (or module constants registered at import), so each report
is scanned against every secret that exists by then; a secret cannot leak into a report
that was made before the secret existed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Bounds that keep the end-of-session scan cheap on a full run: each file is read in
# chunks up to MAX_FILE_BYTES (logs here are far smaller; larger files are cut, and the
# summary says how many). A file with a NUL byte in its first SNIFF_BYTES is binary.
MAX_FILE_BYTES = 16 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
SNIFF_BYTES = 8192
MIN_SECRET_CHARS = 8  # shorter values ("s3cret") would match innocent text


@dataclass(frozen=True)
class Leak:
    where: str  # a file path, or "<nodeid> [<section>]"
    label: str
    redacted: str

    def __str__(self) -> str:
        return f"{self.label} ({self.redacted}) in {self.where}"


def redact(value: str) -> str:
    return f"{value[:4]}*** {len(value)} chars"


def skipped_by_design(directory: Path, names: list[str]) -> bool:
    """Data directories, not logs: chDB's engine directory (``metadata`` beside ``store`` or
    ``data``: compressed column files, and its preprocessed copy of any users.xml) and
    nats-server's JetStream store (message blocks: event payloads in a binary framing).
    What lands there is data the tests check by their own means; logs are scanned."""
    if directory.name == "jetstream":
        return True
    return "metadata" in names and ("store" in names or "data" in names)


@dataclass
class SecretScan:
    secrets: dict[str, str] = field(default_factory=dict)  # value -> label
    allowed: set[Path] = field(default_factory=set)
    leaks: list[Leak] = field(default_factory=list)
    reports_scanned: int = 0
    files_scanned: int = 0
    bytes_scanned: int = 0
    files_cut: int = 0
    _pattern: re.Pattern[str] | None = None

    def plant(self, value: str | bytes, label: str) -> str:
        text = value.decode() if isinstance(value, bytes) else value
        text = text.strip()
        if len(text) < MIN_SECRET_CHARS:
            raise ValueError(
                f"plant_secret: {label!r} is {len(text)} chars; a planted secret needs {MIN_SECRET_CHARS}+"
            )
        self.secrets.setdefault(text, label)
        self._pattern = None
        return text

    def allow(self, path: Path) -> Path:
        self.allowed.add(Path(path).resolve())
        return path

    def pattern(self) -> re.Pattern[str] | None:
        if self._pattern is None and self.secrets:
            # longest first: a secret that contains another is reported as itself
            self._pattern = re.compile("|".join(re.escape(s) for s in sorted(self.secrets, key=len, reverse=True)))
        return self._pattern

    def scan_text(self, where: str, text: str) -> list[Leak]:
        pattern = self.pattern()
        if pattern is None or not text:
            return []
        found = [Leak(where, self.secrets[v], redact(v)) for v in dict.fromkeys(pattern.findall(text))]
        found = [leak for leak in found if leak not in self.leaks]  # a later phase's report repeats sections
        self.leaks += found
        return found

    def scan_report(self, report: pytest.TestReport) -> list[Leak]:
        self.reports_scanned += 1
        texts = [(title, content) for title, content in report.sections]
        if report.failed:
            texts.append(("failure", report.longreprtext))
        return [leak for title, text in texts for leak in self.scan_text(f"{report.nodeid} [{title}]", text)]

    def _is_allowed(self, path: Path) -> bool:
        return any(path == a or a in path.parents for a in self.allowed)

    def files(self, root: Path) -> Iterator[Path]:
        for directory, dirs, names in os.walk(root):
            here = Path(directory)
            if skipped_by_design(here, dirs) or self._is_allowed(here.resolve()):
                dirs[:] = []
                continue
            dirs[:] = [d for d in dirs if not (here / d).is_symlink()]
            for name in names:
                path = here / name
                if path.is_file() and not path.is_symlink() and not self._is_allowed(path.resolve()):
                    yield path

    def scan_file(self, path: Path) -> list[Leak]:
        pattern = self.pattern()
        if pattern is None:
            return []
        overlap = max(map(len, self.secrets))
        found: dict[str, None] = {}
        try:
            with path.open("rb") as stream:
                head = stream.read(SNIFF_BYTES)
                if b"\0" in head:
                    return []  # binary
                self.files_scanned += 1
                tail, read = b"", 0
                chunk = head
                while chunk:
                    read += len(chunk)
                    text = (tail + chunk).decode("utf-8", errors="replace")
                    found |= dict.fromkeys(pattern.findall(text))
                    if read >= MAX_FILE_BYTES:
                        self.files_cut += bool(stream.read(1))
                        break
                    tail = chunk[-overlap:]
                    chunk = stream.read(min(CHUNK_BYTES, MAX_FILE_BYTES - read))
                self.bytes_scanned += read
        except OSError:
            return []  # gone, or not readable (a socket, a root-owned file from a container)
        leaks = [Leak(str(path), self.secrets[v], redact(v)) for v in found]
        self.leaks += leaks
        return leaks

    def scan_tree(self, root: Path) -> list[Leak]:
        return [leak for path in self.files(root) for leak in self.scan_file(path)]

    def summary(self) -> str:
        if not self.secrets:
            return "no secret planted in this session, nothing to look for"
        cut = f", {self.files_cut} cut at {MAX_FILE_BYTES >> 20} MiB" if self.files_cut else ""
        return (
            f"{len(self.secrets)} planted secrets; {self.reports_scanned} test reports and "
            f"{self.files_scanned} files ({self.bytes_scanned / 2**20:.1f} MiB{cut}) scanned"
        )


SESSION = SecretScan()
_basetemp: list[Path] = []


def plant_secret(value: str | bytes, label: str, allowed_in: Iterable[Path] = ()) -> str:
    """Register a credential this test created; the session fails if it appears in any
    captured output or unallowed file. ``allowed_in``: files that carry it on purpose."""
    for path in allowed_in:
        SESSION.allow(path)
    return SESSION.plant(value, label)


def allow_secret_file(path: Path) -> Path:
    """A file (or directory) that must carry secrets: left out of the scan."""
    return SESSION.allow(path)


@pytest.fixture(scope="session", autouse=True)
def _secret_scan_basetemp(tmp_path_factory: pytest.TempPathFactory) -> None:
    _basetemp.append(tmp_path_factory.getbasetemp())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    SESSION.scan_report(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for root in _basetemp:
        SESSION.scan_tree(root)
    if SESSION.leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SESSION.leaks:
        terminalreporter.section("planted secrets leaked", sep="!", red=True, bold=True)
        for leak in SESSION.leaks:
            terminalreporter.line(f"LEAK: {leak}", red=True)
    terminalreporter.line(f"secret scan: {SESSION.summary()}; {len(SESSION.leaks)} leak(s)")
