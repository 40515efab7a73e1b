"""The one duration syntax (``autoserve_config.durations``): what was accepted before still
is, compound forms add up, the canonical text reads back, and garbage is refused with a
message, never with anything but ``ValueError``."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from autoserve_config import ConfigError, format_duration, parse_config, parse_duration
from autoserve_config.durations import MAX_TEXT, UNITS

# The parser before compound forms, kept here as the reference for what must still work.
OLD_SYNTAX = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
OLD_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}


def old_parse(text: str) -> float:
    match = OLD_SYNTAX.match(text)
    assert match is not None
    return float(match.group(1)) * OLD_UNITS[match.group(2)]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), ("1w", 604800), ("500ms", 0.5),
        ("1.5h", 5400), ("30", 30), ("1.5", 1.5), (" 5 m ", 300), (45, 45), (0.25, 0.25), (0, 0),
        ("1h30m", 5400), ("90s", 90), ("2d12h", 216000), ("1m30.5s", 90.5), ("1h 30m", 5400),
        ("1w2d3h4m5s6ms", 604800 + 2 * 86400 + 3 * 3600 + 4 * 60 + 5.006), ("1.1h", 3960),
    ],
)  # fmt: skip
def test_examples(value: float | str, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", "must be a duration such as 30s, 5m, 1.5h or 1h30m, got 'soon'"),
        ("30m1h", "got '30m1h': units go from the largest to the smallest, each once"),
        ("1h1h", "got '1h1h': units go from the largest to the smallest, each once"),
        ("1h30", "got '1h30': 30 needs a unit (ms, s, m, h, d, w)"),
        ("5M", "got '5M'"),
        ("-5s", "got '-5s'"),
        ("", "got ''"),
        ("1.", "got '1.'"),
        (-1, "must be a duration >= 0, got -1"),
        (float("nan"), "must be a duration >= 0, got nan"),
        (float("inf"), "must be a duration >= 0, got inf"),
        (True, "got True"),
        (None, "got None"),
        (10**400, "must be a finite duration"),
        ("9" * 65, "got text of 65 characters"),
    ],
)
def test_refused_with_the_value_and_the_reason(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_duration(value)


def test_a_config_problem_names_the_field_and_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"alerting": {"route": {"group_wait": "30m1h"}}})
    assert info.value.problems == [
        "alerting.route.group_wait: must be a duration such as 30s, 5m, 1.5h or 1h30m, got '30m1h': "
        "units go from the largest to the smallest, each once"
    ]
    config = parse_config({"alerting": {"resolve_timeout": "1h30m", "history": "2d12h"}})
    assert parse_duration(config.alerting.resolve_timeout) == 5400


# -- properties ----------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.from_regex(OLD_SYNTAX, fullmatch=True))
def test_everything_the_old_syntax_took_reads_the_same(text: str) -> None:
    if len(text) > 64:  # the new bound on text; the old syntax never needed more either
        return
    # The old parser multiplied floats (1.1h was 3960.0000000000005); the sum is exact now.
    assert math.isclose(parse_duration(text), old_parse(text), rel_tol=1e-12)


@given(st.one_of(st.integers(min_value=0, max_value=10**15), st.floats(min_value=0, allow_infinity=False)))
def test_numbers_are_seconds(value: float) -> None:
    assert parse_duration(value) == float(value)


@given(st.integers(min_value=0, max_value=10**13))
def test_format_then_parse_gives_the_value_back(millis: int) -> None:
    seconds = millis / 1000
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.floats(min_value=0, max_value=1e12))
def test_format_is_canonical_to_the_millisecond(seconds: float) -> None:
    text = format_duration(seconds)
    assert abs(parse_duration(text) - seconds) <= 0.0005 + 1e-9
    assert format_duration(parse_duration(text)) == text


ORDER = list(UNITS)  # largest first


@st.composite
def compound(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Parts in the syntax's order: each a number (maybe with a fraction) and a unit."""
    units = sorted(draw(st.sets(st.sampled_from(ORDER), min_size=1)), key=ORDER.index)
    parts = []
    for unit in units:
        number = str(draw(st.integers(min_value=0, max_value=10**6)))
        if draw(st.booleans()):
            number += "." + draw(st.from_regex(r"[0-9]{1,6}", fullmatch=True))
        parts.append((number, unit))
    return parts


@given(compound(), st.sampled_from(["", " "]))
def test_a_compound_is_the_sum_of_its_parts(parts: list[tuple[str, str]], gap: str) -> None:
    text = gap.join(number + unit for number, unit in parts)
    assume(len(text) <= MAX_TEXT)  # longer is refused, with its length (the table above)
    exact = sum(Fraction(number) * UNITS[unit] for number, unit in parts)
    assert parse_duration(text) == float(exact)
    assert math.isclose(parse_duration(text), sum(parse_duration(n + u) for n, u in parts), rel_tol=1e-12)


@given(compound(), st.sampled_from(list("xyzMHS-+,;/_:")), st.data())
def test_garbage_in_a_duration_is_refused(parts: list[tuple[str, str]], junk: str, data: st.DataObject) -> None:
    text = "".join(number + unit for number, unit in parts)
    at = data.draw(st.integers(min_value=0, max_value=len(text)))
    bad = text[:at] + junk + text[at:]
    with pytest.raises(ValueError, match="must be a duration such as") as info:
        parse_duration(bad)
    assert repr(bad) in str(info.value) or f"{len(bad)} characters" in str(info.value)


ANYTHING = st.one_of(
    st.text(max_size=80),
    st.text(alphabet="0123456789.msdhw -", max_size=30),
    st.integers(),
    st.floats(),
    st.none(),
    st.booleans(),
    st.binary(max_size=10),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=1000, deadline=None)
@given(ANYTHING)
def test_nothing_but_value_error_is_raised(value: object) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        assert str(exc).startswith("must be a")
    else:
        assert isinstance(seconds, float) and math.isfinite(seconds) and seconds >= 0
