"""A nats-server running deploy/nats/nats-server.conf with every password planted, and
what the bus security tests do with it: sessions as one user, the admin's reads and
provisioning, the ``autoserve`` command as an operator runs it. Also a cluster of them on
deploy/nats/nats-cluster.conf, with the credentials deploy/make-secrets.sh generates."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js.api import DeliverPolicy

from autoserve_cli.apply import store_config
from autoserve_config import load_config_text
from autoserve_events import (
    EVENTS_STREAM,
    Event,
    decode,
)
from autoserve_runtime import free_port, nats_server_binary, provision, spawn_child, stop_child
from autoserve_runtime.bus import (
    NatsAuth,
    connect,
)

from ..conftest import plant_secret
from ..integration.conftest import LOCALHOST, check, config_for

ROOT = Path(__file__).resolve().parents[2]
NATS_CONF = ROOT / "deploy" / "nats" / "nats-server.conf"
NATS_CLUSTER_CONF = ROOT / "deploy" / "nats" / "nats-cluster.conf"
AUTOSERVE = str(Path(sys.executable).parent / "autoserve")
SERVICE_USERS = ("prober", "detector", "breaker", "recovery", "reporter", "alerter")
USERS = (*SERVICE_USERS, "admin", "operator", "client")


def inbox(user: str) -> str:
    """The user's inbox prefix, as the deploy config grants it (AUTOSERVE_NATS_INBOX_PREFIX)."""
    return f"_INBOX_{user}"


@dataclass
class SecureNats:
    """nats-server on the deploy config; every password planted, random, and recorded."""

    store: Path
    conf: Path = NATS_CONF
    port: int = field(default_factory=free_port)
    passwords: dict[str, str] = field(
        default_factory=lambda: {u: f"planted-{u}-{secrets.token_hex(12)}" for u in USERS}
    )
    # More of the server's environment: a cluster node's name, listener, route credential.
    server_vars: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        for user, password in self.passwords.items():
            plant_secret(password, f"nats password of {user}")  # the session's log scan looks for them

    @property
    def url(self) -> str:
        return f"nats://{LOCALHOST}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.store / "nats-server.log"

    def server_env(self) -> dict[str, str]:
        passwords = {f"AUTOSERVE_{u.upper()}_PASSWORD": p for u, p in self.passwords.items()}
        return {**os.environ, **passwords, **self.server_vars}

    def start(self, timeout: float = 20.0) -> SecureNats:
        self.store.mkdir(parents=True, exist_ok=True)
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        command = [nats_server_binary(), "-c", str(self.conf), "-a", LOCALHOST, "-p", str(self.port),
                   "-sd", str(self.store / "js"), "-l", str(self.log_file)]  # fmt: skip
        self.process = spawn_child(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.server_env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            if self.log_file.exists():
                with self.log_file.open("rb") as log:
                    log.seek(offset)
                    if b"Server is ready" in log.read():
                        return self
            time.sleep(0.05)
        raise RuntimeError(f"nats-server not ready in {timeout}s; see {self.log_file}")

    def stop(self) -> None:
        if self.process is not None:
            stop_child(self.process)

    def violations(self) -> list[str]:
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return [line for line in text.splitlines() if "Violation" in line]

    def password_file(self, user: str, directory: Path) -> Path:
        path = directory / f"{user}.password"
        plant_secret(self.passwords[user], f"nats password of {user}", allowed_in=[path])
        path.write_text(self.passwords[user] + "\n")
        path.chmod(0o600)
        return path

    def env(self, user: str, directory: Path | None = None) -> dict[str, str]:
        """A service's environment: the URL, its user, its password (from a file if given)."""
        env = {"AUTOSERVE_NATS_URL": self.url, "AUTOSERVE_NATS_USER": user, "AUTOSERVE_NATS_INBOX_PREFIX": inbox(user)}
        if directory is not None:
            env["AUTOSERVE_NATS_PASSWORD_FILE"] = str(self.password_file(user, directory))
        else:
            env["AUTOSERVE_NATS_PASSWORD"] = self.passwords[user]
        return env

    def auth(self, user: str) -> NatsAuth:
        return NatsAuth(user=user, password=self.passwords[user], inbox_prefix=inbox(user))


def make_secrets(root: Path, **env: str) -> Path:
    """``deploy/make-secrets.sh`` run in a copy of deploy/ under ``root`` (``env``: e.g.
    NATS_ROUTES_TO), its passwords planted; the secrets directory it wrote."""
    deploy = root / "deploy"
    if not deploy.exists():
        shutil.copytree(ROOT / "deploy", deploy, ignore=shutil.ignore_patterns("secrets"))
    made = subprocess.run(["sh", str(deploy / "make-secrets.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})  # fmt: skip
    assert made.returncode == 0, made.stderr
    secrets_dir = deploy / "secrets"
    for password in secrets_dir.glob("*.password"):  # the session's log scan looks for them
        plant_secret(password.read_text(), f"deploy secret {password.name}", allowed_in=[secrets_dir])
    return secrets_dir


def env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines, as compose's env_file and Kubernetes' --from-env-file read them."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def secure_cluster(store: Path, size: int = 3) -> list[SecureNats]:
    """``size`` nodes on deploy/nats/nats-cluster.conf, on 127.0.0.1 with free ports, sharing
    the users and the route credential that deploy/make-secrets.sh generated for them."""
    cluster_ports = [free_port() for _ in range(size)]
    secrets_dir = make_secrets(store, NATS_ROUTES_TO=" ".join(f"{LOCALHOST}:{p}" for p in cluster_ports))
    passwords = {user: (secrets_dir / f"{user}.password").read_text() for user in USERS}
    cluster_vars = env_file(secrets_dir / "nats-cluster.env")
    return [
        SecureNats(store / f"node-{i}", NATS_CLUSTER_CONF, passwords=passwords, server_vars={
            **cluster_vars, "AUTOSERVE_NATS_SERVER_NAME": f"node-{i}",
            "AUTOSERVE_NATS_CLUSTER_LISTEN": f"{LOCALHOST}:{port}"})
        for i, port in enumerate(cluster_ports, start=1)
    ]  # fmt: skip


@pytest.fixture
def secure_nats(tmp_path: Path) -> Iterator[SecureNats]:
    server = SecureNats(tmp_path / "secure-nats").start()
    yield server
    server.stop()


def refused(kind: str, subject: str) -> str:
    """The error nats-py hands to ``error_cb`` (it lower-cases the server's -ERR text)."""
    return f'nats: permissions violation for {kind} to "{subject.lower()}"'


@dataclass
class Session:
    """A raw nats-py connection as one user, recording the server's async errors."""

    nc: Client
    errors: list[str]

    async def refusals(self, action, timeout: float = 5.0) -> list[str]:  # type: ignore[no-untyped-def]
        """The errors the server sends for ``action``. A refusal (-ERR) is asynchronous and
        can come after the next PONG, so wait for it (bounded): only call this for an action
        that is expected to be refused; prove allowed ones by their effect."""
        before = len(self.errors)
        await action()
        await self.nc.flush(timeout=5)
        deadline = time.monotonic() + timeout
        while len(self.errors) == before and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.errors[before:]


async def session(server: SecureNats, user: str, inbox_prefix: str | None = None) -> Session:
    """``inbox_prefix`` defaults to the user's own (the operator has none: it only subscribes)."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        server.url, user=user, password=server.passwords[user], error_cb=on_error, max_reconnect_attempts=0,
        inbox_prefix=inbox_prefix or inbox(user),
    )  # fmt: skip
    return Session(nc, errors)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any NATS setting, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("AUTOSERVE_NATS_")}, **extra}


async def command(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """An ``autoserve`` command as the operator runs it, off the event loop."""
    run = subprocess.run
    return await asyncio.to_thread(run, [AUTOSERVE, *args], env=env, capture_output=True, text=True, timeout=60)


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status
    except OSError:
        return 0


async def stored(server: SecureNats, filter_subject: str) -> list[tuple[str, Event]]:
    """Every event in AUTOSERVE_EVENTS on ``filter_subject``, read as the admin."""
    admin = await connect(server.url, "test-admin-read", timeout=10, auth=server.auth("admin"))
    found: list[tuple[str, Event]] = []
    try:
        js = admin.jetstream()
        info = await js.stream_info(EVENTS_STREAM, subjects_filter=filter_subject)
        total = sum((info.state.subjects or {}).values())
        if total:
            sub = await js.subscribe(filter_subject, stream=EVENTS_STREAM, ordered_consumer=True,
                                     deliver_policy=DeliverPolicy.ALL)  # fmt: skip
            for _ in range(total):
                msg = await sub.next_msg(timeout=5)
                found.append((msg.subject, decode(msg.data)))
            await sub.unsubscribe()
    finally:
        await admin.close()
    return found


async def provisioned(server: SecureNats) -> None:
    nc = await connect(server.url, "test-admin", timeout=10, auth=server.auth("admin"))
    try:
        await provision(nc.jetstream())
        text = config_for({"web": {"health_check": check(path="/"), "instances": [{"id": "w-1", "host": LOCALHOST,
                                                                                     "port": 9}]}})  # fmt: skip
        await store_config(nc.jetstream(), load_config_text(text))
    finally:
        await nc.close()
