"""A 3-node NATS JetStream cluster on 127.0.0.1 and the services on it, all real processes:
the nats-server nodes (``EmbeddedNatsCluster``), ``autoserve apply`` and ``autoserve run
<service>`` as an operator runs them, and nginx as a fast HTTP target for a steady load.

Every wait is a condition with a deadline (``waiting.wait_for``); a JetStream request made
while a node is down or a leader is being elected may fail, and a condition reads that as
"not yet", never as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client.parser import text_string_to_metric_families

from autoserve_events import EVENTS_STREAM, PROBES_STREAM
from autoserve_runtime import connect, free_port
from autoserve_runtime.nats_cluster import EmbeddedNatsCluster
from autoserve_runtime.process import spawn_child, stop_child

from .secure_nats import get
from .waiting import wait_for

LOCALHOST = "127.0.0.1"
AUTOSERVE = str(Path(sys.executable).parent / "autoserve")
STREAMS = (PROBES_STREAM, EVENTS_STREAM)
# What a JetStream request may raise while its node is gone or its stream has no leader.
UNAVAILABLE = (nats.errors.Error, TimeoutError, OSError)


# -- the cluster -------------------------------------------------------------------------------


async def client(url: str, name: str = "cluster-test") -> Client:
    """A test's own connection (the seed list, or one node's URL), reconnecting for ever."""
    return await connect(url, name, timeout=30)


async def stream_leader(js: JetStreamContext, stream: str) -> str | None:
    """The node that leads ``stream`` now, None while there is none (or no answer)."""
    try:
        info = await js.stream_info(stream)
    except UNAVAILABLE:
        return None
    return info.cluster.leader if info.cluster else None


async def all_current(js: JetStreamContext, size: int) -> bool:
    """Every stream (the KV buckets' included) has a leader and ``size - 1`` followers, each
    online and current."""
    try:
        infos = await js.streams_info()
    except UNAVAILABLE:
        return False
    for info in infos:
        peers = (info.cluster.replicas or []) if info.cluster else []
        if info.cluster is None or info.cluster.leader is None or len(peers) != size - 1:
            return False
        if not all(peer.current and not peer.offline for peer in peers):
            return False
    return True


async def wait_node_back(cluster: EmbeddedNatsCluster, index: int, js: JetStreamContext, timeout: float = 60) -> None:
    """A relaunched node serves, says it is healthy (JetStream current), and every stream
    and bucket has all its replicas current again."""
    await wait_for(lambda: cluster.healthy(index), timeout, f"{cluster.node_names[index]} healthy", every=0.2)
    await wait_for(
        lambda: all_current(js, len(cluster.nodes)),
        timeout,
        f"every replica current after {cluster.node_names[index]} came back",
        every=0.2,
    )


# -- commands ------------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a child: this one without any AUTOSERVE_ setting, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AUTOSERVE_")}
    return env | extra


async def autoserve(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """An ``autoserve`` command to completion, off the event loop."""
    run = subprocess.run
    command = [AUTOSERVE, *args]
    return await asyncio.to_thread(run, command, env=env, capture_output=True, text=True, timeout=timeout)


async def apply(config: Path, url: str, replicas: int) -> str:
    """``autoserve apply`` with AUTOSERVE_STREAM_REPLICAS=``replicas``; its output."""
    env = clean_env(AUTOSERVE_STREAM_REPLICAS=str(replicas))
    done = await autoserve("apply", "-c", str(config), "--nats-url", url, env=env)
    assert done.returncode == 0, f"apply failed ({done.returncode}): {done.stdout}\n{done.stderr}"
    return done.stdout


# -- the services --------------------------------------------------------------------------------


@dataclass
class Services:
    """``autoserve run <service>`` processes on a seed list, each with its own /metrics port."""

    url: str
    logs: Path
    data: Path
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    reporter_ports: dict[str, int] = field(default_factory=dict)  # by process key
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)  # by service
    member_ttl: int = 2

    @property
    def reporter_port(self) -> int:
        """The (first) reporter's report API port."""
        return self.reporter_ports.setdefault("reporter", free_port())

    def env(self, name: str, url: str | None = None, key: str | None = None) -> dict[str, str]:
        key = key or name
        extra = {
            "prober": {"AUTOSERVE_DOCKER": "false"},
            "reporter": {"AUTOSERVE_CLICKHOUSE_URL": f"chdb://{self.data / 'clickhouse'}",
                         "AUTOSERVE_REPORTER_LISTEN": f"{LOCALHOST}:{self.reporter_ports.setdefault(key, free_port())}"},
        }.get(name, {})  # fmt: skip
        base = {"AUTOSERVE_NATS_URL": url or self.url, "AUTOSERVE_METRICS_PORT": str(self.ports[key]),
                "AUTOSERVE_DATA_DIR": str(self.data)}  # fmt: skip
        return clean_env(**(base | extra | self.extra_env.get(name, {})))

    def start(self, name: str, url: str | None = None, member: str | None = None) -> subprocess.Popen[bytes]:
        """``autoserve run name``; with ``member``, as that member (its key: ``name-member``)."""
        key = name if member is None else f"{name}-{member}"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ports.setdefault(key, free_port())
        env = self.env(name, url, key)
        if member is not None:
            env |= {"AUTOSERVE_MEMBER": member, "AUTOSERVE_MEMBER_TTL": str(self.member_ttl)}
        with (self.logs / f"{key}.log").open("ab") as log:
            process = spawn_child([AUTOSERVE, "run", name], env=env, stdout=log, stderr=log)
        self.processes[key] = process
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-4000:]

    def ready(self, name: str) -> bool:
        process = self.processes[name]
        assert process.poll() is None, f"{name} exited with {process.returncode}:\n{self.log(name)}"
        return get(f"http://{LOCALHOST}:{self.ports[name]}/readyz") == 200

    async def all_ready(self, timeout: float = 90) -> None:
        for name in self.processes:
            await wait_for(lambda n=name: self.ready(n), timeout, f"{name} /readyz 200", every=0.2)

    def metrics(self, name: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """``/metrics`` now: every sample by (name, labels)."""
        with urllib.request.urlopen(f"http://{LOCALHOST}:{self.ports[name]}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def stop(self) -> None:
        for process in self.processes.values():
            stop_child(process, 30)


def sample(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """One sample of a scrape (0 when absent: a counter not yet incremented)."""
    return metrics.get((name, frozenset(labels.items())), 0.0)


# -- a fast HTTP target --------------------------------------------------------------------------

NGINX_CONF = """\
daemon off;
master_process off;
worker_rlimit_nofile 16384;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {work}/tmp-body;
    proxy_temp_path {work}/tmp-proxy;
    fastcgi_temp_path {work}/tmp-fastcgi;
    uwsgi_temp_path {work}/tmp-uwsgi;
    scgi_temp_path {work}/tmp-scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /ok {{ default_type text/plain; return 200 "ok"; }}
        location = /fail {{ default_type text/plain; return 500 "failing on purpose"; }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(work: Path):  # type: ignore[no-untyped-def]
    """nginx on 127.0.0.1 answering ``/ok`` 200 and ``/fail`` 500; yields its port. Started
    through a link named cluster-nginx, so a ``pkill -x nginx`` elsewhere leaves it alone."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, port=port))
    link = work / "cluster-nginx"
    link.symlink_to(shutil.which("nginx") or "/usr/sbin/nginx")
    with (work / "nginx.out").open("ab") as out:
        process = spawn_child([str(link), "-p", str(work), "-c", str(conf)], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 15
        while get(f"http://{LOCALHOST}:{port}/ok") != 200:  # bounded: the deadline
            assert process.poll() is None and time.monotonic() < deadline, (work / "nginx.out").read_text()
            time.sleep(0.05)
        yield port
    finally:
        stop_child(process, 5)


def load_config(port: int, steady: int, failing: int, *, enabled: bool = True) -> str:
    """Apps ``steady`` (``/ok``) and ``failing`` (``/fail``, 500) with that many instances
    each, all on nginx at 127.0.0.1:``port``, probed every second (the shortest timeout
    and period a config may have); written by hand (flow style): it is big."""
    lines = ["apps:"]
    for app, count, path in (("steady", steady, "/ok"), ("failing", failing, "/fail")):
        lines += [
            f"  {app}:",
            "    health_check:",
            f"      path: {path}",
            f"      port: {port}",
            "      initial_delay_seconds: 0",
            "      period_seconds: 1",
            "      timeout_seconds: 1",
            "      failure_threshold: 3",
            f"      enabled: {'true' if enabled else 'false'}",
            "    instances:",
        ]
        lines += [f"      - {{id: {app}-{i:04d}, host: {LOCALHOST}}}" for i in range(count)]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def running_cluster(store: Path):  # type: ignore[no-untyped-def]
    """A 3-node cluster, healthy, for the length of the block; every node stopped after
    (SIGKILLed ones included: ``stop`` of a dead process is a no-op)."""
    cluster = EmbeddedNatsCluster(store, size=3)
    try:
        yield cluster.start(timeout=60)
    finally:
        for node in cluster.nodes:
            if node.running:  # a SIGSTOPped node must be able to stop too
                node.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        cluster.stop()
