"""Local wall time to UTC, correct across DST: zoneinfo only, no clock, no I/O beyond the
time-zone database."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

MINUTES_PER_DAY = 1440


def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def require_aware(at: datetime) -> None:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("rules take timezone-aware datetimes (UTC)")


def local_date(at: datetime, tz: ZoneInfo) -> date:
    require_aware(at)
    return at.astimezone(tz).date()


def _exists(naive: datetime, tz: ZoneInfo) -> bool:
    back = naive.replace(tzinfo=tz).astimezone(UTC).astimezone(tz).replace(tzinfo=None)
    return back == naive


def wall_to_utc(day: date, minute: int, tz: ZoneInfo) -> datetime:
    """The UTC instant of local wall time ``minute`` (0..1440) on ``day``. A wall time inside a
    spring-forward gap moves to the first valid instant after it (the transition itself); an
    ambiguous one (fall-back) is its first occurrence (fold=0)."""
    if not 0 <= minute <= MINUTES_PER_DAY:
        raise ValueError(f"minute {minute} is outside a day")
    naive = datetime.combine(day, time()) + timedelta(minutes=minute)
    if _exists(naive, tz):
        return naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    # In a gap: fold=1 reads it with the offset after the transition (an instant before the
    # gap), fold=0 with the offset before it (an instant after the gap). The transition lies
    # between the two; bisect to the second.
    before = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    after = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    low, high = min(before, after), max(before, after)
    offset_low = low.astimezone(tz).utcoffset()
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        middle = middle.replace(microsecond=0)
        if middle.astimezone(tz).utcoffset() == offset_low:
            low = middle
        else:
            high = middle
    return high


def hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"
