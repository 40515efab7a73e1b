"""Two detector members (real ``autoserve run detector`` processes) under a flapping fleet:
what AUTOSERVE_EVENTS stores per instance is exactly what one detector core folds from the
same stored inputs, through a SIGKILL in the middle of incidents and a SIGSTOP past the
member's lease (then SIGCONT): nothing twice, nothing missing, nothing contradicting."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
from autoserve_detector.core.detector import Detector
from autoserve_detector.service import thresholds
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families

from autoserve_cli.cluster_status import read_members
from autoserve_config import DetectorConfig, load_config_text
from autoserve_events import (
    EVENTS_STREAM,
    PROBES_STREAM,
    ErrorKind,
    Event,
    FailureDetected,
    HealthChanged,
    ProbeCompleted,
    decode,
    encode,
    subject_for,
)
from autoserve_runtime import EmbeddedNatsServer, free_port, provision
from tests.support.cluster_counts import read_stream
from tests.support.secure_nats import (
    SecureNats,
    clean_env,
    provisioned,
    secure_nats,  # noqa: F401  (a fixture)
    session,
)
from tests.support.secure_nats import (
    stored as stored_as_admin,
)

from .conftest import LOCALHOST, apply_yaml, check, config_for, wait_for

EXPIRED_ALONE = "membership key expired while alone (NATS away past the TTL); re-reading the members"
pytestmark = pytest.mark.members  # the members lane of make test, beside the others

AUTOSERVE = str(Path(sys.executable).parent / "autoserve")
INSTANCES = [f"f-{i}" for i in range(40)]
ROUND_SECONDS = 0.1
TTL = 2
APPS = {
    "flap": {
        "health_check": check(failure_threshold=2, success_threshold=1, period_seconds=1),
        "instances": [{"id": i, "host": LOCALHOST, "port": 9} for i in INSTANCES],
    }
}


def healthy(round_: int, n: int) -> bool:
    """Runs of 2 to 5 rounds each way, out of phase: incidents start and end all the time."""
    run = 2 + n % 4
    return ((round_ + n) // run) % 2 == 0


def probe(round_: int, n: int, app: str = "flap", instance: str = "") -> ProbeCompleted:
    ok = healthy(round_, n)
    failed = {} if ok else {"status_code": 503, "error": "Unexpected status code: 503",
                            "error_kind": ErrorKind.UNEXPECTED_STATUS}  # fmt: skip
    return ProbeCompleted(instance_id=instance or INSTANCES[n], app_name=app, check_type="http", is_healthy=ok,
                          response_time_ms=3.0, timestamp=time.time(), **failed)  # fmt: skip


@dataclass
class Member:
    name: str
    log: Path
    process: subprocess.Popen[bytes] | None = None
    port: int = 0

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{self.port}/metrics", timeout=10) as reply:
            families = text_string_to_metric_families(reply.read().decode())
            return {(s.name, frozenset(s.labels.items())): s.value for family in families for s in family.samples}

    def start(self, url: str, **extra: str) -> Member:
        self.port = free_port()
        env = {**os.environ, "AUTOSERVE_MEMBER_TTL": str(TTL), **extra, "AUTOSERVE_MEMBER": self.name,
               "AUTOSERVE_LOG_FORMAT": "json", "AUTOSERVE_DATA_DIR": str(self.log.parent / f"{self.name}-data")}  # fmt: skip
        with self.log.open("ab") as out:
            nats = ["--nats-url", url] if url else []
            command = [AUTOSERVE, "run", "detector", *nats, "--metrics-port", str(self.port)]
            self.process = subprocess.Popen(command, stdout=out, stderr=out, env=env)
        return self

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def lines(self, event: str) -> list[dict]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"event": "{event}"' in line:
                found.append(json.loads(line))
        return found


async def partitions_owned(nc: Client, names: tuple[str, ...] = ("a", "b", "solo")) -> dict[str, int]:
    """What each live member says it owns (its member record, renewed every TTL/3)."""
    return {r.member: int(r.owns.split()[0]) for r in await read_members(nc.jetstream())
            if r.service == "detector" and r.member in names and r.owns}  # fmt: skip


async def settled(nc: Client, *members: str) -> bool:
    """Exactly ``members`` are live and split the 64 partitions between them."""
    owned = await partitions_owned(nc)
    return set(owned) == set(members) and sum(owned.values()) == 64 and all(owned.values())


async def all_folded(nc: Client, durables: tuple[str, ...] = ("autoserve-detector", "autoserve-detector-1")) -> bool:
    """Every member durable has acknowledged the last probe: every output is stored."""
    js = nc.jetstream()
    last = (await js.stream_info(PROBES_STREAM)).state.last_seq
    for durable in durables:
        info = await js.consumer_info(PROBES_STREAM, durable)
        if info.num_ack_pending or (info.ack_floor.stream_seq if info.ack_floor else 0) < last:
            return False
    return True


class Fleet:
    """Publishes one probe per instance per round until stopped."""

    def __init__(self, nc: Client) -> None:
        self._js = nc.jetstream()
        self.rounds = 0
        self._running = True

    async def run(self) -> None:
        while self._running and self.rounds < 600:  # bounded: 60 s of rounds at most
            acks = [await self._js.publish_async(subject_for(p), encode(p), headers={"Nats-Msg-Id": p.event_id})
                    for p in (probe(self.rounds, n) for n in range(len(INSTANCES)))]  # fmt: skip
            await asyncio.gather(*acks)
            self.rounds += 1
            await asyncio.sleep(ROUND_SECONDS)

    def stop(self) -> None:
        self._running = False


async def reference(nc: Client) -> tuple[dict[str, list[HealthChanged]], Counter[str], Counter[str]]:
    """One detector core folding AUTOSERVE_PROBES as stored, in order: its HealthChanged per
    instance, its FailureDetected ids, and its outputs by type."""
    apps = load_config_text(config_for(APPS)).apps
    core = Detector(DetectorConfig(), thresholds(dict(apps)))
    changes: dict[str, list[HealthChanged]] = defaultdict(list)
    failures: Counter[str] = Counter()
    types: Counter[str] = Counter()

    def fold(msg: Msg) -> None:
        for output in core.apply(decode(msg.data)):
            types[type(output).__name__] += 1
            if isinstance(output, HealthChanged):
                changes[output.instance_id].append(output)
            else:
                failures[output.event_id] += 1

    await read_stream(nc.jetstream(), PROBES_STREAM, "autoserve.probe.>", fold)
    return changes, failures, types


async def stored(nc: Client) -> tuple[dict[str, list[HealthChanged]], Counter[str]]:
    changes: dict[str, list[HealthChanged]] = defaultdict(list)
    failures: Counter[str] = Counter()

    def add(msg: Msg) -> None:
        event: Event = decode(msg.data)
        if isinstance(event, HealthChanged):
            changes[event.instance_id].append(event)
        elif isinstance(event, FailureDetected):
            failures[event.event_id] += 1

    await read_stream(nc.jetstream(), EVENTS_STREAM, "autoserve.event.>", add)
    return changes, failures


def transitions(changes: list[HealthChanged]) -> list[tuple]:
    return [(c.event_id, c.previous, c.healthy, c.consecutive, c.timestamp) for c in changes]


async def test_two_members_store_what_one_detector_folds_through_a_kill_and_a_pause(
    tmp_path: Path, nats_server: EmbeddedNatsServer, nc: Client
) -> None:
    await provision(nc.jetstream())
    await apply_yaml(nc, config_for(APPS))
    a, b = Member("a", tmp_path / "a.log"), Member("b", tmp_path / "b.log")
    fleet = Fleet(nc)
    publishing: asyncio.Task[None] | None = None
    try:
        a.start(nats_server.url)
        b.start(nats_server.url)
        await wait_for(lambda: settled(nc, "a", "b"), 30, "both members own their share")
        publishing = asyncio.create_task(fleet.run())
        await wait_for(lambda: fleet.rounds >= 40, 30, "4 s of flapping")

        a.signal(signal.SIGKILL)  # in the middle of incidents: about half the instances are failing
        a.process.wait()
        await wait_for(lambda: settled(nc, "b"), 30, "b owns every partition")
        await wait_for(lambda: b.lines("partitions taken over"), 10, "b rebuilt a's partitions")
        a.start(nats_server.url)  # the same name again: it gets its durable back
        await wait_for(lambda: settled(nc, "a", "b"), 30, "a rejoined")

        rounds = fleet.rounds
        await wait_for(lambda: fleet.rounds >= rounds + 20, 30, "2 s more of flapping")
        paused_at = time.monotonic()
        b.signal(signal.SIGSTOP)  # past its lease: a takes its partitions over meanwhile
        await wait_for(lambda: settled(nc, "a"), 30, "a owns every partition while b is paused")
        await wait_for(lambda: len(a.lines("partitions taken over")) >= 1, 10, "a rebuilt b's partitions")
        await wait_for(lambda: time.monotonic() - paused_at >= 2 * TTL, 10, "a pause of 2 TTLs at least")
        paused = time.monotonic() - paused_at
        b.signal(signal.SIGCONT)
        await wait_for(lambda: settled(nc, "a", "b"), 30, "b is a member again")
        rounds = fleet.rounds
        await wait_for(lambda: fleet.rounds >= rounds + 20, 30, "2 s more of flapping")
        fleet.stop()
        await publishing
        await wait_for(lambda: all_folded(nc), 60, "both members acknowledged every probe")
    finally:
        fleet.stop()
        if publishing is not None and not publishing.done():
            publishing.cancel()
        for member in (a, b):
            member.stop()

    expected_changes, expected_failures, _ = await reference(nc)
    got_changes, got_failures = await stored(nc)
    takeovers = [(m.name, line["partitions"], line["published"]) for m in (a, b)
                 for line in m.lines("partitions taken over")]  # fmt: skip
    print(
        f"\n{fleet.rounds} rounds x {len(INSTANCES)} instances; b paused {paused:.1f} s (TTL {TTL} s); "
        f"takeovers (member, partitions, outputs published by the rebuild): {takeovers}; "
        f"{sum(map(len, got_changes.values()))} HealthChanged, {sum(got_failures.values())} FailureDetected"
    )
    assert sum(map(len, expected_changes.values())) > 200  # a flapping fleet, not a quiet one
    for instance in INSTANCES:
        assert transitions(got_changes[instance]) == transitions(expected_changes[instance]), instance
    assert got_failures == expected_failures  # each once, none missing, none extra
    skipped = [line["skipped"] for m in (a, b) for line in m.lines("detector stopped")]
    assert skipped and all(skipped), "each member skipped the other's inputs"


async def test_one_member_paused_past_its_lease_holds_its_inputs_and_counts_each_output_once(
    tmp_path: Path, nats_server: EmbeddedNatsServer, nc: Client
) -> None:
    """Alone, a pause past its lease does not fence it: nobody can have taken its partitions
    over, so it goes on where it was, with nothing to rebuild (membership's alone rule; with
    two members the pause fences it: the test above). Stored outputs and its counters are
    one detector's."""
    await provision(nc.jetstream())
    await apply_yaml(nc, config_for(APPS))
    solo = Member("solo", tmp_path / "solo.log")
    fleet = Fleet(nc)
    publishing: asyncio.Task[None] | None = None
    try:
        solo.start(nats_server.url)
        await wait_for(lambda: settled(nc, "solo"), 30, "the member owns every partition")
        publishing = asyncio.create_task(fleet.run())
        await wait_for(lambda: fleet.rounds >= 20, 30, "2 s of flapping")
        paused_at = time.monotonic()
        solo.signal(signal.SIGSTOP)
        await wait_for(lambda: time.monotonic() - paused_at >= 2 * TTL, 10, "a pause of 2 TTLs")
        solo.signal(signal.SIGCONT)
        await wait_for(lambda: solo.lines(EXPIRED_ALONE), 30, "its key renewed after the pause")
        rounds = fleet.rounds
        await wait_for(lambda: fleet.rounds >= rounds + 20, 30, "2 s more of flapping")
        fleet.stop()
        await publishing
        await wait_for(lambda: all_folded(nc, ("autoserve-detector",)), 60, "every probe acknowledged")
        metrics = solo.metrics()
    finally:
        fleet.stop()
        if publishing is not None and not publishing.done():
            publishing.cancel()
        solo.stop()

    expected_changes, expected_failures, expected_types = await reference(nc)
    got_changes, got_failures = await stored(nc)
    for instance in INSTANCES:
        assert transitions(got_changes[instance]) == transitions(expected_changes[instance]), instance
    assert got_failures == expected_failures
    assert not solo.lines("partitions taken over")  # kept its state: no rebuild after the pause
    counted = {kind: metrics.get(("autoserve_events_out_total", frozenset({"service": "detector", "type": kind}.items())))
               for kind in expected_types}  # fmt: skip
    assert counted == dict(expected_types)  # each output counted once, none while fenced
    folded = ("autoserve_events_in_total", frozenset({"service": "detector", "type": "ProbeCompleted"}.items()))
    assert metrics[folded] == fleet.rounds * len(INSTANCES)


async def test_members_with_their_deployed_credentials_are_refused_nothing(
    tmp_path: Path,
    secure_nats: SecureNats,  # noqa: F811
) -> None:
    """deploy/nats/nats-server.conf lets the members do all they do: slot leases, their slot
    durables, the floors, a rebuild's replay, a graceful stop's final floors and the takeover
    after it. On the way: probes stored before a new member's durable existed, in its share
    and unfolded (the other member is paused), are folded and published by its first rebuild."""
    await provisioned(secure_nats)  # app web, instance w-1: partition 42, member b's of {a, b}
    env = {**clean_env(**secure_nats.env("detector")), "AUTOSERVE_MEMBER_TTL": "10"}  # the pause stays within it
    a, b = Member("a", tmp_path / "a.log"), Member("b", tmp_path / "b.log")
    prober = await session(secure_nats, "prober")
    try:
        a.start("", **env)
        await wait_for(lambda: a.lines("detector started"), 30, "a started")
        a.signal(signal.SIGSTOP)
        js = prober.nc.jetstream()
        for n in range(6):
            event = probe(n, 0, app="web", instance="w-1")
            await js.publish(subject_for(event), encode(event), headers={"Nats-Msg-Id": event.event_id})
        b.start("", **env)
        await wait_for(lambda: b.lines("state rebuilt"), 30, "b rebuilt its share")
        a.signal(signal.SIGCONT)
        assert b.lines("state rebuilt")[0]["published"] > 0
        assert [e for _, e in await stored_as_admin(secure_nats, "autoserve.event.health.>")], "nothing published"
        b.stop()  # graceful: final floors, and a takes its partitions over at once
        await wait_for(lambda: a.lines("partitions taken over"), 30, "a took b's partitions over")
    finally:
        await prober.nc.close()
        for member in (a, b):
            member.stop()
    refused = [line for line in secure_nats.violations() if "user:detector" in line]
    assert refused == []
    for member in (a, b):
        text = member.log.read_text(errors="replace")
        assert "permission" not in text.lower() and "floors not written" not in text, text[-3000:]
