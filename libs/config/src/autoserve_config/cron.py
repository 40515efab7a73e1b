"""Maintenance-window schedules: cron expressions, read by croniter, in an IANA time zone.

Five fields (minute hour day-of-month month day-of-week) with lists, ranges and steps, names
for months and days (``JAN``, ``SUN``; 0 and 7 are Sunday), or a nickname: ``@yearly``
(``@annually``), ``@monthly``, ``@weekly``, ``@daily`` (``@midnight``), ``@hourly``. When both
day fields are restricted, either one matching is enough, as in Vixie cron.

Times are wall-clock times in the window's zone (default UTC). Daylight saving time changes
are treated as Vixie cron and cronie treat them. A schedule is *fixed-time* when neither its
minute nor its hour field has a ``*`` (``0 2 * * SUN``, ``@daily``; not ``@hourly``):

- clocks go forward: a fixed-time start that falls in the skipped hour happens at the change
  (``30 2 * * *`` in Europe/Berlin starts at 03:00 CEST that day); a wildcard schedule
  follows the new time, so its starts in the skipped hour do not happen;
- clocks go back: a fixed-time start in the repeated hour happens once, the first time; a
  wildcard schedule follows the clock and starts in both copies of the hour.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_FIELDS = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day of month", "1-31"),
    ("month", "1-12 or JAN-DEC"),
    ("day of week", "0-7 or SUN-SAT"),
)


def time_zone(name: str) -> ZoneInfo:
    """An IANA zone (``Europe/Berlin``); ``ValueError`` names the value."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


@dataclass(frozen=True)
class Cron:
    expression: str  # five fields, nicknames expanded
    zone: ZoneInfo
    minutes: frozenset[int] | None  # None: any (the field is "*")
    hours: frozenset[int] | None
    fixed_time: bool  # no "*" in the minute or hour field: DST moves or merges its starts

    def last_start(self, now: float, within: float) -> float | None:
        """The latest start at or before ``now`` (to the minute), no more than ``within``
        seconds back; None if there is none."""
        earliest = now - within
        starts = croniter(self.expression, datetime.fromtimestamp((now // 60 + 1) * 60, self.zone))
        while True:
            try:
                at = starts.get_prev(float)
            except CroniterBadDateError:  # no start for decades: none within reach either
                return None
            if at < earliest:
                return None
            if self._starts_at(at):
                return at

    def _starts_at(self, at: float) -> bool:
        """Whether cron starts at ``at``, a time croniter found: croniter moves a start in a
        skipped hour to the change and repeats one in a repeated hour, whatever the fields."""
        local = datetime.fromtimestamp(at, self.zone)
        if local.fold:  # the second copy of a repeated wall-clock time
            return not self.fixed_time
        on_the_clock = (self.minutes is None or local.minute in self.minutes) and (
            self.hours is None or local.hour in self.hours
        )
        return on_the_clock or self.fixed_time  # moved to the change from a skipped hour


def parse_cron(text: str, zone: str = "UTC") -> Cron:
    """A schedule from cron text in ``zone``; ``ValueError`` names the field and value."""
    expression = NICKNAMES.get(text.strip().lower(), text)
    parts = expression.split()
    if len(parts) != 5:
        raise ValueError(
            f"must be a cron expression of 5 fields (minute hour day month weekday) or a nickname"
            f" such as @daily, got {text!r}"
        )
    for index, (name, allowed) in enumerate(_FIELDS):
        alone = " ".join(part if i == index else "*" for i, part in enumerate(parts))
        if not croniter.is_valid(alone):
            raise ValueError(f"{name} field {parts[index]!r} must stay within {allowed}")
    tz = time_zone(zone)
    try:
        schedule = croniter(expression, datetime(2000, 1, 1, tzinfo=tz))
        schedule.get_next(float)
    except CroniterBadDateError:
        raise ValueError(f"{text!r} never matches a day") from None
    except CroniterError as exc:
        raise ValueError(f"not a cron expression ({exc}), got {text!r}") from None
    minutes, hours = schedule.expanded[0], schedule.expanded[1]
    return Cron(
        expression=" ".join(parts),
        zone=tz,
        minutes=None if minutes == ["*"] else frozenset(int(m) for m in minutes),
        hours=None if hours == ["*"] else frozenset(int(h) for h in hours),
        fixed_time="*" not in parts[0] and "*" not in parts[1],
    )
