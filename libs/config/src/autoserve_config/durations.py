"""The one duration syntax, for every duration field the seed did not name.

A duration is a number of seconds (``90``, ``1.5``, or the same as text) or text of one or
more parts, each a number and a unit, largest unit first and each unit once:

    ``500ms``  ``30s``  ``90s``  ``5m``  ``1.5h``  ``1h30m``  ``2d12h``  ``1m30.5s``  ``1w``

Units: ``ms``, ``s``, ``m`` (minutes), ``h``, ``d``, ``w``. Spaces between parts are
allowed (``1h 30m``). This is Prometheus's and Alertmanager's syntax with fractions and
bare seconds added. Fields the seed named (``period_seconds``, ``timeout_seconds``, ...)
and fields whose name carries a unit stay plain numbers.

The sum is exact (each part is read as a fraction), so ``1h30m`` is 5400.0 and ``1.1h``
is 3960.0, not the float product 3960.0000000000005.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

Duration = float | str

UNITS: dict[str, int | Fraction] = {
    "w": 604_800,
    "d": 86_400,
    "h": 3_600,
    "m": 60,
    "s": 1,
    "ms": Fraction(1, 1000),
}
_ORDER = {unit: rank for rank, unit in enumerate(UNITS)}
_NUMBER = r"(\d+)(?:\.(\d+))?"
_BARE = re.compile(rf"\s*{_NUMBER}\s*")
# "ms" before "m" and "s", so that 500ms is not 500 minutes and an "s".
_PART = re.compile(rf"\s*{_NUMBER}\s*(ms|s|m|h|d|w)?")
MAX_TEXT = 64  # the longest sensible duration is far shorter; also bounds the digits read
EXAMPLES = "30s, 5m, 1.5h or 1h30m"


def parse_duration(value: object) -> float:
    """Seconds from a duration (see the module); ``ValueError`` names the value and what is
    wrong with it, and nothing else is raised. Callers prefix the field's path."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a duration such as {EXAMPLES}, got {_show(value)}")
    if isinstance(value, str):
        seconds = _parse_text(value)
    else:
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            raise ValueError(f"must be a finite duration, got {_show(value)}") from None
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"must be a duration >= 0, got {_show(value)}")
    return seconds


def _parse_text(text: str) -> float:
    if len(text) > MAX_TEXT:
        raise ValueError(f"must be a duration such as {EXAMPLES}, got text of {len(text)} characters")
    bare = _BARE.fullmatch(text)
    if bare:  # seconds, as text
        return float(_number(*bare.groups()))
    total = Fraction(0)
    position, last = 0, -1
    while position < len(text):
        part = _PART.match(text, position)
        if part is None:
            if text[position:].strip():
                raise ValueError(f"must be a duration such as {EXAMPLES}, got {text!r}")
            break
        whole, fraction, unit = part.groups()
        if unit is None:
            if text[part.end() :].strip():  # "1.s", "1h30x": not a missing unit
                raise ValueError(f"must be a duration such as {EXAMPLES}, got {text!r}")
            raise ValueError(
                f"must be a duration such as {EXAMPLES}, got {text!r}: "
                f"{part.group().strip()} needs a unit ({', '.join(reversed(UNITS))})"
            )
        if _ORDER[unit] <= last:
            raise ValueError(
                f"must be a duration such as {EXAMPLES}, got {text!r}: "
                "units go from the largest to the smallest, each once"
            )
        last = _ORDER[unit]
        total += _number(whole, fraction) * UNITS[unit]
        position = part.end()
    if last < 0:
        raise ValueError(f"must be a duration such as {EXAMPLES}, got {text!r}")
    try:
        return float(total)
    except OverflowError:
        raise ValueError(f"must be a finite duration, got {text!r}") from None


def _number(whole: str, fraction: str | None) -> Fraction:
    if not fraction:
        return Fraction(int(whole))
    return int(whole) + Fraction(int(fraction), 10 ** len(fraction))


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_TEXT else f"{text[:MAX_TEXT]}..."


def format_duration(seconds: float) -> str:
    """The canonical text of ``seconds``, to the millisecond: ``1d2h3m4s500ms``, ``0s``.
    ``parse_duration`` reads it back to the same value for every whole number of ms."""
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"must be a duration >= 0, got {seconds!r}")
    rest = round(Fraction(seconds) * 1000)
    parts = []
    for unit in ("d", "h", "m", "s", "ms"):
        count, rest = divmod(rest, int(UNITS[unit] * 1000))
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"
