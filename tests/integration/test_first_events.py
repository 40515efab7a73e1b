"""The first events of a fresh system reach every service: ``autoserve apply`` creates each
service's durable with the streams, before anything publishes, each from the start point
its job needs (autoserve_events.durables). Before, each service created its own durable
"deliver new" when it started, after the prober had published: sequence 1 was never stored."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from nats.aio.client import Client
from nats.js.api import DeliverPolicy

from autoserve_events import EVENTS_STREAM, PROBES_STREAM, FailureDetected, HealthChanged, durables, encode, subject_for
from autoserve_runtime import EmbeddedNatsServer, provision

from .conftest import ServiceRunner, apply_yaml, config_for, wait_for
from .test_cli import autoserve
from .test_detector import WEB, probe, publish


async def pending(nc: Client, spec: durables.DurableSpec) -> int:
    return (await nc.jetstream().consumer_info(spec.stream, spec.name)).num_pending


async def test_apply_creates_every_durable_so_the_first_probe_is_folded_and_kept(
    nats_server: EmbeddedNatsServer, nc: Client, detector_runner: ServiceRunner, tmp_path: Path
) -> None:
    config = tmp_path / "apps.yaml"
    config.write_text(config_for(WEB))
    applied = await asyncio.to_thread(autoserve, "apply", "-c", str(config), "--nats-url", nats_server.url)
    assert applied.returncode == 0, applied.stderr
    first = probe(False)
    await publish(nc, first)  # sequence 1, before any service runs
    info = await nc.jetstream().stream_info(PROBES_STREAM)
    assert (info.state.first_seq, info.state.last_seq) == (1, 1)
    for spec in durables.durable_specs():
        assert await pending(nc, spec) == (1 if spec.stream == PROBES_STREAM else 0), spec.name
    await detector_runner.start()
    detector = detector_runner.service
    await wait_for(lambda: detector.consumer.stats.received >= 1, what="the first probe folded")
    assert detector.detector.instances  # it became state


async def test_acting_services_do_not_start_on_failures_stored_before_they_existed(nc: Client) -> None:
    """A stream with history and no durables yet (an upgrade): the reporter takes it all,
    recovery and the alerter start from their creation, so an old failure is not acted on."""
    await apply_yaml(nc, config_for(WEB))  # streams only, as an older version provisioned
    js = nc.jetstream()
    old = FailureDetected(failure_type="health_check_failed", instance_id="w-1", app_name="web", severity="high",
                          message="old", details={}, timestamp=time.time(), consecutive_count=3, total_count=3,
                          first_occurrence=time.time(), is_critical=False, cause_event_id="x")  # fmt: skip
    await js.publish(subject_for(old), encode(old))
    await provision(js, durables=True)
    assert await pending(nc, durables.REPORTER_EVENTS) == 1
    assert await pending(nc, durables.RECOVERY_WORK) == 0
    assert await pending(nc, durables.ALERTER) == 0
    health = HealthChanged(instance_id="w-1", app_name="web", healthy=False, previous=True, consecutive=3,
                           reason="new", timestamp=time.time())  # fmt: skip
    await js.publish(subject_for(health), encode(health))
    await wait_for_pending(nc, durables.RECOVERY_WORK, 1)
    assert (await js.stream_info(EVENTS_STREAM)).state.last_seq == 2


async def wait_for_pending(nc: Client, spec: durables.DurableSpec, n: int) -> None:
    deadline = time.monotonic() + 10
    while await pending(nc, spec) != n:
        assert time.monotonic() < deadline, f"{spec.name}: {await pending(nc, spec)} pending, wanted {n}"
        await asyncio.sleep(0.05)


async def test_a_service_applies_its_own_tunables_to_the_durable_apply_created(nc: Client) -> None:
    """``apply`` creates recovery's work durable with the defaults; recovery's lease (its
    ack_wait) and two creators racing each other must still work."""
    from autoserve_runtime.consumer import create_durable, ensure_durable, pull_config

    js = nc.jetstream()
    await provision(js, durables=True)
    assert (await js.consumer_info(EVENTS_STREAM, durables.RECOVERY_WORK.name)).config.ack_wait == 30.0
    assert await create_durable(js, durables.RECOVERY_WORK, pull_ack_wait=15.0) is False
    info = await js.consumer_info(EVENTS_STREAM, durables.RECOVERY_WORK.name)
    assert (info.config.ack_wait, DeliverPolicy(info.config.deliver_policy)) == (15.0, DeliverPolicy.NEW)
    await js.delete_consumer(EVENTS_STREAM, durables.RECOVERY_WORK.name)
    config = pull_config(durables.RECOVERY_WORK, 15.0)
    created = await asyncio.gather(*(ensure_durable(js, EVENTS_STREAM, config) for _ in range(3)))
    assert sum(c for c, _ in created) >= 1 and {i.name for _, i in created} == {durables.RECOVERY_WORK.name}
