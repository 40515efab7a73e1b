"""One rule for every input: only configured apps and their listed or discovered instances
become state (autoserve_runtime.admission)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from autoserve_config import AppSpec, DockerDiscovery, Instance
from autoserve_events import ContainerObserved, ProbeCompleted
from autoserve_runtime import Admission
from autoserve_runtime.admission import known, refusal

APPS = {
    "web": AppSpec(instances=[Instance(id="web-1", host="127.0.0.1", port=80)]),
    "api": AppSpec(docker=DockerDiscovery(label="autoserve.app=api")),
}


def probe(app: str, instance: str) -> ProbeCompleted:
    return ProbeCompleted(instance_id=instance, app_name=app, check_type="http", is_healthy=True,
                          response_time_ms=1.0, timestamp=0.0)  # fmt: skip


def test_inputs_for_configured_instances_are_taken_from_any_producer() -> None:
    admit = Admission()
    admit.update(APPS)
    assert admit(probe("web", "web-1")) is None
    assert admit(probe("api", "0123456789ab")) is None  # a container found by its label
    observed = ContainerObserved(instance_id="0123456789ab", app_name="api", container_id="0123456789ab" * 5,
                                 event="start", timestamp=0.0)  # fmt: skip
    assert admit(observed) is None


def test_an_unconfigured_app_or_an_unlisted_instance_is_refused_with_a_reason() -> None:
    admit = Admission()
    admit.update(APPS)
    assert admit(probe("ghost", "g-1")) == "unconfigured: app 'ghost' is not configured"
    assert admit(probe("web", "web-9")) == (
        "unconfigured: instance 'web-9' is neither listed nor discovered for app 'web'"
    )
    assert admit(probe("web", "0123456789ab")) is not None  # web does not discover containers
    assert admit(probe("api", "api-1")) is not None  # not a container id


def test_before_any_config_everything_naming_an_instance_is_refused() -> None:
    assert Admission()(probe("web", "web-1")) is not None


def test_a_removed_app_is_refused_from_then_on() -> None:
    admit = Admission()
    admit.update(APPS)
    admit.update({"api": APPS["api"]})
    assert admit(probe("web", "web-1")) is not None


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=70))
def test_refusal_takes_exactly_the_listed_instances_and_short_container_ids(app: str, instance: str) -> None:
    index = known(APPS)
    why = refusal(index, app, instance)
    taken = (app == "web" and instance == "web-1") or (
        app == "api" and len(instance) == 12 and all(c in "0123456789abcdef" for c in instance)
    )
    assert (why is None) == taken
