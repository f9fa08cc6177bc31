"""Schema, ledger and constraints on both databases: a SQLite file and a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session, select

from carriers.loader import default_registry
from models import ledger
from models.db import make_engine, migrate
from models.seed import seed_reference_data
from models.tables import (
    Carrier,
    LedgerEntry,
    LedgerKind,
    PricePoint,
    Subscriber,
    Subscription,
    SubscriptionStatus,
)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('models') / 'models.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        with make_engine(url).begin() as conn:  # a clean schema for this module
            conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    migrate(url)
    migrate(url)  # a second run is a no-op
    engine = make_engine(url)
    seed_reference_data(engine, default_registry())
    seed_reference_data(engine, default_registry())  # idempotent
    yield engine
    engine.dispose()


_next = iter(range(10_000, 99_999))


def subscription(engine: Engine, status: SubscriptionStatus = SubscriptionStatus.ACTIVE,
                 subscriber_id: int | None = None) -> Subscription:
    with Session(engine) as session:
        if subscriber_id is None:
            subscriber = Subscriber(msisdn=f"+336120{next(_next):05d}", carrier_id="fr-azur",
                                    timezone="Europe/Paris", locale="fr_FR")
            session.add(subscriber)
            session.flush()
            subscriber_id = subscriber.id
        assert subscriber_id is not None
        row = Subscription(subscriber_id=subscriber_id, product_id="game-pass",
                           price_point_id="fr-azur-pass-monthly", status=status)
        session.add(row)
        session.commit()
        session.refresh(row)
        return row


def charge(sub: Subscription, key: str, amount: int = 499) -> LedgerEntry:
    assert sub.id is not None
    return LedgerEntry(idempotency_key=key, kind=LedgerKind.CHARGE, subscription_id=sub.id, cycle=1,
                       carrier_id="fr-azur", amount_minor=amount, currency="EUR",
                       carrier_reference="ref-1", due_at=datetime(2027, 1, 31, tzinfo=UTC))


def test_reference_data_is_seeded_from_the_registry(db: Engine) -> None:
    registry = default_registry()
    with Session(db) as session:
        carriers = session.exec(select(Carrier)).all()
        assert {c.id for c in carriers} == set(registry.carriers)
        kw = session.get(PricePoint, "kw-gulfcell-pass-monthly")
        jp = session.get(PricePoint, "jp-sakura-pass-monthly")
        assert kw is not None and (kw.amount_minor, kw.currency) == (1500, "KWD")
        assert jp is not None and (jp.amount_minor, jp.currency) == (500, "JPY")


def test_ledger_key_is_written_once(db: Engine) -> None:
    sub = subscription(db)
    key = f"sub-{sub.id}-c1-a0"
    with Session(db) as session:
        first = ledger.append(session, charge(sub, key))
    with Session(db) as session:
        again = ledger.append(session, charge(sub, key))
    assert again.id == first.id
    with Session(db) as session, pytest.raises(ledger.LedgerConflict):
        ledger.append(session, charge(sub, key, amount=999))
    with Session(db) as session:
        rows = session.exec(select(LedgerEntry).where(LedgerEntry.idempotency_key == key)).all()
        assert len(rows) == 1 and rows[0].amount_minor == 499


@pytest.mark.parametrize("statement", [
    "UPDATE ledgerentry SET amount_minor = 1",
    "DELETE FROM ledgerentry",
])
def test_ledger_is_append_only(db: Engine, statement: str) -> None:
    sub = subscription(db)
    with Session(db) as session:
        ledger.append(session, charge(sub, f"sub-{sub.id}-append-only"))
    with pytest.raises(DBAPIError, match="append-only"), db.begin() as conn:
        conn.execute(sa.text(statement))


def test_ledger_refuses_non_positive_amounts(db: Engine) -> None:
    sub = subscription(db)
    with Session(db) as session, pytest.raises(IntegrityError):
        session.add(charge(sub, f"sub-{sub.id}-zero", amount=0))
        session.commit()


def test_one_live_subscription_per_subscriber_and_product(db: Engine) -> None:
    live = subscription(db)
    with pytest.raises(IntegrityError):
        subscription(db, subscriber_id=live.subscriber_id)
    ended = subscription(db, SubscriptionStatus.CANCELLED, subscriber_id=live.subscriber_id)
    assert ended.id != live.id
    with Session(db) as session:
        row = session.get(Subscription, live.id)
        assert row is not None
        row.status = SubscriptionStatus.CANCELLED
        session.add(row)
        session.commit()
    assert subscription(db, subscriber_id=live.subscriber_id).id is not None


def test_msisdn_is_unique(db: Engine) -> None:
    with Session(db) as session, pytest.raises(IntegrityError):
        for _ in range(2):
            session.add(Subscriber(msisdn="+33612999999", carrier_id="fr-azur",
                                   timezone="Europe/Paris", locale="fr_FR"))
            session.flush()


def test_workers_starting_together_migrate_and_seed_once(postgres_url: str) -> None:
    """Replicas start at once: the advisory lock serialises migration and seeding."""
    from concurrent.futures import ThreadPoolExecutor

    from settings import Settings
    from worker import prepare_database

    url = postgres_url.rsplit("/", 1)[0] + "/replicas"
    with make_engine(postgres_url).connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            sa.text("CREATE DATABASE replicas"))
    settings = Settings(database_url=url, _env_file=None)
    with ThreadPoolExecutor(4) as pool:
        engines = list(pool.map(lambda _: prepare_database(settings, default_registry()), range(4)))
    with Session(engines[0]) as session:
        assert len(session.exec(select(Carrier)).all()) == len(default_registry().carriers)
    for engine in engines:
        engine.dispose()
