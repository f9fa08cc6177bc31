"""When a charge may be sent: the country's daily window minus the carrier's maintenance, in
the subscriber's local time. Pure: no clock, no I/O, zoneinfo only.

Choice: a charge that falls outside the window (quiet hours) moves to the carrier's preferred
local time of the next day that allows charging, when the carrier has one, because that is
when its charges succeed best; otherwise to the window's opening. A charge inside the window
but in maintenance moves only to the end of the maintenance (the first allowed moment), unless
the maintenance lasts until the window closes."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from rules.localtime import hhmm, local_date, require_aware, wall_to_utc
from rules.types import ChargingRules, Postponement

# the furthest a search looks ahead: a week covers every weekly maintenance pattern
_SEARCH_DAYS = 9


def _window(day: date, rules: ChargingRules, tz: ZoneInfo) -> tuple[datetime, datetime]:
    return (wall_to_utc(day, rules.window_start_minute, tz),
            wall_to_utc(day, rules.window_end_minute, tz))


def _maintenance(day: date, rules: ChargingRules, tz: ZoneInfo) -> list[tuple[datetime, datetime]]:
    return [(wall_to_utc(day, m.start_minute, tz), wall_to_utc(day, m.end_minute, tz))
            for m in rules.maintenance if m.weekday == day.weekday()]


def _allowed_segments(day: date, rules: ChargingRules, tz: ZoneInfo) -> list[tuple[datetime, datetime]]:
    """The day's window with maintenance (of this day and its neighbours) cut out."""
    segments = [_window(day, rules, tz)]
    cuts = [c for d in (-1, 0, 1) for c in _maintenance(day + timedelta(days=d), rules, tz)]
    for cut_start, cut_end in cuts:
        kept = []
        for start, end in segments:
            if cut_end <= start or cut_start >= end:
                kept.append((start, end))
                continue
            if start < cut_start:
                kept.append((start, cut_start))
            if cut_end < end:
                kept.append((cut_end, end))
        segments = kept
    return sorted(segments)


def first_allowed_from(at: datetime, rules: ChargingRules) -> datetime:
    """The first instant at or after ``at`` when a charge may be sent."""
    require_aware(at)
    tz = ZoneInfo(rules.timezone)
    first_day = local_date(at, tz)
    for offset in range(_SEARCH_DAYS):
        for start, end in _allowed_segments(first_day + timedelta(days=offset), rules, tz):
            if end > at:
                return max(start, at)
    raise ValueError(f"no charging time within {_SEARCH_DAYS} days of {at.isoformat()}")


def next_opening(at: datetime, rules: ChargingRules) -> datetime:
    """The preferred time (else the window's opening) of the next local day whose window has
    not yet opened at ``at``, moved past any maintenance."""
    tz = ZoneInfo(rules.timezone)
    day = local_date(at, tz)
    if at >= wall_to_utc(day, rules.window_start_minute, tz):
        day += timedelta(days=1)
    return opening_on(day, rules)


def opening_on(day: date, rules: ChargingRules) -> datetime:
    """The preferred time (else the window's opening) of local ``day``, past any maintenance."""
    tz = ZoneInfo(rules.timezone)
    minute = rules.preferred_minute if rules.preferred_minute is not None else rules.window_start_minute
    return first_allowed_from(wall_to_utc(day, minute, tz), rules)


def _in_window(at: datetime, rules: ChargingRules, tz: ZoneInfo) -> bool:
    start, end = _window(local_date(at, tz), rules, tz)
    return start <= at < end


def next_allowed(at: datetime, rules: ChargingRules) -> Postponement | None:
    """None when a charge may be sent at ``at``; otherwise when it may, and why not now."""
    require_aware(at)
    tz = ZoneInfo(rules.timezone)
    if _in_window(at, rules, tz):
        until = first_allowed_from(at, rules)
        if until == at:
            return None
        if local_date(until, tz) != local_date(at, tz):
            # maintenance runs to the close: like quiet hours, the next day's preferred time
            until = next_opening(at, rules)
        why = "carrier maintenance"
    else:
        until = next_opening(at, rules)
        why = "quiet hours"
    local = until.astimezone(tz)
    return Postponement(until=until, reason=f"{why} until {hhmm(local.hour * 60 + local.minute)} "
                                            f"{rules.timezone}")


def local_charge_time(due: datetime, rules: ChargingRules) -> datetime:
    """A cycle's due time moved to the carrier's preferred local time on the same local day
    (renewals at the hour the carrier does best); ``due`` itself when there is none. The result
    may be earlier than ``due``; pass it through next_allowed before charging."""
    require_aware(due)
    if rules.preferred_minute is None:
        return due
    tz = ZoneInfo(rules.timezone)
    return wall_to_utc(local_date(due, tz), rules.preferred_minute, tz)
