"""Maintenance-window schedules: cron through croniter, in an IANA time zone, with cron's
behaviour when daylight saving time starts or ends (Vixie cron, cronie)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from autoserve_config import ConfigError, parse_config, parse_cron

BERLIN = ZoneInfo("Europe/Berlin")  # 2026: forward 03-29 02:00 -> 03:00, back 10-25 03:00 -> 02:00
HOUR = 3600.0


def at(year: int, month: int, day: int, hour: int, minute: int = 0, zone=UTC) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=zone).timestamp()


def test_cron_finds_the_window_start() -> None:
    nightly = parse_cron("0 2 * * *")
    now = datetime(2026, 1, 5, 2, 30, tzinfo=UTC).timestamp()
    assert nightly.last_start(now, 3600) == datetime(2026, 1, 5, 2, 0, tzinfo=UTC).timestamp()
    assert nightly.last_start(now + 3600, 3600) is None  # 03:30: the 02:00 start is more than an hour back
    sundays = parse_cron("*/15 1-3 * * 0")  # 2026-01-04 is a Sunday
    assert (
        sundays.last_start(datetime(2026, 1, 4, 1, 20, tzinfo=UTC).timestamp(), 600)
        == datetime(2026, 1, 4, 1, 15, tzinfo=UTC).timestamp()
    )
    assert sundays.last_start(datetime(2026, 1, 5, 1, 20, tzinfo=UTC).timestamp(), 600) is None


def test_named_days_and_months() -> None:
    sundays = parse_cron("0 2 * * SUN")  # 2026-01-04 is a Sunday
    assert sundays.last_start(at(2026, 1, 10, 12), 7 * 86400) == at(2026, 1, 4, 2)
    assert sundays.last_start(at(2026, 1, 4, 1, 59), 86400) is None
    assert parse_cron("30 6 * JAN-MAR mon-fri").last_start(at(2026, 1, 5, 7), HOUR) == at(2026, 1, 5, 6, 30)
    assert parse_cron("30 6 * APR mon-fri").last_start(at(2026, 1, 5, 7), HOUR) is None


@pytest.mark.parametrize(
    ("nickname", "now", "start"),
    [
        ("@daily", at(2026, 1, 5, 0, 30), at(2026, 1, 5, 0)),
        ("@midnight", at(2026, 1, 5, 0, 30), at(2026, 1, 5, 0)),
        ("@hourly", at(2026, 1, 5, 7, 59), at(2026, 1, 5, 7)),
        ("@weekly", at(2026, 1, 5, 0, 30), at(2026, 1, 4, 0)),  # Sunday midnight
        ("@monthly", at(2026, 1, 5, 0, 30), at(2026, 1, 1, 0)),
        ("@yearly", at(2026, 1, 5, 0, 30), at(2026, 1, 1, 0)),
        ("@DAILY", at(2026, 1, 5, 0, 30), at(2026, 1, 5, 0)),
    ],
)
def test_nicknames(nickname: str, now: float, start: float) -> None:
    assert parse_cron(nickname).last_start(now, 7 * 86400) == start


def test_a_time_zone_reads_the_schedule_on_its_wall_clock() -> None:
    new_york = parse_cron("0 2 * * *", "America/New_York")
    assert new_york.last_start(at(2026, 1, 5, 7, 30), HOUR) == at(2026, 1, 5, 7)  # EST: UTC-5
    assert new_york.last_start(at(2026, 7, 5, 6, 30), HOUR) == at(2026, 7, 5, 6)  # EDT: UTC-4
    kolkata = parse_cron("@daily", "Asia/Kolkata")  # UTC+5:30, no DST
    assert kolkata.last_start(at(2026, 1, 5, 0), 86400) == at(2026, 1, 4, 18, 30)


def test_spring_forward_a_fixed_time_start_in_the_skipped_hour_happens_at_the_change() -> None:
    # 2026-03-29 is a Sunday: 02:00 does not exist in Berlin; cron starts the job at 03:00 CEST
    sundays = parse_cron("0 2 * * SUN", "Europe/Berlin")
    change = at(2026, 3, 29, 3, 0, BERLIN)
    assert change == at(2026, 3, 29, 1)  # 01:00 UTC
    assert sundays.last_start(change - 60, HOUR) is None
    assert sundays.last_start(change, HOUR) == change
    assert sundays.last_start(change + 1800, HOUR) == change
    # the week before and after, 02:00 local as usual
    assert sundays.last_start(at(2026, 3, 22, 2, 30, BERLIN), HOUR) == at(2026, 3, 22, 1)  # CET
    assert sundays.last_start(at(2026, 4, 5, 2, 30, BERLIN), HOUR) == at(2026, 4, 5, 0)  # CEST


def test_spring_forward_a_wildcard_schedule_skips_what_does_not_exist() -> None:
    half_hours = parse_cron("*/30 2 * * *", "Europe/Berlin")  # minute has a "*": follows the new time
    assert half_hours.last_start(at(2026, 3, 29, 3, 10, BERLIN), HOUR) is None
    assert half_hours.last_start(at(2026, 3, 30, 2, 40, BERLIN), HOUR) == at(2026, 3, 30, 2, 30, BERLIN)
    hourly = parse_cron("@hourly", "Europe/Berlin")
    assert hourly.last_start(at(2026, 3, 29, 3, 10, BERLIN), HOUR) == at(2026, 3, 29, 3, 0, BERLIN)


def test_fall_back_a_fixed_time_start_in_the_repeated_hour_happens_once() -> None:
    # 2026-10-25: 02:00-03:00 happens twice in Berlin (CEST, then CET)
    sundays = parse_cron("0 2 * * SUN", "Europe/Berlin")
    first, second = at(2026, 10, 25, 0), at(2026, 10, 25, 1)  # 02:00 CEST, 02:00 CET, in UTC
    assert sundays.last_start(first + 1800, HOUR) == first
    assert sundays.last_start(second, HOUR) == first  # the repeat is no new start ...
    assert sundays.last_start(second + 1800, HOUR) is None  # ... so an hour-long window is over


def test_fall_back_a_wildcard_schedule_follows_the_clock_through_both_hours() -> None:
    half_hours = parse_cron("*/30 2 * * *", "Europe/Berlin")
    starts = [half_hours.last_start(at(2026, 10, 25, 0) + m * 60, 60) for m in range(0, 120, 30)]
    assert starts == [at(2026, 10, 25, 0), at(2026, 10, 25, 0, 30), at(2026, 10, 25, 1), at(2026, 10, 25, 1, 30)]


@pytest.mark.parametrize(
    ("window", "problem"),
    [
        ({"schedule": "0 2 * * *", "timezone": "Mars/Base"}, "alerting.maintenance_windows[0].timezone: unknown time zone 'Mars/Base'"),
        ({"schedule": "0 2 * * *", "timezone": "../../etc/passwd"}, "alerting.maintenance_windows[0].timezone: unknown time zone '../../etc/passwd'"),
        ({"schedule": "0 25 * * *"}, "alerting.maintenance_windows[0].schedule: hour field '25' must stay within 0-23"),
        ({"schedule": "0 2 * * FUNDAY"}, "alerting.maintenance_windows[0].schedule: day of week field 'FUNDAY' must stay within 0-7 or SUN-SAT"),
        ({"schedule": "0 2 * * SUN 2026"}, "alerting.maintenance_windows[0].schedule: must be a cron expression of 5 fields"),
        ({"schedule": "@reboot"}, "alerting.maintenance_windows[0].schedule: must be a cron expression of 5 fields (minute hour day month weekday) or a nickname such as @daily, got '@reboot'"),
        ({"schedule": "0 0 30 2 *"}, "alerting.maintenance_windows[0].schedule: '0 0 30 2 *' never matches a day"),
    ],
)  # fmt: skip
def test_schedule_and_time_zone_problems_name_the_field_and_value(window, problem) -> None:
    section = {"maintenance_windows": [{"name": "n", "duration": "1h", **window}]}
    with pytest.raises(ConfigError) as caught:
        parse_config({"alerting": section})
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_named_days_nicknames_and_time_zones_are_valid_config() -> None:
    windows = [
        {"name": "sundays", "schedule": "0 2 * * SUN", "duration": "1h", "timezone": "Europe/Berlin"},
        {"name": "nightly", "schedule": "@daily", "duration": "30m"},
    ]
    config = parse_config({"alerting": {"maintenance_windows": windows}}).alerting
    assert [(w.schedule, w.timezone) for w in config.maintenance_windows] == [
        ("0 2 * * SUN", "Europe/Berlin"),
        ("@daily", "UTC"),
    ]


# -- properties -----------------------------------------------------------------------------------

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "America/Santiago", "Australia/Lord_Howe", "Asia/Kolkata"]
DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
instants = st.floats(min_value=at(2024, 1, 1, 0), max_value=at(2028, 12, 31, 0)).map(lambda t: float(int(t)))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 59), st.integers(0, 23), st.integers(0, 6), st.sampled_from(ZONES), instants)
def test_a_named_day_is_its_number(minute: int, hour: int, day: int, zone: str, now: float) -> None:
    named = parse_cron(f"{minute} {hour} * * {DAYS[day]}", zone).last_start(now, 8 * 86400)
    assert named == parse_cron(f"{minute} {hour} * * {day}", zone).last_start(now, 8 * 86400)
    assert named == parse_cron(f"{minute} {hour} * * {day or 7}", zone).last_start(now, 8 * 86400)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 59), st.integers(0, 23), st.sampled_from(ZONES), instants)
@example(0, 2, "Europe/Berlin", at(2026, 3, 30, 1))  # the day before: 02:00 skipped, started 03:00
@example(30, 2, "Europe/Berlin", at(2026, 10, 26, 1))  # the day before: 02:30 twice, started once
@example(15, 2, "Australia/Lord_Howe", at(2026, 10, 5, 0))  # a 30-minute change: 02:00 -> 02:30
@example(45, 1, "Australia/Lord_Howe", at(2026, 4, 6, 0))  # 02:00 -> 01:30: 01:45 twice
def test_a_fixed_time_daily_schedule_starts_once_every_local_day(minute: int, hour: int, zone: str, now: float) -> None:
    """Across DST changes too: none skipped when clocks go forward, none twice when they go back."""
    tz = ZoneInfo(zone)
    daily = parse_cron(f"{minute} {hour} * * *", zone)
    latest = daily.last_start(now, 2 * 86400)
    assert latest is not None and now - 2 * 86400 <= latest <= now
    before = daily.last_start(latest - 1, 2 * 86400)
    assert before is not None
    local, local_before = datetime.fromtimestamp(latest, tz), datetime.fromtimestamp(before, tz)
    assert local.date() - local_before.date() == timedelta(days=1)
    for start in (local, local_before):
        if (start.hour, start.minute) != (hour, minute):  # moved: the wall time did not exist that day
            naive = start.replace(tzinfo=None, fold=0).replace(hour=hour, minute=minute)
            gone = naive.replace(tzinfo=tz).astimezone(UTC).astimezone(tz).replace(tzinfo=None) != naive
            assert gone and start.utcoffset() != (start - timedelta(minutes=1)).utcoffset()  # at the change
