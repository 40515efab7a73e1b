"""nginx upstreams: one file per app, owned by the recovery service.

The file is rewritten atomically (temporary file, fsync, rename) under an exclusive lock,
then nginx reloads. An ejected server stays listed with ``down`` (nginx then routes
around it) so the file shows what is out and why; a server whose instance is gone is
dropped. A reload that fails puts the previous file back.

    # managed by autoserve-recovery: app web
    upstream autoserve_web {
        server 127.0.0.1:18081;  # web-1
        server 127.0.0.1:18082 down;  # web-2
    }
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..ports import Member, RecoveryError

_LINE = re.compile(r"^\s*server\s+(?P<addr>\S+?)(?P<down>\s+down)?;\s*#\s*(?P<id>[A-Za-z0-9_-]+)\s*$")


@dataclass(frozen=True)
class NginxSettings:
    upstream_dir: Path
    reload_command: tuple[str, ...] = ("nginx", "-s", "reload")


def upstream_name(app_name: str) -> str:
    return f"autoserve_{app_name.replace('-', '_')}"


def render(app_name: str, members: list[Member], down: set[str]) -> str:
    lines = [f"# managed by autoserve-recovery: app {app_name}", f"upstream {upstream_name(app_name)} {{"]
    for m in sorted(members, key=lambda m: m.instance_id):
        lines.append(f"    server {m.host}:{m.port}{' down' if m.instance_id in down else ''};  # {m.instance_id}")
    if not members:
        lines.append("    server 127.0.0.1:9 down;  # no members")  # nginx rejects an empty upstream
    return "\n".join([*lines, "}", ""])


def parse_down(text: str) -> set[str]:
    return {m["id"] for line in text.splitlines() if (m := _LINE.match(line)) and m["down"]}


class NginxUpstreams:
    def __init__(self, settings: NginxSettings) -> None:
        self.settings = settings
        self._lock = asyncio.Lock()

    def path(self, app_name: str) -> Path:
        return self.settings.upstream_dir / f"{app_name}.conf"

    def manages(self, app_name: str) -> bool:
        """The app is behind this nginx: its upstream file exists."""
        return self.path(app_name).exists()

    def is_down(self, app_name: str, instance_id: str) -> bool:
        try:
            return instance_id in parse_down(self.path(app_name).read_text())
        except OSError:
            return False

    async def set_down(
        self, app_name: str, members: list[Member], instance_id: str | None, down: bool
    ) -> dict[str, object]:
        """Mark one server down (or up), keep every other server's mark, reload nginx."""
        async with self._lock:
            return await asyncio.to_thread(self._rewrite, app_name, members, instance_id, down)

    def _rewrite(self, app_name: str, members: list[Member], instance_id: str | None, down: bool) -> dict[str, object]:
        path = self.path(app_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if instance_id is not None and instance_id not in {m.instance_id for m in members}:
            raise RecoveryError(f"instance {instance_id!r} is not a member of {app_name}'s upstream")
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # replicas on this host take turns
            previous = path.read_text() if path.exists() else None
            marked = parse_down(previous or "") & {m.instance_id for m in members}
            if instance_id is not None:
                (marked.add if down else marked.discard)(instance_id)
            text = render(app_name, members, marked)
            if text == previous:
                return {"upstream_file": str(path), "down": sorted(marked), "reloaded": False}
            self._write(path, text)
            try:
                self._reload()
            except RecoveryError:
                if previous is None:
                    path.unlink(missing_ok=True)
                else:
                    self._write(path, previous)
                raise
        return {"upstream_file": str(path), "down": sorted(marked), "reloaded": True}

    @staticmethod
    def _write(path: Path, text: str) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)

    def _reload(self) -> None:
        import subprocess

        try:
            done = subprocess.run(self.settings.reload_command, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RecoveryError(f"nginx reload ({' '.join(self.settings.reload_command)}): {exc}") from None
        if done.returncode != 0:
            raise RecoveryError(f"nginx reload failed ({done.returncode}): {done.stderr.strip()[:300]}")
