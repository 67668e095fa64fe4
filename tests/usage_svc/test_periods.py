"""Calendar periods against an independent oracle built on zoneinfo: a period starts at
the first instant whose local date is its first day (found by search, not by building
local midnight), in UTC and in zones with daylight saving, including the change days."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.usage_svc.periods import Period, bounds, zone

ZONES = ["UTC", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "America/Havana"]
HOUR_MS = 3_600_000


def local_date(ms: int, tz: ZoneInfo) -> date:
    return datetime.fromtimestamp(ms / 1000, tz).date()


def first_instant_on_or_after(day: date, tz: ZoneInfo, near_ms: int) -> int:
    """The first minute whose local date is `day` or later, searched around `near_ms`."""
    low, high = (near_ms - 40 * HOUR_MS) // 60_000, (near_ms + 40 * HOUR_MS) // 60_000
    assert local_date(low * 60_000, tz) < day <= local_date(high * 60_000, tz)
    while high - low > 1:  # binary search, in whole minutes, on "local date >= day"
        middle = (low + high) // 2
        if local_date(middle * 60_000, tz) >= day:
            high = middle
        else:
            low = middle
    return high * 60_000


def oracle(period: Period, tz_name: str, now_ms: int) -> tuple[int, int]:
    tz = ZoneInfo(tz_name)
    today = local_date(now_ms, tz)
    if period == Period.DAY:
        first, following = today, today + timedelta(days=1)
    elif period == Period.WEEK:
        first = today - timedelta(days=today.weekday())
        following = first + timedelta(days=7)
    else:
        first = today.replace(day=1)
        following = (first + timedelta(days=32)).replace(day=1)

    def start_of(day: date) -> int:
        guess = int(datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp() * 1000)
        return first_instant_on_or_after(day, tz, guess)

    return start_of(first), start_of(following)


@pytest.mark.parametrize("tz_name", ZONES)
@pytest.mark.parametrize("period", [Period.DAY, Period.WEEK, Period.MONTH])
def test_bounds_match_the_oracle_every_day_of_a_year(tz_name: str, period: Period) -> None:
    start = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)
    for day in range(0, 366, 1 if period == Period.DAY else 3):
        for hour in (0, 1, 2, 3, 12, 23):  # around midnight and the small hours of DST
            now = start + day * 24 * HOUR_MS + hour * HOUR_MS + 7 * 60_000
            got = bounds(period, tz_name, now, 0)
            assert got[0] <= now < got[1]
            # The oracle has minute resolution; real boundaries sit on whole minutes.
            assert got == oracle(period, tz_name, now), (tz_name, period, now)


def test_daylight_saving_days_last_23_and_25_hours() -> None:
    ny = "America/New_York"
    spring = int(datetime(2026, 3, 8, 15, tzinfo=UTC).timestamp() * 1000)  # 11:00 EDT
    autumn = int(datetime(2026, 11, 1, 17, tzinfo=UTC).timestamp() * 1000)  # 12:00 EST
    start, end = bounds(Period.DAY, ny, spring, 0)
    assert end - start == 23 * HOUR_MS
    assert start == int(datetime(2026, 3, 8, 5, tzinfo=UTC).timestamp() * 1000)  # 00:00 EST
    start, end = bounds(Period.DAY, ny, autumn, 0)
    assert end - start == 25 * HOUR_MS
    assert start == int(datetime(2026, 11, 1, 4, tzinfo=UTC).timestamp() * 1000)  # 00:00 EDT
    # A week holding the spring change is 167 hours; a month holding it, one hour short.
    start, end = bounds(Period.WEEK, ny, spring, 0)
    assert end - start == 7 * 24 * HOUR_MS - HOUR_MS
    start, end = bounds(Period.MONTH, ny, spring, 0)
    assert end - start == 31 * 24 * HOUR_MS - HOUR_MS


def test_a_skipped_midnight_starts_the_day_at_its_first_instant() -> None:
    # Havana springs forward at 00:00 → 01:00 (2026-03-08): the day starts at 01:00 CDT.
    havana = "America/Havana"
    noon = int(datetime(2026, 3, 8, 17, tzinfo=UTC).timestamp() * 1000)
    start, _ = bounds(Period.DAY, havana, noon, 0)
    assert datetime.fromtimestamp(start / 1000, ZoneInfo(havana)).hour == 1
    assert local_date(start - 1, ZoneInfo(havana)) == date(2026, 3, 7)


def test_lifetime_runs_from_creation_without_end() -> None:
    assert bounds(Period.LIFETIME, "UTC", 5_000, 1_234) == (1_234, 0)


def test_unknown_zones_are_refused() -> None:
    for name in ("Mars/Olympus", "", "../etc/passwd", "/etc/localtime", "UTC/../UTC"):
        assert zone(name) is None
    with pytest.raises(ValueError):
        bounds(Period.DAY, "Mars/Olympus", 0, 0)
