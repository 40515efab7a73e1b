"""The watchdog of ``autoserve up``: what ``up`` started dies with it, even when ``up`` is
SIGKILLed.

``up`` starts this process with the read end of a pipe as its stdin and keeps the write
end. It reports each child it starts (``+ PID STARTTIME``) and reaps (``- PID``), and
``bye`` on a clean exit (it stopped everything itself). End of file without ``bye``
means ``up`` died: this process then stops, as systemd's ``KillMode=control-group`` does
for a unit, everything ``up`` left behind:

- ``up``'s own children (services, nats-server, demo targets) already got SIGTERM from
  the kernel (``PR_SET_PDEATHSIG``); they get their drain, then SIGKILL;
- the demo targets the recovery service restarted are recovery's children, started in
  their own session so that they outlive a recovery crash (they are the monitored app),
  and recorded under ``<data dir>/processes``: they get SIGTERM, then SIGKILL. The records
  are read again until recovery itself is gone, since its drain may restart one more.

Why a process and not the kernel alone: PDEATHSIG covers only direct children;
``PR_SET_CHILD_SUBREAPER`` on ``up`` adopts orphans while ``up`` lives but does nothing
once it is dead; cgroup v2's ``cgroup.kill`` would need a writable cgroup v2 hierarchy
(this machine and most CI containers mount v1 or read-only) and still someone to write
it after ``up`` died. A pipe's end of file always arrives.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

GRACE_SECONDS = 15.0  # as up's own stop: one SIGTERM, then SIGKILL


def starttime(pid: int) -> str | None:
    """The process's start time in clock ticks (/proc/PID/stat field 22): with the pid,
    it names one process, so a reused pid is never signalled."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str) -> bool:
    return starttime(pid) == started and not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _recorded(directory: Path) -> dict[int, str]:
    """Recorded processes that are still the recorded command (pid -> start time)."""
    found: dict[int, str] = {}
    for path in directory.glob("*/*.json"):
        try:
            record = json.loads(path.read_text())
            pid = int(record["pid"])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        started = starttime(pid)
        if started and [part.decode(errors="replace") for part in cmdline] == list(record["argv"]):
            found[pid] = started
    return found


def _signal(pid: int, started: str, sig: signal.Signals) -> None:
    if _alive(pid, started):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def clean_up(children: dict[int, str], records: Path, grace: float = GRACE_SECONDS) -> None:
    """``up`` died: the recorded targets get SIGTERM (the children have theirs from the
    kernel); whatever is alive after ``grace`` gets SIGKILL."""
    deadline = time.monotonic() + grace
    termed: dict[int, str] = {}
    killed = False
    while True:
        for pid, started in _recorded(records).items():
            if pid not in termed:
                termed[pid] = started
                _signal(pid, started, signal.SIGTERM)
        alive = {p: s for p, s in {**children, **termed}.items() if _alive(p, s)}
        if not alive:
            break
        if time.monotonic() > deadline:
            if killed:
                break  # stuck in the kernel (D state): nothing more a signal can do
            for pid, started in alive.items():
                _signal(pid, started, signal.SIGKILL)
            killed, deadline = True, time.monotonic() + 5  # SIGKILL is not refused: only wait for it
            continue
        time.sleep(0.1)  # bounded by the deadline; nothing to wait on for non-children
    for path in records.glob("*/*.json"):  # every recorded process is gone now
        path.unlink(missing_ok=True)


def main(data_dir: Path) -> int:
    children: dict[int, str] = {}
    for line in sys.stdin:
        word, *rest = line.split()
        if word == "bye":
            return 0
        if word == "+" and len(rest) == 2:
            children[int(rest[0])] = rest[1]
        elif word == "-" and rest:
            children.pop(int(rest[0]), None)
    clean_up(children, data_dir / "processes")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
