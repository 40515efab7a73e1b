"""Child processes that never outlive their parent and are not hit by the terminal's Ctrl-C.

Each child runs in its own session, so Ctrl-C reaches only the supervisor, which then
stops the children in order (services first, the bus last). PR_SET_PDEATHSIG makes the
kernel send SIGTERM to a child whose supervisor died without cleaning up.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
from typing import Any

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn_child(command: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent, **popen
    )


def stop_child(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
