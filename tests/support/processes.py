"""Local processes the recovery service may restart: started, recorded as its process runtime
reads them, and killed afterwards together with whatever recovery started in their place."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autoserve_recovery.adapters.process import register

LOCALHOST = "127.0.0.1"


def http_server(port: int, root: Path) -> list[str]:
    """The argv of ``python -m http.server`` serving ``root`` on 127.0.0.1:``port``."""
    return [sys.executable, "-m", "http.server", "--bind", LOCALHOST, str(port), "--directory", str(root)]


def serving(port: int) -> bool:
    """``GET /`` on 127.0.0.1:``port`` answers 200."""
    try:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def recorded_pid(record: Path) -> int | None:
    """The pid a record names; None once it is gone (``up``'s watchdog removes them)."""
    try:
        return int(json.loads(record.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


@contextlib.contextmanager
def recorded_process(
    argv: list[str], processes: Path, app: str, instance: str, port: int, **popen: Any
) -> Iterator[Path]:
    """``argv`` running, recorded under ``processes`` as restartable instance app/instance
    (as ``autoserve_cli.demo`` records its targets): yields the record's path."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    register(processes, app, instance, argv, port)
    record = processes / app / f"{instance}.json"
    # register() records the caller; the target is the child, and runs where popen says.
    cwd = {"cwd": str(popen["cwd"])} if "cwd" in popen else {}
    record.write_text(json.dumps({**json.loads(record.read_text()), "pid": process.pid, **cwd}))
    try:
        yield record
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        pid = recorded_pid(record)
        if pid is not None and pid != process.pid:  # recovery's restart of it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
