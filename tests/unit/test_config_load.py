"""Reading a config file as ``apply`` does: an empty, truncated or ambiguous file is refused
with its problems, never read as "no apps"; ``apps: {}`` removes every app on purpose."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from autoserve_config import ConfigError, load_config, load_config_text

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"


def problems_of(text: str, source: str = "f.yaml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, source)
    return info.value.problems


EMPTY = "f.yaml: empty (no apps, no settings); write `apps: {}` to remove every app on purpose"


@pytest.mark.parametrize(
    "text", ["", "\n\n", "   \n  \n", "# all apps commented out\n#apps:\n#  web: {}\n", "---\n", "null\n"]
)
def test_an_empty_or_comment_only_file_is_refused(text: str) -> None:
    assert problems_of(text) == [EMPTY]


def test_an_empty_file_on_disk_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "apps.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}: empty (no apps, no settings); write `apps: {{}}` to remove every app on purpose"
    ]


@pytest.mark.parametrize(
    ("text", "got"),
    [("- web\n", "list ['web']"), ("apps\n", "str 'apps'"), ("42\n", "int 42"), ("true\n", "bool True")],
)
def test_a_top_level_that_is_not_a_mapping_is_refused(text: str, got: str) -> None:
    assert problems_of(text) == [f"f.yaml: the top level must be a mapping with an apps key, got {got}"]


def test_a_file_without_apps_is_refused_even_with_good_settings() -> None:
    """Settings alone would still remove every app (apply is declarative over the whole file);
    with ``apps: {}`` the same settings say so on purpose."""
    assert problems_of("detector: {max_response_time_ms: 3000}\n") == [
        "apps: required: apply replaces every app with the file's; write `apps: {}` to remove every app on purpose"
    ]
    config = load_config_text("apps: {}\ndetector: {max_response_time_ms: 3000}\n")
    assert config.apps == {}
    assert config.detector.max_response_time_ms == 3000


def test_a_missing_apps_is_listed_beside_the_other_problems() -> None:
    assert problems_of("detector: {max_response_time_ms: nope}\nextra: 1\n") == [
        "apps: required: apply replaces every app with the file's; write `apps: {}` to remove every app on purpose",
        "extra: unknown key",
        "detector.max_response_time_ms: expected float, got str 'nope'",
    ]


def test_apps_with_nothing_under_it_is_refused() -> None:
    """What a file cut right after ``apps:`` reads as."""
    assert problems_of("apps:\n# web: {}\ndetector: {}\n") == [
        "apps: must be a mapping, got nothing; write `apps: {}` to remove every app on purpose"
    ]


# -- duplicate keys -----------------------------------------------------------------------

DUPLICATED = """\
apps:
  web:
    health_check:
      path: /health
      port: 8080
      period_seconds: 5
      port: 8081
    instances:
      - {id: web-1, host: 127.0.0.1, id: web-2}
  api: {}
  api: {}
detector: {max_response_time_ms: 1}
detector: {max_response_time_ms: 2}
"""


def test_duplicate_keys_at_any_depth_are_each_named_with_path_and_line() -> None:
    assert problems_of(DUPLICATED) == [
        "apps.web.health_check.port: duplicate key (line 7), first on line 5",
        "apps.web.instances[0].id: duplicate key (line 9), first on line 9",
        "apps.api: duplicate key (line 11), first on line 10",
        "detector: duplicate key (line 13), first on line 12",
    ]


def test_keys_that_differ_only_in_quoting_are_the_same_key() -> None:
    assert problems_of('apps:\n  web: {}\n  "web": {}\n') == ["apps.web: duplicate key (line 3), first on line 2"]


MERGED = """\
apps:
  web:
    health_check: &check {path: /health, port: 8080, period_seconds: 5}
  api:
    health_check:
      <<: *check
      port: 9090
"""


def test_a_merge_key_may_be_overridden_but_not_repeated() -> None:
    """``<<: *defaults`` then an explicit key is YAML's way to override, not a duplicate;
    the explicit key twice is."""
    config = load_config_text(MERGED)
    assert (config.apps["api"].health_check.port, config.apps["api"].health_check.path) == (9090, "/health")
    assert config.apps["web"].health_check.port == 8080
    assert problems_of(MERGED + "      port: 9091\n") == [
        "apps.api.health_check.port: duplicate key (line 8), first on line 7"
    ]


plain_keys = st.text(string.ascii_lowercase, min_size=1, max_size=6).filter(
    lambda k: k not in ("y", "n", "yes", "no", "on", "off", "true", "false", "null")
)
documents = st.recursive(
    st.one_of(st.integers(), st.text(string.ascii_letters, max_size=5)),
    lambda children: st.dictionaries(plain_keys, children, min_size=1, max_size=4),
    max_leaves=20,
).filter(lambda d: isinstance(d, dict))


@settings(max_examples=200, deadline=None)
@given(documents, st.data())
def test_a_repeated_key_line_is_always_refused_at_its_line(document: dict, data: st.DataObject) -> None:
    lines = yaml.safe_dump(document, default_flow_style=False).splitlines()
    keyed = [i for i, line in enumerate(lines) if not line.lstrip().startswith("-") and ":" in line]
    index = data.draw(st.sampled_from(keyed))
    key = lines[index].strip().split(":")[0]
    text = "\n".join([*lines[: index + 1], lines[index], *lines[index + 1 :]]) + "\n"
    problems = problems_of(text)
    assert any(
        p.endswith(f"duplicate key (line {index + 2}), first on line {index + 1}")
        and p.split(":")[0].split(".")[-1] == key
        for p in problems
    ), problems


# -- truncation -----------------------------------------------------------------------------


def _check_truncated(text: str) -> None:
    """A prefix of the demo is refused, or keeps a prefix of its apps: never zero, and every
    app but the one the cut went through exactly as in the whole file."""
    full = load_config(DEMO).apps
    try:
        apps = load_config_text(text).apps
    except ConfigError as exc:
        assert exc.problems
        return
    names = list(apps)
    assert names, "a truncated file must never read as no apps"
    assert names == list(full)[: len(names)]
    for name in names[:-1]:
        assert apps[name] == full[name], name


DEMO_LINES = DEMO.read_text().splitlines(keepends=True)


@pytest.mark.parametrize("cut", range(len(DEMO_LINES) + 1))
def test_the_demo_cut_at_any_line_is_refused_or_keeps_its_apps(cut: int) -> None:
    _check_truncated("".join(DEMO_LINES[:cut]))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(DEMO.read_text())))
def test_the_demo_cut_at_any_character_is_refused_or_keeps_its_apps(cut: int) -> None:
    _check_truncated(DEMO.read_text()[:cut])


def test_the_demo_cut_before_its_apps_is_refused() -> None:
    assert problems_of("".join(DEMO_LINES[:1]), "demo.yaml") == [
        "demo.yaml: empty (no apps, no settings); write `apps: {}` to remove every app on purpose"
    ]
