"""A comma-separated seed list in AUTOSERVE_NATS_URL / --nats-url: parsed, redacted, and its
credentials moved out of it (one credential for the cluster)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoserve_runtime.bus import NatsConfigError, absorb_url_credentials, redact_url, seed_urls
from autoserve_runtime.provisioning import ReplicasError, stream_replicas


def test_a_list_is_split_on_commas_and_blanks_are_ignored() -> None:
    assert seed_urls("nats://a:4222") == ["nats://a:4222"]
    assert seed_urls(" nats://a:1, nats://b:2,,nats://c:3 ") == ["nats://a:1", "nats://b:2", "nats://c:3"]


def test_a_list_with_no_url_is_refused_by_name() -> None:
    with pytest.raises(NatsConfigError, match="AUTOSERVE_NATS_URL: ' , ' holds no URL"):
        seed_urls(" , ")


def test_every_seed_is_redacted() -> None:
    assert redact_url("nats://u:pw@a:1,nats://b:2,nats://tok@c:3") == "nats://***@a:1,nats://b:2,nats://***@c:3"


def test_credentials_in_several_seeds_move_out_once() -> None:
    env: dict[str, str] = {}
    clean = absorb_url_credentials("nats://svc:pw@a:1,nats://svc:pw@b:2,nats://c:3", env)
    assert clean == "nats://a:1,nats://b:2,nats://c:3"
    assert env == {"AUTOSERVE_NATS_USER": "svc", "AUTOSERVE_NATS_PASSWORD": "pw"}


def test_seeds_with_different_credentials_are_refused_without_printing_them() -> None:
    env: dict[str, str] = {}
    with pytest.raises(NatsConfigError) as caught:
        absorb_url_credentials("nats://svc:s3cret-a@a:1,nats://svc:s3cret-b@b:2", env)
    assert "nats://***@a:1,nats://***@b:2 carry different credentials" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert env == {}


@given(st.lists(st.from_regex(r"[a-z]{1,8}:[0-9]{1,5}", fullmatch=True), min_size=1, max_size=5))
def test_a_seed_list_without_credentials_passes_through_unchanged(hosts: list[str]) -> None:
    url = ",".join(f"nats://{host}" for host in hosts)
    assert absorb_url_credentials(url, {}) == url
    assert redact_url(url) == url
    assert seed_urls(url) == [f"nats://{host}" for host in hosts]


@pytest.mark.parametrize(("value", "replicas"), [("", 1), ("1", 1), ("3", 3), (" 5 ", 5)])
def test_stream_replicas_are_1_3_or_5(value: str, replicas: int) -> None:
    assert stream_replicas({"AUTOSERVE_STREAM_REPLICAS": value}) == replicas
    assert stream_replicas({}) == 1


@pytest.mark.parametrize("value", ["2", "0", "three", "-3"])
def test_other_replicas_are_refused_naming_the_variable_and_value(value: str) -> None:
    with pytest.raises(ReplicasError, match=f"AUTOSERVE_STREAM_REPLICAS: must be one of 1, 3 or 5, got '{value}'"):
        stream_replicas({"AUTOSERVE_STREAM_REPLICAS": value})
