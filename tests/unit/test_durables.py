"""Every service's durable, as provisioned (autoserve_events.durables)."""

from __future__ import annotations

from nats.js.api import DeliverPolicy

from autoserve_config import DetectorConfig
from autoserve_events import durables
from autoserve_runtime import ConsumerSpec
from autoserve_runtime.consumer import pull_config


def test_the_detector_starts_its_window_back_as_its_default_settings_say() -> None:
    assert DetectorConfig().failure_rate_window_minutes * 60 == durables.DETECTOR_WINDOW_SECONDS


def test_names_are_unique_and_pushed_durables_take_one_wildcard() -> None:
    specs = durables.durable_specs()
    assert len({s.name for s in specs}) == len(specs)
    for spec in specs:
        assert spec.pull or len(spec.filter_subjects) == 1, spec.name  # several filters are 15x slower


def test_each_start_point_becomes_the_deliver_policy_its_job_needs() -> None:
    policy = {
        s.name: (pull_config(s, 15.0) if s.pull else ConsumerSpec.of(s).config()) for s in durables.durable_specs()
    }
    assert policy["autoserve-reporter-probes"].deliver_policy is DeliverPolicy.ALL
    assert policy["autoserve-alerter"].deliver_policy is DeliverPolicy.NEW
    assert policy["autoserve-recovery"].deliver_policy is DeliverPolicy.NEW
    assert policy["autoserve-recovery"].ack_wait == 15.0
    detector = policy["autoserve-detector"]
    assert detector.deliver_policy is DeliverPolicy.BY_START_TIME and detector.opt_start_time


def test_a_deployment_may_name_its_consumer_otherwise() -> None:
    spec = ConsumerSpec.of(durables.BREAKER, "breaker-0-of-2", max_ack_pending=7)
    assert (spec.durable, spec.filter_subject, spec.max_ack_pending) == (
        "breaker-0-of-2", "autoserve.probe.completed.*.*", 7,
    )  # fmt: skip
