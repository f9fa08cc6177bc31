"""The client SDK: bad input is refused before anything is written; refunds; one live subscription."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from temporalio.testing import WorkflowEnvironment

from models.tables import LedgerEntry, Period, Subscriber, Subscription
from starter import StartSubscriptionRequest, SubscriptionClient, SubscriptionRequestError
from tests.conftest import Simulator


def row_counts(engine: Engine) -> tuple[int, int, int]:
    with Session(engine) as session:
        return tuple(  # type: ignore[return-value]
            session.exec(select(func.count()).select_from(table)).one()
            for table in (Subscriber, Subscription, LedgerEntry)
        )


def request(**overrides: Any) -> StartSubscriptionRequest:
    fields: dict[str, Any] = {
        "msisdn": "+33612000001", "product_id": "game-pass", "amount_minor": 499,
        "currency": "EUR", "period": Period.MONTHLY,
    }
    fields.update(overrides)
    return StartSubscriptionRequest(**fields)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"msisdn": "0612345678"}, "international form"),
        ({"msisdn": "+33 6 12"}, "not a valid number"),
        ({"msisdn": "+3361234567890123"}, "MSISDN"),
        ({"msisdn": "+15417543010"}, "no carrier serves"),
        ({"product_id": "no-such-product"}, "unknown product"),
        ({"currency": "USD"}, "currency mismatch"),
        ({"currency": "GBP", "amount_minor": 399}, "currency mismatch"),
        ({"amount_minor": 500}, "no monthly price point"),
        ({"period": Period.DAILY}, "no daily price point"),
        ({"carrier_id": "xx-nowhere"}, "unknown carrier"),
    ],
)
async def test_bad_requests_are_refused_and_write_nothing(
    client: SubscriptionClient, engine: Engine, overrides: dict[str, Any], message: str
) -> None:
    before = row_counts(engine)
    with pytest.raises(SubscriptionRequestError, match=message):
        await client.start_subscription(request(**overrides))
    assert row_counts(engine) == before


@pytest.mark.parametrize(
    "overrides",
    [{"amount_minor": -499}, {"amount_minor": 0}, {"currency": "eur"}, {"period": "hourly"},
     {"product_id": ""}],
)
def test_malformed_requests_are_refused_by_the_model(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        request(**overrides)


async def test_a_second_live_subscription_to_the_same_product_is_refused(
    client: SubscriptionClient, engine: Engine, fr_msisdn: str, temporal_env: WorkflowEnvironment,
) -> None:
    first = await client.start_subscription(request(msisdn=fr_msisdn))
    before = row_counts(engine)
    with pytest.raises(SubscriptionRequestError, match="already has a live subscription"):
        await client.start_subscription(request(msisdn=fr_msisdn))
    assert row_counts(engine) == before
    # a different product is fine, and so is the same one once the first has ended
    await client.cancel_subscription(first.subscription_id)
    again = await client.start_subscription(request(msisdn=fr_msisdn))
    assert again.subscription_id != first.subscription_id
    await client.cancel_subscription(again.subscription_id)


async def test_refund_returns_the_money_once(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, fr_msisdn: str,
) -> None:
    # a one-off purchase, so no later cycle falls due while time skips during the refund
    one_off = request(msisdn=fr_msisdn, product_id="gem-pack", amount_minor=299,
                      period=Period.ONE_OFF)
    started = await client.start_subscription(one_off)
    completed = await client.handle(started.subscription_id).result()
    assert (completed.status, completed.charges_succeeded) == ("completed", 1)

    refund = await client.refund(started.subscription_id, 1, "game did not load")
    assert (refund.outcome, refund.amount_minor, refund.currency) == ("succeeded", 299, "EUR")
    assert await simulator.balance("fr-azur", fr_msisdn) == Decimal("1000")
    books = await simulator.transactions("fr-azur", fr_msisdn)
    assert [t["kind"] for t in books] == ["charge", "refund"]
    assert books[1]["originalServerReferenceCode"] == books[0]["serverReferenceCode"]

    with pytest.raises(SubscriptionRequestError, match="already refunded"):
        await client.refund(started.subscription_id, 1)
    with pytest.raises(SubscriptionRequestError, match="no charge for cycle 2"):
        await client.refund(started.subscription_id, 2)
    with Session(engine) as session:
        kinds = [e.kind for e in session.exec(
            select(LedgerEntry).where(LedgerEntry.subscription_id == started.subscription_id))]
    assert sorted(kinds) == ["charge", "refund"]
    assert len(await simulator.transactions("fr-azur", fr_msisdn)) == 2


async def test_describe_reports_state_and_next_charge(
    client: SubscriptionClient, temporal_env: WorkflowEnvironment, fr_msisdn: str
) -> None:
    started = await client.start_subscription(request(msisdn=fr_msisdn))
    await temporal_env.sleep(timedelta(minutes=1))
    view = await client.describe_subscription(started.subscription_id)
    assert view.status == "active"
    assert (view.charges_succeeded, view.next_cycle, view.amount_charged_minor) == (1, 2, 499)
    assert view.next_charge_at is not None
    assert view.recent_cycles[0]["outcome"] == "succeeded"
    await client.cancel_subscription(started.subscription_id)
    view = await client.describe_subscription(started.subscription_id)
    assert (view.status, view.next_charge_at) == ("cancelled", None)
