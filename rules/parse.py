"""Parsers for the small text forms the data files use ("08:00-21:00", "4h", "sun")."""

from __future__ import annotations

import re

from rules.types import NEXT_WINDOW

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"^(\d{2}):(\d{2})$")
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def minute_of(text: str, allow_end_of_day: bool = False) -> int:
    """Minutes after midnight of "HH:MM"; "24:00" only where an end of day is meant."""
    match = _HHMM.match(text)
    if not match:
        raise ValueError(f"{text!r} is not HH:MM")
    hours, minutes = int(match[1]), int(match[2])
    if minutes > 59 or hours > 24 or (hours == 24 and (minutes or not allow_end_of_day)):
        raise ValueError(f"{text!r} is not a time of day")
    return hours * 60 + minutes


def window_of(text: str) -> tuple[int, int]:
    """[start, end) of "HH:MM-HH:MM"; windows do not cross midnight (end may be 24:00)."""
    parts = text.split("-")
    if len(parts) != 2:
        raise ValueError(f"{text!r} is not HH:MM-HH:MM")
    start, end = minute_of(parts[0]), minute_of(parts[1], allow_end_of_day=True)
    if start >= end:
        raise ValueError(f"{text!r} must start before it ends (windows do not cross midnight)")
    return start, end


def weekday_of(text: str) -> int:
    try:
        return WEEKDAYS.index(text)
    except ValueError:
        raise ValueError(f"{text!r} is not one of {', '.join(WEEKDAYS)}") from None


def delay_of(text: str) -> int:
    """Seconds of "45s", "30m", "4h", "1d"; "next_window" is NEXT_WINDOW (-1)."""
    if text == "next_window":
        return NEXT_WINDOW
    match = _DURATION.match(text)
    if not match or int(match[1]) == 0:
        raise ValueError(f"{text!r} is not a positive duration like 30m, 4h, 1d or next_window")
    return int(match[1]) * _UNIT_SECONDS[match[2]]
