"""spend_so_far against a real SQLite database with the project's schema (Alembic) and
reference data: local day, week and month boundaries, refunds, attempts."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import count
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from carriers.loader import default_registry
from models.db import make_engine, migrate
from models.seed import seed_reference_data
from models.tables import (
    CarrierOperation,
    LedgerEntry,
    LedgerKind,
    OperationState,
    Subscriber,
    Subscription,
    SubscriptionStatus,
)
from rules.spend import spend_so_far
from rules.types import SpendSoFar

WARSAW = "Europe/Warsaw"
_keys = count(1)


@pytest.fixture(autouse=True)
def callback_receiver() -> None:
    """These tests need a database only: no Temporal server, simulator or callback receiver."""


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'rules.db'}"
    migrate(url)
    engine = make_engine(url)
    seed_reference_data(engine, default_registry())
    yield engine
    engine.dispose()


def utc(year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def subscriber(session: Session, msisdn: str) -> int:
    row = Subscriber(msisdn=msisdn, carrier_id="pl-baltyk", timezone=WARSAW, locale="pl_PL")
    session.add(row)
    session.flush()
    assert row.id is not None
    return row.id


def subscription(session: Session, subscriber_id: int, price_point: str,
                 status: SubscriptionStatus = SubscriptionStatus.ACTIVE) -> int:
    row = Subscription(subscriber_id=subscriber_id, product_id="game-pass",
                       price_point_id=price_point, status=status)
    session.add(row)
    session.flush()
    assert row.id is not None
    return row.id


def ledger(session: Session, subscription_id: int, amount: int, at: datetime,
           kind: LedgerKind = LedgerKind.CHARGE, refunds: int | None = None) -> int:
    row = LedgerEntry(idempotency_key=f"k-{next(_keys)}", kind=kind,
                      subscription_id=subscription_id, cycle=1, carrier_id="pl-baltyk",
                      amount_minor=amount, currency="PLN", carrier_reference="ref",
                      refunds_entry_id=refunds, due_at=at, committed_at=at)
    session.add(row)
    session.flush()
    assert row.id is not None
    return row.id


def operation(session: Session, subscription_id: int, at: datetime,
              kind: LedgerKind = LedgerKind.CHARGE) -> None:
    session.add(CarrierOperation(idempotency_key=f"op-{next(_keys)}", kind=kind,
                                 carrier_id="pl-baltyk", workflow_id="w",
                                 subscription_id=subscription_id, cycle=1, amount_minor=100,
                                 currency="PLN", due_at=at, state=OperationState.SETTLED,
                                 created_at=at, updated_at=at))


@pytest.fixture
def books(engine: Engine) -> tuple[int, int, int]:
    """One subscriber with two subscriptions, and a stranger whose spend must not count."""
    with Session(engine) as session:
        who = subscriber(session, "+48500100200")
        monthly = subscription(session, who, "pl-baltyk-pass-monthly")
        other = subscription(session, who, "pl-baltyk-pass-demo", SubscriptionStatus.CANCELLED)
        stranger = subscription(session, subscriber(session, "+48500100201"),
                                "pl-baltyk-pass-monthly")
        # Friday 16 January 2026, 00:30 Warsaw (CET): the 16th locally, the 15th in UTC
        ledger(session, monthly, 1999, utc(2026, 1, 15, 23, 30))
        # Thursday 15 January, 22:00 Warsaw
        ledger(session, other, 246, utc(2026, 1, 15, 21, 0))
        # Sunday 11 January (the previous week), and 31 December 2025 (the previous month)
        ledger(session, monthly, 500, utc(2026, 1, 11, 12, 0))
        ledger(session, monthly, 700, utc(2025, 12, 31, 12, 0))
        # 31 January 23:30 UTC is 1 February 00:30 in Warsaw: February's spend
        ledger(session, monthly, 900, utc(2026, 1, 31, 23, 30))
        ledger(session, stranger, 5000, utc(2026, 1, 16, 9, 0))
        operation(session, monthly, utc(2026, 1, 15, 23, 10))  # the 16th locally
        operation(session, monthly, utc(2026, 1, 16, 8, 0))
        operation(session, other, utc(2026, 1, 15, 22, 50))  # 15th locally, 23:50
        operation(session, monthly, utc(2026, 1, 16, 8, 30), LedgerKind.REFUND)
        operation(session, stranger, utc(2026, 1, 16, 8, 0))
        session.commit()
    return who, monthly, other


def test_a_charge_at_2330_utc_counts_for_the_next_local_day(engine: Engine,
                                                           books: tuple[int, int, int]) -> None:
    who, monthly, _ = books
    with Session(engine) as session:
        friday = spend_so_far(session, who, monthly, utc(2026, 1, 16, 10, 0), WARSAW)
        thursday = spend_so_far(session, who, monthly, utc(2026, 1, 15, 22, 30), WARSAW)
    # Friday: 19.99 (16th) only; week from Monday 12th: 19.99 + 2.46; month: + 5.00 on the 11th
    assert friday == SpendSoFar(day_minor=1999, week_minor=1999 + 246,
                                month_minor=1999 + 246 + 500, subscription_month_minor=1999 + 500,
                                attempts_today=2)
    # Thursday 23:30 Warsaw: the 23:30 UTC charge has not happened on this local day
    assert thursday.day_minor == 246 and thursday.attempts_today == 1


def test_month_boundary_is_local(engine: Engine, books: tuple[int, int, int]) -> None:
    who, monthly, _ = books
    with Session(engine) as session:
        january = spend_so_far(session, who, monthly, utc(2026, 1, 31, 22, 0), WARSAW)
        february = spend_so_far(session, who, monthly, utc(2026, 2, 1, 9, 0), WARSAW)
        # in UTC the same entry would still be January's
        in_utc = spend_so_far(session, who, monthly, utc(2026, 1, 31, 23, 45), "UTC")
    assert january.month_minor == 1999 + 246 + 500
    assert february.month_minor == 900 and february.subscription_month_minor == 900
    assert february.day_minor == 900 and february.week_minor == 900  # Sunday 1 Feb; week from 26 Jan
    assert in_utc.month_minor == 1999 + 246 + 500 + 900


def test_a_refund_lowers_spend(engine: Engine, books: tuple[int, int, int]) -> None:
    who, monthly, _ = books
    with Session(engine) as session:
        ledger(session, monthly, 1999, utc(2026, 1, 16, 11, 0), LedgerKind.REFUND)
        session.commit()
        after = spend_so_far(session, who, monthly, utc(2026, 1, 16, 12, 0), WARSAW)
    assert (after.day_minor, after.week_minor, after.month_minor,
            after.subscription_month_minor) == (0, 246, 246 + 500, 500)


def test_a_refund_counts_in_the_period_of_the_charge_it_reverses(
        engine: Engine, books: tuple[int, int, int]) -> None:
    who, monthly, _ = books
    with Session(engine) as session:
        december = ledger(session, monthly, 300, utc(2025, 12, 20, 12, 0))
        # refunded on 16 January: December's spend falls, January's does not make room
        ledger(session, monthly, 300, utc(2026, 1, 16, 11, 0), LedgerKind.REFUND, refunds=december)
        session.commit()
        january = spend_so_far(session, who, monthly, utc(2026, 1, 16, 12, 0), WARSAW)
        in_december = spend_so_far(session, who, monthly, utc(2025, 12, 28, 12, 0), WARSAW)
    assert (january.day_minor, january.month_minor) == (1999, 1999 + 246 + 500)
    assert in_december.month_minor == 700


def test_nothing_spent(engine: Engine) -> None:
    with Session(engine) as session:
        who = subscriber(session, "+48500100999")
        sub = subscription(session, who, "pl-baltyk-pass-monthly")
        session.commit()
        assert spend_so_far(session, who, sub, utc(2026, 1, 16, 12, 0), WARSAW) == SpendSoFar()
