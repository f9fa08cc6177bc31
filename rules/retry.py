"""When to retry a charge the subscriber could not pay: bounded per cycle and per local day,
always inside the charging window. Pure."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from rules.localtime import local_date, require_aware
from rules.types import NEXT_WINDOW, ChargingRules
from rules.windows import next_allowed, next_opening, opening_on


def next_retry(at: datetime, retries_so_far_in_cycle: int, retries_today: int,
               rules: ChargingRules) -> datetime | None:
    """The moment of the next retry after a failed attempt at ``at``; None once the cycle's
    retries are spent (the caller then applies ``rules.after_retries``). The delays are used in
    order, the last repeating; a -1 delay means the next window opening (preferred time).
    With today's retries spent, the retry waits for the next local day's opening."""
    require_aware(at)
    if retries_so_far_in_cycle >= rules.max_retries_per_cycle or not rules.retry_delays_seconds:
        return None
    delays = rules.retry_delays_seconds
    delay = delays[min(retries_so_far_in_cycle, len(delays) - 1)]
    if delay == NEXT_WINDOW:
        moment = next_opening(at, rules)
    else:
        candidate = at + timedelta(seconds=delay)
        postponed = next_allowed(candidate, rules)
        moment = postponed.until if postponed else candidate
    tz = ZoneInfo(rules.timezone)
    today = local_date(at, tz)
    if retries_today >= rules.max_retries_per_day and local_date(moment, tz) == today:
        # the day's budget is spent: the earliest retry is tomorrow's opening
        moment = opening_on(today + timedelta(days=1), rules)
    return moment
