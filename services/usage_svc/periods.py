"""Calendar periods of budgets (docs/api.md §8): where the period holding an instant starts
and ends, in the budget's time zone.

DAY starts at 00:00, WEEK on Monday 00:00, MONTH on the 1st at 00:00, local time, so a
day is 23 or 25 hours long on daylight-saving days. Where local midnight does not exist
(a zone that springs forward at 00:00), the period starts at the first instant of that
local day. LIFETIME has one period, from the budget's creation, with no end.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class Period(enum.StrEnum):
    LIFETIME = "LIFETIME"
    DAY = "DAY"
    WEEK = "WEEK"
    MONTH = "MONTH"
    MINUTE = "MINUTE"  # sliding windows: no start, no end, no history
    HOUR = "HOUR"


# How many past periods are kept: at least 13 months of each kind.
HISTORY = {Period.LIFETIME: 0, Period.DAY: 400, Period.WEEK: 58, Period.MONTH: 14,
           Period.MINUTE: 0, Period.HOUR: 0}  # fmt: skip
WINDOW_SECONDS = {Period.MINUTE: 60, Period.HOUR: 3600}  # the sliding windows' lengths


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo | None:
    """The time zone of an IANA name, or None when there is no such zone."""
    if not name or len(name) > 64 or name.startswith(("/", ".")) or ".." in name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def _first_day(period: Period, day: date) -> date:
    if period == Period.WEEK:
        return day - timedelta(days=day.weekday())
    if period == Period.MONTH:
        return day.replace(day=1)
    return day


def _next_first_day(period: Period, first: date) -> date:
    if period == Period.WEEK:
        return first + timedelta(days=7)
    if period == Period.MONTH:
        return (first.replace(day=28) + timedelta(days=4)).replace(day=1)
    return first + timedelta(days=1)


def _local_midnight_ms(day: date, tz: ZoneInfo) -> int:
    """The first instant of a local day, in Unix ms."""
    midnight = datetime(day.year, day.month, day.day, tzinfo=tz)
    instant = midnight.astimezone(UTC)
    # A midnight skipped by a DST jump converts with the offset before the jump, landing
    # on the first instant of the day that does exist; a repeated one takes the first.
    return int(instant.timestamp() * 1000)


def bounds(period: Period, tz_name: str, now_ms: int, created_ms: int) -> tuple[int, int]:
    """(start, end) in Unix ms of the period holding `now_ms`; end 0 for LIFETIME and the
    windows (which slide: they never end, nor start again)."""
    if period in (Period.LIFETIME, Period.MINUTE, Period.HOUR):
        return created_ms, 0
    tz = zone(tz_name)
    if tz is None:
        raise ValueError(f"unknown time zone {tz_name!r}")
    local = datetime.fromtimestamp(now_ms / 1000, tz)
    first = _first_day(period, local.date())
    start = _local_midnight_ms(first, tz)
    if start > now_ms:  # a DST fold can put `now` just before the computed midnight
        first = _first_day(period, first - timedelta(days=1))
        start = _local_midnight_ms(first, tz)
    end = _local_midnight_ms(_next_first_day(period, first), tz)
    return start, end
