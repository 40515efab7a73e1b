"""Prober members as real processes, and a log of every probe they publish.

``ProberMembers`` starts ``autoserve run prober`` children, each a member of the prober
(``AUTOSERVE_MEMBER``) with a short membership TTL, its own /metrics port, and no Docker;
it SIGKILLs or SIGTERMs them. ``ProbeLog`` follows ``ProbeCompleted`` on the bus with plain
nats-py and keeps, per instance, when each probe was made; its questions (probes per
window, probes of one target too close together, gaps across a moment) are what the
prober replica tests and ``bench/replicas_prober.py`` ask. Everything on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families

from autoserve_events import ProbeCompleted, decode, wildcard
from autoserve_runtime.ownership import owner_of

from .cluster import LOCALHOST, Services


@dataclass
class ProbeLog:
    """When each instance was probed (the probe's due time, wall clock), as published."""

    app: str
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    async def follow(self, nc: Client) -> None:
        async def on_message(msg: Msg) -> None:
            event = decode(msg.data)
            if isinstance(event, ProbeCompleted) and event.app_name == self.app:
                self.times[event.instance_id].append(event.scheduled_at or event.timestamp)

        await nc.subscribe(wildcard(ProbeCompleted, self.app, "*"), cb=on_message)

    def total(self) -> int:
        return sum(len(t) for t in self.times.values())

    def counts(self, instances: Iterable[str], start: float, end: float) -> dict[str, int]:
        """Probes of each instance made in ``[start, end)``."""
        return {i: sum(start <= t < end for t in self.times.get(i, [])) for i in instances}

    def doubles(self, instances: Iterable[str], start: float, end: float, period: float) -> dict[str, int]:
        """For each instance, probes in ``[start, end)`` that came less than half a period
        after the one before: a second probe in the same period slot."""
        found = {}
        for i in instances:
            made = sorted(t for t in self.times.get(i, []) if start <= t < end)
            found[i] = sum(b - a < period / 2 for a, b in itertools.pairwise(made))
        return found

    def probed_since(self, instances: Iterable[str], moment: float) -> bool:
        return all(any(t > moment for t in self.times.get(i, [])) for i in instances)

    def since(self, instances: Iterable[str], moment: float) -> dict[str, float]:
        """For each instance, seconds from ``moment`` to its first probe made after it."""
        return {i: min(t for t in self.times[i] if t > moment) - moment for i in instances}

    def gaps(self, instances: Iterable[str], moment: float) -> dict[str, float]:
        """For each instance, its last probe at or before ``moment`` to its first one after."""
        found = {}
        for i in instances:
            made = self.times[i]
            found[i] = min(t for t in made if t > moment) - max(t for t in made if t <= moment)
        return found


def owners(app: str, instances: Iterable[str], members: Iterable[str]) -> dict[str, str]:
    """Which member owns each instance: the prober's rendezvous hashing of ``app/instance``."""
    alive = frozenset(members)
    return {i: owner_of(f"{app}/{i}", alive) or "" for i in instances}


def metric(port: int, name: str) -> float | None:
    """One unlabelled sample of a member's /metrics; None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    return None


@dataclass
class ProberMembers:
    """``autoserve run prober`` members on one nats-server, by member name (``Services``
    runs them: each its own /metrics port and log, ``AUTOSERVE_MEMBER``, a short TTL)."""

    services: Services
    names: list[str] = field(default_factory=list)

    @classmethod
    def on(cls, url: str, logs: Path, ttl: int = 2, workers: int = 1) -> ProberMembers:
        services = Services(url, logs, logs / "data", member_ttl=ttl)
        if workers > 1:
            services.extra_env["prober"] = {"AUTOSERVE_PROBER_WORKERS": str(workers)}
        return cls(services)

    def start(self, name: str) -> None:
        self.services.start("prober", member=name)
        self.names.append(name)

    def process(self, name: str) -> subprocess.Popen[bytes]:
        return self.services.processes[f"prober-{name}"]

    def port(self, name: str) -> int:
        return self.services.ports[f"prober-{name}"]

    @property
    def alive(self) -> list[str]:
        return [name for name in self.names if self.process(name).poll() is None]

    def log(self, name: str) -> str:
        return self.services.log(f"prober-{name}")

    def ready(self, name: str) -> bool:
        return self.services.ready(f"prober-{name}")

    def targets(self, name: str) -> int:
        """What the member's ``probe_targets`` gauge says it owns (-1 while unreadable)."""
        value = metric(self.port(name), "autoserve_probe_targets")
        return -1 if value is None else int(value)

    def settled(self, total: int) -> bool:
        """Every live member ready, and the targets they own add up to ``total``."""
        names = self.alive
        return all(self.ready(n) for n in names) and sum(self.targets(n) for n in names) == total

    def kill(self, name: str) -> float:
        """SIGKILL: no goodbye. The wall time of the kill."""
        at = time.time()
        self.process(name).send_signal(signal.SIGKILL)
        self.process(name).wait()
        return at

    def pause(self, name: str) -> float:
        """SIGSTOP: the member keeps its state but renews nothing (a GC pause, a frozen VM)."""
        at = time.time()
        self.process(name).send_signal(signal.SIGSTOP)
        return at

    def resume(self, name: str) -> float:
        at = time.time()
        self.process(name).send_signal(signal.SIGCONT)
        return at

    def terminate(self, name: str) -> float:
        """SIGTERM: a graceful stop (the member leaves first). The wall time it was sent."""
        at = time.time()
        self.process(name).send_signal(signal.SIGTERM)
        return at

    async def wait_exit(self, name: str, timeout: float = 30) -> int:
        return await asyncio.to_thread(self.process(name).wait, timeout)

    def stop_all(self) -> None:
        for name in self.alive:
            self.process(name).send_signal(signal.SIGCONT)  # a paused member cannot stop
        self.services.stop()
