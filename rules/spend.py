"""What a subscriber has spent so far in the local day, week and month: a database read (not
pure: call it from an activity, never from a workflow)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import func
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from models.tables import CarrierOperation, LedgerEntry, LedgerKind, Subscription
from rules.localtime import local_date, require_aware, wall_to_utc
from rules.types import SpendSoFar


def _utc(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; the platform writes them in UTC
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _month_start(day: date) -> date:
    return day.replace(day=1)


def _next_month(day: date) -> date:
    return (day.replace(day=28) + timedelta(days=4)).replace(day=1)


def spend_so_far(session: Session, subscriber_id: int, subscription_id: int, at: datetime,
                 timezone: str) -> SpendSoFar:
    """Net charges (a refund lowers the period of the charge it reverses, or its own when it
    names none) in the local day, week
    (from Monday) and month holding ``at``, across the subscriber's subscriptions and for
    ``subscription_id`` alone; and the charge operations sent since local midnight.

    Moments are the charges' ``due_at``: the workflow's clock when the attempt was made (the
    business time, which a time-skipping test server moves; never the database's clock)."""
    require_aware(at)
    tz = ZoneInfo(timezone)
    today = local_date(at, tz)
    week_first = today - timedelta(days=today.weekday())
    day = (wall_to_utc(today, 0, tz), wall_to_utc(today + timedelta(days=1), 0, tz))
    week = (wall_to_utc(week_first, 0, tz), wall_to_utc(week_first + timedelta(days=7), 0, tz))
    month = (wall_to_utc(_month_start(today), 0, tz), wall_to_utc(_next_month(today), 0, tz))
    earliest, latest = min(week[0], month[0]), max(week[1], month[1])

    # a refund counts when the charge it reverses was made: refunding December's charge in
    # January must not make room under January's cap
    reversed_charge = aliased(LedgerEntry)
    counted_at = func.coalesce(col(reversed_charge.due_at), col(LedgerEntry.due_at))
    rows = session.exec(
        select(LedgerEntry.kind, LedgerEntry.amount_minor, counted_at,
               LedgerEntry.subscription_id)
        .join(Subscription, col(Subscription.id) == col(LedgerEntry.subscription_id))
        .outerjoin(reversed_charge,
                   col(reversed_charge.id) == col(LedgerEntry.refunds_entry_id))
        .where(Subscription.subscriber_id == subscriber_id, counted_at >= earliest,
               counted_at < latest)
    ).all()
    totals = {"day": 0, "week": 0, "month": 0, "subscription": 0}
    for kind, amount, committed, sub_id in rows:
        # a charge settled by reconciliation is money taken like any other
        signed = amount if kind in (LedgerKind.CHARGE, LedgerKind.RECONCILED) else -amount
        moment = _utc(committed)
        for name, (start, end) in (("day", day), ("week", week), ("month", month)):
            if start <= moment < end:
                totals[name] += signed
        if sub_id == subscription_id and month[0] <= moment < month[1]:
            totals["subscription"] += signed

    attempts = session.exec(
        select(func.count())
        .select_from(CarrierOperation)
        .join(Subscription, col(Subscription.id) == col(CarrierOperation.subscription_id))
        .where(Subscription.subscriber_id == subscriber_id,
               CarrierOperation.kind == LedgerKind.CHARGE,
               col(CarrierOperation.due_at) >= day[0],
               col(CarrierOperation.due_at) < day[1])
    ).one()
    # never below zero, whatever the ledger holds
    return SpendSoFar(day_minor=max(totals["day"], 0), week_minor=max(totals["week"], 0),
                      month_minor=max(totals["month"], 0),
                      subscription_month_minor=max(totals["subscription"], 0),
                      attempts_today=int(attempts))
