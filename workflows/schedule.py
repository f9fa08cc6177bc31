"""Due times of billing cycles. Pure and deterministic, so workflows may call it."""

from __future__ import annotations

import calendar
from datetime import datetime, timedelta


def add_months(anchor: datetime, months: int) -> datetime:
    """Same day of month as ``anchor``, clamped to the month's length: 31 Jan + 1 = 28/29 Feb."""
    month_index = anchor.month - 1 + months
    year, month = anchor.year + month_index // 12, month_index % 12 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def due_at(anchor: datetime, period: str, cycle: int, interval_seconds: int | None = None) -> datetime:
    """When cycle ``cycle`` (1-based) falls due. Always counted from the anchor, never from the
    previous due time, so a clamped month does not drift (31 Jan, 28 Feb, 31 Mar)."""
    if cycle < 1:
        raise ValueError("cycles are numbered from 1")
    steps = cycle - 1
    if period == "monthly":
        return add_months(anchor, steps)
    if period == "weekly":
        return anchor + timedelta(weeks=steps)
    if period == "daily":
        return anchor + timedelta(days=steps)
    if period == "interval":
        if not interval_seconds:
            raise ValueError("interval plans need interval_seconds")
        return anchor + timedelta(seconds=interval_seconds * steps)
    if period == "one_off":
        if steps:
            raise ValueError("a one-off plan has a single cycle")
        return anchor
    raise ValueError(f"unknown period {period!r}")
