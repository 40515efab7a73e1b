"""Config validation: every seed rule, every problem listed with its path, nothing else raised."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from autoserve_config import (
    ConfigError,
    HealthCheckConfig,
    decode_app_spec,
    encode_app_spec,
    load_config,
    load_config_text,
    parse_config,
)


def problems_of(raw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value.problems


def app(health_check: dict | None = None, **extra: Any) -> dict:
    spec: dict[str, Any] = {"instances": [{"id": "w-1", "host": "127.0.0.1", "port": 8080}], **extra}
    if health_check is not None:
        spec["health_check"] = health_check
    return {"apps": {"web": spec}}


def test_the_seed_defaults() -> None:
    hc = HealthCheckConfig()
    assert (hc.protocol, hc.path, hc.port, hc.method, hc.expected_status_codes) == (
        "HTTP",
        "/health",
        8000,
        "GET",
        [200],
    )
    assert (hc.initial_delay_seconds, hc.period_seconds, hc.timeout_seconds) == (30, 30, 5)
    assert (hc.failure_threshold, hc.success_threshold, hc.max_retries) == (3, 1, 0)
    assert (hc.enabled, hc.follow_redirects, hc.verify_ssl) == (True, False, True)


def test_a_good_config_parses_with_defaults_filled_in() -> None:
    config = parse_config(app({"period_seconds": 10}))
    spec = config.apps["web"]
    assert spec.health_check.period_seconds == 10
    assert spec.health_check.timeout_seconds == 5
    assert spec.instances[0].port == 8080
    assert spec.breaker.failure_threshold == 5
    assert config.detector.max_response_time_ms == 5000


# One row per rule of the seed's HealthCheckConfig.validate(), as a path and message.
SEED_RULES = [
    ({"protocol": "UDP"}, "apps.web.health_check.protocol: must be one of 'HTTP', 'TCP', got str 'UDP'"),
    ({"port": 0}, "apps.web.health_check.port: must be between 1 and 65535, got 0"),
    ({"port": 65536}, "apps.web.health_check.port: must be between 1 and 65535, got 65536"),
    ({"timeout_seconds": 0}, "apps.web.health_check.timeout_seconds: must be at least 1 second, got 0"),
    (
        {"period_seconds": 2, "timeout_seconds": 5},
        "apps.web.health_check.period_seconds: must be at least timeout_seconds (5), got 2",
    ),
    ({"failure_threshold": 0}, "apps.web.health_check.failure_threshold: must be at least 1, got 0"),
    ({"success_threshold": 0}, "apps.web.health_check.success_threshold: must be at least 1, got 0"),
    ({"path": "health"}, "apps.web.health_check.path: HTTP path must start with '/', got 'health'"),
    ({"method": "DELETE"}, "apps.web.health_check.method: must be one of GET, POST, PUT, HEAD, got 'DELETE'"),
]


@pytest.mark.parametrize(("health_check", "expected"), SEED_RULES)
def test_every_seed_rule(health_check: dict, expected: str) -> None:
    assert problems_of(app(health_check)) == [expected]


def test_tcp_checks_skip_the_http_rules() -> None:
    config = parse_config(app({"protocol": "TCP", "path": "not-a-path", "method": "NOPE"}))
    assert config.apps["web"].health_check.protocol == "TCP"


BEYOND_THE_SEED = [
    (app({"pth": "/x"}), "apps.web.health_check.pth: unknown key (did you mean 'path'?)"),
    (app({"port": "80"}), "apps.web.health_check.port: expected int, got str '80'"),
    (app({"enabled": "yes"}), "apps.web.health_check.enabled: expected bool, got str 'yes'"),
    (
        app({"max_retries": 11, "period_seconds": 100}),
        "apps.web.health_check.max_retries: must be between 0 and 10, got 11",
    ),
    (
        app({"max_retries": 2, "timeout_seconds": 2, "period_seconds": 5}),
        "apps.web.health_check.period_seconds: a probe with max_retries=2 takes up to 6s, longer than the period 5s",
    ),
    (
        app({"expected_status_codes": []}),
        "apps.web.health_check.expected_status_codes: must list at least one status code",
    ),
    (
        app({"expected_status_codes": [200, 700]}),
        "apps.web.health_check.expected_status_codes[1]: must be between 100 and 599, got 700",
    ),
    (app({"initial_delay_seconds": -1}), "apps.web.health_check.initial_delay_seconds: must be at least 0, got -1"),
    (
        app({"path": "/a b"}),
        "apps.web.health_check.path: must not contain spaces, control characters or '#', got '/a b'",
    ),
    (app({"headers": {"Bad Name": "x"}}), "apps.web.health_check.headers: 'Bad Name' is not a valid header name"),
    (app({"protocol": "TCP", "scheme": "https"}), "apps.web.health_check.scheme: 'https' applies to HTTP checks only"),
    ({"apps": {"web.prod": {}}}, "apps.web.prod: name 'web.prod' must be 1-128 characters of [A-Za-z0-9_-]"),
    (
        {"apps": {"web": {"instances": [{"id": "a b", "host": "h"}]}}},
        "apps.web.instances[0].id: name 'a b' must be 1-128 characters of [A-Za-z0-9_-]",
    ),
    (
        {"apps": {"web": {"instances": [{"id": "a", "host": "http://h"}]}}},
        "apps.web.instances[0].host: 'http://h' is not an IP address or a host name",
    ),
    (
        {"apps": {"web": {"instances": [{"id": "a", "host": "h:80"}]}}},
        "apps.web.instances[0].host: 'h:80' is not an IP address or a host name",
    ),
    (
        {"apps": {"web": {"instances": [{"id": "a", "host": "h", "port": 0}]}}},
        "apps.web.instances[0].port: must be between 1 and 65535, got 0",
    ),
    ({"apps": {"web": {"instances": [{"id": "a"}]}}}, "apps.web.instances[0].host: required"),
    (
        {"apps": {"web": {"instances": [{"id": "a", "host": "h"}, {"id": "a", "host": "h"}]}}},
        "apps.web.instances[1].id: duplicate instance id 'a'",
    ),
    ({"apps": {"web": {"docker": {"label": "novalue"}}}}, "apps.web.docker.label: must be 'key=value', got 'novalue'"),
    (
        {"apps": {"web": {"scaling": {"min_replicas": 3, "max_replicas": 2}}}},
        "apps.web.scaling.max_replicas: must be at least 1 and at least min_replicas (3), got 2",
    ),
    (
        {"apps": {"web": {"breaker": {"recovery_timeout": 0}}}},
        "apps.web.breaker.recovery_timeout: must be positive, got 0",
    ),
    ({"detector": {"max_cpu_percent": 150}}, "detector.max_cpu_percent: must be a percentage in (0, 100], got 150"),
    ({"apps": []}, "apps: must be a mapping, got list []"),
    ({"apps": {"web": {"instances": {"id": "a"}}}}, "apps.web.instances: must be a list, got dict {'id': 'a'}"),
    ({"apss": {}}, "apss: unknown key (did you mean 'apps'?)"),
    ("just text", "config: must be a mapping, got str 'just text'"),
]


@pytest.mark.parametrize(("raw", "expected"), BEYOND_THE_SEED)
def test_beyond_the_seed(raw: Any, expected: str) -> None:
    assert problems_of(raw) == [expected]


def test_every_problem_is_listed_at_once() -> None:
    raw = {
        "apps": {
            "web": {
                "health_check": {"protocol": "HTTPS", "pth": "/x", "period_seconds": "abc"},
                "instances": [{"id": "w 1", "host": "h", "port": 99999}, {"id": "w2"}],
            },
            "a.b": {"health_check": {"port": 0}},
        },
        "detector": {"max_cpu_percent": 0},
    }
    problems = problems_of(raw)
    assert problems == [
        "apps.web.health_check.pth: unknown key (did you mean 'path'?)",
        "apps.web.health_check.protocol: must be one of 'HTTP', 'TCP', got str 'HTTPS'",
        "apps.web.health_check.period_seconds: expected float, got str 'abc'",
        "apps.web.instances[0].id: name 'w 1' must be 1-128 characters of [A-Za-z0-9_-]",
        "apps.web.instances[0].port: must be between 1 and 65535, got 99999",
        "apps.web.instances[1].host: required",
        "apps.a.b: name 'a.b' must be 1-128 characters of [A-Za-z0-9_-]",
        "apps.a.b.health_check.port: must be between 1 and 65535, got 0",
        "detector.max_cpu_percent: must be a percentage in (0, 100], got 0",
    ]


def test_rules_still_run_beside_an_unknown_key() -> None:
    assert problems_of(app({"port": 0, "methd": "GET"})) == [
        "apps.web.health_check.methd: unknown key (did you mean 'method'?)",
        "apps.web.health_check.port: must be between 1 and 65535, got 0",
    ]


def test_a_secret_header_value_is_never_echoed() -> None:
    problems = problems_of(app({"headers": {"Authorization": "Bearer s3cret\r\nX-Evil: 1"}}))
    assert problems == ["apps.web.health_check.headers.Authorization: value must not contain line breaks"]
    assert "s3cret" not in "".join(problems)


def test_yaml_errors_name_the_line(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("apps:\n  web: {health_check: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].startswith(f"{path}:3:")
    assert "not valid YAML" in info.value.problems[0]


def test_a_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read: No such file"):
        load_config(tmp_path / "nope.yaml")


def test_the_kv_form_round_trips_and_is_validated_again() -> None:
    spec = parse_config(app({"period_seconds": 7})).apps["web"]
    assert decode_app_spec("web", encode_app_spec(spec)) == spec
    with pytest.raises(ConfigError, match=r"apps.web.health_check.port: must be between 1 and 65535, got 0"):
        decode_app_spec("web", b'{"health_check": {"port": 0}}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        decode_app_spec("web", b"{nope")
    with pytest.raises(ConfigError, match=r"name 'a\.b'"):
        decode_app_spec("a.b", b"{}")


def test_the_bundled_demo_config_is_valid() -> None:
    config = load_config("examples/demo.yaml")
    assert {"web", "cache"} <= config.apps.keys()


# -- properties ------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 70000), st.floats(allow_nan=False, width=32), st.text(max_size=8)
)
keys = st.sampled_from(
    ["protocol", "path", "port", "method", "timeout_seconds", "period_seconds", "failure_threshold", "max_retries",
     "headers", "expected_status_codes", "bogus", "scheme", "enabled"]
)  # fmt: skip
health_checks = st.dictionaries(keys, st.one_of(scalars, st.lists(st.integers(0, 700), max_size=3)), max_size=6)
instances = st.lists(
    st.fixed_dictionaries({"id": st.text(max_size=6), "host": st.sampled_from(["127.0.0.1", "h", "a b", "::1", ""])}),
    max_size=3,
)
raw_apps = st.dictionaries(
    st.text(min_size=1, max_size=6),
    st.fixed_dictionaries({"health_check": health_checks, "instances": instances}),
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(raw_apps)
def test_any_input_either_parses_or_lists_path_problems(apps: dict) -> None:
    try:
        config = parse_config({"apps": apps})
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            path, sep, message = problem.partition(": ")
            assert sep and message, problem
            assert path.startswith("apps."), problem
    else:
        for name, spec in config.apps.items():
            assert decode_app_spec(name, encode_app_spec(spec)) == spec


valid_checks = st.builds(
    dict,
    protocol=st.sampled_from(["HTTP", "TCP"]),
    port=st.integers(1, 65535),
    timeout_seconds=st.integers(1, 10),
    failure_threshold=st.integers(1, 10),
    success_threshold=st.integers(1, 10),
    method=st.sampled_from(["GET", "POST", "PUT", "HEAD"]),
).map(lambda hc: {**hc, "period_seconds": hc["timeout_seconds"] * 3})


@settings(max_examples=200, deadline=None)
@given(valid_checks, st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True))
def test_every_valid_config_is_accepted(health_check: dict, name: str) -> None:
    text = yaml.safe_dump({"apps": {name: {"health_check": health_check}}})
    assert load_config_text(text).apps[name].health_check.port == health_check["port"]


def test_the_readme_alerting_example_is_a_valid_config() -> None:
    """The README's alerting example is what an operator copies: it must pass ``check``."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Alerting") :]
    example = section[section.index("```yaml\n") + len("```yaml\n") : section.index("```\n", section.index("```yaml"))]
    config = load_config_text(example)
    assert config.apps["web"].depends_on == ["db"]
    assert set(config.alerting.receivers) == {"team-webhook", "team-slack", "oncall-email", "alertmanager"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", None), (" ", None), ("true", True), ("1", True), ("TRUE", True), ("false", False), ("0", False)],
)
def test_a_switch_is_true_false_or_unset(value: str, expected: bool | None) -> None:
    from autoserve_config import parse_switch

    assert parse_switch("AUTOSERVE_X", value) is expected


@pytest.mark.parametrize("value", ["yes", "on", "2", "tru"])
def test_any_other_switch_value_is_named(value: str) -> None:
    from autoserve_config import parse_switch

    with pytest.raises(ValueError, match=f"AUTOSERVE_X: must be true or false, got '{value}'"):
        parse_switch("AUTOSERVE_X", value)


@pytest.mark.parametrize(("raw", "expected"), [(None, 7.0), ("", 7.0), ("2.5", 2.5), ("0", 0.0)])
def test_a_number_from_the_environment(monkeypatch: pytest.MonkeyPatch, raw: str | None, expected: float) -> None:
    from autoserve_config import env_number

    if raw is not None:
        monkeypatch.setenv("AUTOSERVE_X", raw)
    assert env_number("AUTOSERVE_X", 7) == expected


@pytest.mark.parametrize("raw", ["soon", "nan", "-1", "inf-ish"])
def test_a_bad_number_from_the_environment_is_named(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    from autoserve_config import env_number

    monkeypatch.setenv("AUTOSERVE_X", raw)
    with pytest.raises(ValueError, match="AUTOSERVE_X: must be a number >= 0"):
        env_number("AUTOSERVE_X", 7)


def test_a_wrongly_typed_header_or_body_is_named_but_never_echoed() -> None:
    token = "Bearer s3cr3t-t0ken"
    for field, value in (("headers", {"Authorization": token, "X-Retries": 3}), ("body", {"token": token})):
        with pytest.raises(ConfigError) as caught:
            parse_config({"apps": {"web": {"health_check": {field: value}}}})
        text = "\n".join(caught.value.problems)
        assert f"apps.web.health_check.{field}" in text and "value not shown" in text
        assert "s3cr3t" not in text
