"""Spending caps: which cap (if any) refuses a charge, and when that cap's period rolls over.
Pure: the spend so far is given (rules/spend.py reads it from the ledger)."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from rules.localtime import local_date, require_aware, wall_to_utc
from rules.money_text import show
from rules.types import ChargingRules, Refusal, SpendSoFar

_PER = {"per_day": "per day", "per_week": "per week", "per_month": "per month",
        "subscription_per_month": "per month for a subscription"}


def _over(rules: ChargingRules, name: str, limit: int | None, spent: int,
          amount: int) -> Refusal | None:
    if limit is None or spent + amount <= limit:
        return None
    money = rules.currency
    return Refusal(rule=f"{rules.country_code}.{name}", limit_minor=limit, spent_minor=spent,
                   figure=f"{show(limit, money)} {_PER[name]} (spent {show(spent, money)}, "
                          f"this charge {show(amount, money)})")


def first_refusal(amount_minor: int, spent: SpendSoFar, rules: ChargingRules,
                  is_subscription: bool) -> Refusal | None:
    """The first cap ``amount_minor`` would break, checked in order: per transaction, day,
    week, month, subscription month (subscriptions only), attempts today. None: allowed."""
    if amount_minor <= 0:
        raise ValueError("a charge is a positive amount")
    caps, code, money = rules.caps, rules.country_code, rules.currency
    limit = caps.per_transaction_minor
    if limit is not None and amount_minor > limit:
        return Refusal(rule=f"{code}.per_transaction", limit_minor=limit, spent_minor=0,
                       figure=f"{show(limit, money)} per transaction "
                              f"(this charge {show(amount_minor, money)})")
    checks = [("per_day", caps.per_day_minor, spent.day_minor),
              ("per_week", caps.per_week_minor, spent.week_minor),
              ("per_month", caps.per_month_minor, spent.month_minor)]
    if is_subscription:
        checks.append(("subscription_per_month", caps.subscription_per_month_minor,
                       spent.subscription_month_minor))
    for name, cap, so_far in checks:
        refusal = _over(rules, name, cap, so_far, amount_minor)
        if refusal is not None:
            return refusal
    attempts = caps.max_attempts_per_day
    if attempts is not None and spent.attempts_today >= attempts:
        # counts, not money: limit and spent are numbers of attempts
        return Refusal(rule=f"{code}.max_attempts_per_day", limit_minor=attempts,
                       spent_minor=spent.attempts_today,
                       figure=f"{attempts} charge attempts per day (made {spent.attempts_today})")
    return None


def next_cap_reset(at: datetime, refusal: Refusal, rules: ChargingRules) -> datetime:
    """When the refused cap's period next rolls over in local time: the next local midnight
    (day caps, attempts), Monday 00:00 (week) or the 1st 00:00 (month). Apply next_allowed to
    the result before charging. A per-transaction cap never rolls over: ValueError."""
    require_aware(at)
    tz = ZoneInfo(rules.timezone)
    today = local_date(at, tz)
    kind = refusal.rule.split(".", 1)[-1]
    if kind in ("per_day", "max_attempts_per_day"):
        day = today + timedelta(days=1)
    elif kind == "per_week":
        day = today + timedelta(days=7 - today.weekday())
    elif kind in ("per_month", "subscription_per_month"):
        day = (today.replace(day=28) + timedelta(days=4)).replace(day=1)
    else:
        raise ValueError(f"{refusal.rule} does not roll over: the charge can never pass it")
    return wall_to_utc(day, 0, tz)
