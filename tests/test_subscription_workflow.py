"""SubscriptionWorkflow on the time-skipping server, charging the simulator over real sockets."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from carriers.loader import default_registry
from carriers.numbers import sample_msisdn
from models.tables import CarrierInteraction, LedgerEntry, Period, Subscription
from starter import StartedSubscription, StartSubscriptionRequest, SubscriptionClient
from tests.conftest import Simulator
from workflows.subscription import SubscriptionWorkflow
from workflows.types import BillingState

CARRIER = "fr-azur"


def monthly(msisdn: str, first: datetime, cycles_per_run: int = 24) -> StartSubscriptionRequest:
    return StartSubscriptionRequest(
        msisdn=msisdn, product_id="game-pass", amount_minor=499, currency="EUR",
        period=Period.MONTHLY, first_charge_at=first, cycles_per_run=cycles_per_run,
    )


async def subscribe_on(client: SubscriptionClient, simulator: Simulator, carrier_id: str,
                       seed: object, fault: str | None = None,
                       first_charge_at: datetime | None = None) -> tuple[str, StartedSubscription]:
    """A new subscriber on ``carrier_id`` (its first price point, a fault armed if given)."""
    registry = default_registry()
    carrier = registry.carriers[carrier_id]
    msisdn = sample_msisdn(carrier, registry, random.Random(str(seed)))
    if fault:
        await simulator.fault(carrier_id, fault, msisdn)
    price = carrier.price_points[0]
    started = await client.start_subscription(StartSubscriptionRequest(
        msisdn=msisdn, product_id=price.product, period=price.period,
        amount_minor=registry.amount_minor(carrier_id, price),
        currency=registry.currency_of(carrier_id), first_charge_at=first_charge_at))
    return msisdn, started


async def next_jan_31(env: WorkflowEnvironment) -> datetime:
    """31 January after the test server's clock, which earlier tests have moved on."""
    year = (await env.get_current_time()).year + 1
    return datetime(year, 1, 31, 9, 30, tzinfo=UTC)


def ledger_of(engine: Engine, subscription_id: int) -> list[LedgerEntry]:
    with Session(engine) as session:
        return list(session.exec(
            select(LedgerEntry).where(LedgerEntry.subscription_id == subscription_id)
            .order_by(LedgerEntry.cycle)  # type: ignore[arg-type]
        ))


async def test_monthly_subscription_bills_each_calendar_month_for_a_year(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, fr_msisdn: str,
) -> None:
    first = await next_jan_31(temporal_env)
    started = await client.start_subscription(monthly(fr_msisdn, first))
    handle = client.handle(started.subscription_id)

    # sleep past the 12th due date (31 Dec) but before the 13th (31 Jan)
    await temporal_env.sleep(first + timedelta(days=345) - await temporal_env.get_current_time())
    state = await handle.query(SubscriptionWorkflow.state)
    assert state.charges_succeeded == 12
    assert state.next_cycle == 13

    entries = ledger_of(engine, started.subscription_id)
    year = first.year
    expected_days = [31, 28 + (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)),
                     31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    assert [(e.due_at.year, e.due_at.month, e.due_at.day) for e in entries] == [
        (year, month, day) for month, day in zip(range(1, 13), expected_days, strict=True)
    ]
    assert all(e.amount_minor == 499 and e.currency == "EUR" for e in entries)

    books = await simulator.transactions(CARRIER, fr_msisdn)
    assert len(books) == 12
    assert sum(Decimal(t["amount"]) for t in books) == Decimal("59.88")
    assert sum(e.amount_minor for e in entries) == 5988
    assert {t["serverReferenceCode"] for t in books} == {e.carrier_reference for e in entries}
    assert await simulator.balance(CARRIER, fr_msisdn) == Decimal("1000") - Decimal("59.88")
    await client.cancel_subscription(started.subscription_id)


async def test_cancel_mid_year_stops_all_future_billing(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, fr_msisdn: str,
) -> None:
    first = await next_jan_31(temporal_env)
    started = await client.start_subscription(monthly(fr_msisdn, first))
    await temporal_env.sleep(first + timedelta(days=100) - await temporal_env.get_current_time())

    state = await client.cancel_subscription(started.subscription_id)
    assert state.status == "cancelled"
    assert state.charges_succeeded == 4  # Jan, Feb, Mar, Apr

    await temporal_env.sleep(timedelta(days=400))
    result = await client.handle(started.subscription_id).result()
    assert result.charges_succeeded == 4
    assert len(ledger_of(engine, started.subscription_id)) == 4
    assert len(await simulator.transactions(CARRIER, fr_msisdn)) == 4
    with Session(engine) as session:
        row = session.get(Subscription, started.subscription_id)
        assert row is not None and row.status == "cancelled" and row.ended_at is not None


async def test_insufficient_funds_retries_on_schedule_then_fails_the_cycle(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, fr_msisdn: str,
) -> None:
    await simulator.set_balance(CARRIER, fr_msisdn, "1.00")
    first = await next_jan_31(temporal_env)
    started = await client.start_subscription(monthly(fr_msisdn, first))
    handle = client.handle(started.subscription_id)
    # fr-azur monthly: retries 1 h, 6 h and 24 h after each failed attempt
    await temporal_env.sleep(first + timedelta(days=3) - await temporal_env.get_current_time())

    state = await handle.query(SubscriptionWorkflow.state)
    assert state.charges_succeeded == 0
    assert state.cycles_failed == 1
    assert state.insufficient_funds_retries == 3
    assert state.status == "active"
    failed = state.recent_cycles[0]
    assert (failed.cycle, failed.outcome, failed.attempts, failed.carrier_code) == (
        1, "failed", 4, "POL1000")

    timers = [
        event.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
        async for event in handle.fetch_history_events()
        if event.event_type == EventType.EVENT_TYPE_TIMER_STARTED
    ]
    # the first timer waits for the due date; the next three are the retry schedule
    assert timers[1:4] == [timedelta(hours=1), timedelta(hours=6), timedelta(days=1)]

    with Session(engine) as session:
        keys = [row.idempotency_key for row in session.exec(
            select(CarrierInteraction).where(
                CarrierInteraction.idempotency_key.startswith(
                    f"{started.key_prefix}-c1-"))
            .order_by(CarrierInteraction.id)  # type: ignore[arg-type]
        )]
    assert keys == [f"{started.key_prefix}-c1-a{slot}" for slot in range(4)]
    assert ledger_of(engine, started.subscription_id) == []
    assert await simulator.transactions(CARRIER, fr_msisdn) == []

    # funds arrive: the next cycle charges normally
    await simulator.set_balance(CARRIER, fr_msisdn, "10.00")
    await temporal_env.sleep(timedelta(days=30))
    state = await handle.query(SubscriptionWorkflow.state)
    assert state.charges_succeeded == 1
    await client.cancel_subscription(started.subscription_id)


@pytest.mark.parametrize("fault", ["reset_after_debit", "timeout_after_debit"])
async def test_activity_failing_after_the_carrier_debited_never_debits_twice(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, fr_msisdn: str, fault: str,
) -> None:
    # the carrier debits, then drops the connection or answers after our 1 s timeout
    await simulator.fault(CARRIER, fault, msisdn=fr_msisdn, delay_seconds=1.5)
    first = await next_jan_31(temporal_env)
    started = await client.start_subscription(monthly(fr_msisdn, first))
    handle = client.handle(started.subscription_id)
    await temporal_env.sleep(first + timedelta(days=1) - await temporal_env.get_current_time())

    state = await handle.query(SubscriptionWorkflow.state)
    assert state.charges_succeeded == 1
    books = await simulator.transactions(CARRIER, fr_msisdn)
    assert len(books) == 1
    assert books[0]["clientCorrelator"] == f"{started.key_prefix}-c1-a0"
    assert await simulator.balance(CARRIER, fr_msisdn) == Decimal("995.01")
    entries = ledger_of(engine, started.subscription_id)
    assert [e.carrier_reference for e in entries] == [books[0]["serverReferenceCode"]]

    with Session(engine) as session:
        outcomes = [row.outcome for row in session.exec(
            select(CarrierInteraction).where(
                CarrierInteraction.idempotency_key == f"{started.key_prefix}-c1-a0")
            .order_by(CarrierInteraction.id)  # type: ignore[arg-type]
        )]
    # the retry repeated the same clientCorrelator and the carrier replayed its transaction
    assert outcomes == ["unknown", "succeeded"]
    await client.cancel_subscription(started.subscription_id)


async def test_continue_as_new_carries_the_state_over_exactly(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, fr_msisdn: str,
) -> None:
    first = await next_jan_31(temporal_env)
    started = await client.start_subscription(monthly(fr_msisdn, first, cycles_per_run=2))
    handle = client.handle(started.subscription_id)
    # five charges (Jan..May) means two continue-as-new hand-overs
    await temporal_env.sleep(first + timedelta(days=125) - await temporal_env.get_current_time())

    state = await handle.query(SubscriptionWorkflow.state)
    assert state.runs == 3
    assert state.charges_succeeded == 5
    assert state.amount_charged_minor == 5 * 499
    assert state.next_cycle == 6
    assert state.anchor == first
    assert state.next_charge_at == datetime(first.year, 6, 30, 9, 30, tzinfo=UTC)
    assert [c.cycle for c in state.recent_cycles] == [1, 2, 3, 4, 5]

    description = await handle.describe()
    assert description.run_id != started_run_id(description)
    assert len(ledger_of(engine, started.subscription_id)) == 5
    assert len(await simulator.transactions(CARRIER, fr_msisdn)) == 5
    await client.cancel_subscription(started.subscription_id)


def started_run_id(description: object) -> str:
    raw = description.raw_description  # type: ignore[attr-defined]
    return str(raw.workflow_execution_info.first_run_id)


async def test_pending_charges_are_settled_by_polling_on_durable_timers(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    first = await next_jan_31(temporal_env)
    msisdn, started = await subscribe_on(client, simulator, "it-pagamobile", 3,
                                         first_charge_at=first)
    handle = client.handle(started.subscription_id)
    await temporal_env.sleep(first + timedelta(days=40) - await temporal_env.get_current_time())

    state = await handle.query(SubscriptionWorkflow.state)
    assert state.charges_succeeded == 2
    books = await simulator.transactions("it-pagamobile", msisdn)
    entries = ledger_of(engine, started.subscription_id)
    assert len(books) == 2
    assert [e.carrier_reference for e in entries] == [t["serverReferenceCode"] for t in books]
    assert any("by status look-up" in s for s in await activity_summaries(handle))
    await client.cancel_subscription(started.subscription_id)


async def activity_summaries(handle: object) -> list[str]:
    return [
        event.user_metadata.summary.data.decode()
        async for event in handle.fetch_history_events()  # type: ignore[attr-defined]
        # (a charge attempt runs as a local activity first: its marker carries the summary)
        if event.event_type in (EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
                                EventType.EVENT_TYPE_MARKER_RECORDED)
        and event.user_metadata.HasField("summary")
    ]


@pytest.mark.parametrize(("fault", "settled_by"), [
    ("duplicate_callback", "by reported result"),
    ("no_callback", "by status look-up"),
])
async def test_callback_carrier_charges_settle_once_whatever_the_callbacks_do(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, fault: str, settled_by: str,
) -> None:
    carrier = default_registry().carriers["es-cobromovil"]
    msisdn, started = await subscribe_on(client, simulator, carrier.id, fault, fault)
    handle = client.handle(started.subscription_id)
    # the charge is acknowledged at once; its result comes by callback, or not at all
    for _ in range(100):
        state = await handle.query(SubscriptionWorkflow.state)
        if state.charges_succeeded:
            break
        await asyncio.sleep(0.05)
        if fault == "no_callback":
            await temporal_env.sleep(timedelta(seconds=10))
    assert state.charges_succeeded == 1
    assert len(await simulator.transactions(carrier.id, msisdn)) == 1
    assert len(ledger_of(engine, started.subscription_id)) == 1
    summaries = await activity_summaries(handle)
    assert any(settled_by in s for s in summaries)
    if fault == "duplicate_callback":  # the second copy changed nothing
        assert sum(settled_by in s for s in summaries) == 1
    else:
        assert not any("by reported result" in s for s in summaries)
    await client.cancel_subscription(started.subscription_id)


async def test_premium_sms_charges_are_decided_by_delivery_receipts(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """SMPP: the first receipt says REJECTD with the SMSC's out-of-credit code, so the cycle is
    retried on schedule; the retry's receipt says DELIVRD and the ledger takes the charge."""
    carrier = default_registry().carriers["pl-wisla"]
    msisdn, started = await subscribe_on(client, simulator, carrier.id, 77, "insufficient_funds")
    handle = client.handle(started.subscription_id)

    async def wait_for(condition: Callable[[BillingState], bool]) -> BillingState:
        for _ in range(100):
            state = await handle.query(SubscriptionWorkflow.state)
            if condition(state):
                return state
            await asyncio.sleep(0.05)
        raise AssertionError(f"never reached: {state}")

    state = await wait_for(lambda s: s.status == "past_due")
    assert state.charges_succeeded == 0
    await temporal_env.sleep(timedelta(hours=1, minutes=1))  # the first retry is due after 1 h
    state = await wait_for(lambda s: s.charges_succeeded == 1)
    assert (state.insufficient_funds_retries, state.recent_cycles[-1].attempts) == (1, 2)

    books = await simulator.transactions(carrier.id, msisdn)
    entries = ledger_of(engine, started.subscription_id)
    assert [t["amount"] for t in books] == ["6.15"]
    assert [(e.amount_minor, e.currency) for e in entries] == [(615, "PLN")]
    with Session(engine) as session:
        receipts = session.exec(select(CarrierInteraction).where(
            CarrierInteraction.carrier_id == carrier.id,
            CarrierInteraction.operation == "receipt",
            CarrierInteraction.idempotency_key.startswith(
                f"{started.key_prefix}-c1-"))).all()
    assert sorted(r.outcome for r in receipts) == ["insufficient_funds (relayed)",
                                                   "succeeded (relayed)"]
    assert all(msisdn[3:] not in r.request_body for r in receipts)
    await client.cancel_subscription(started.subscription_id)


async def test_a_charge_the_carrier_never_settles_is_left_to_reconciliation(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No receipt ever comes and every query_sm fails: after the settle attempts run out the
    cycle is 'unsettled' (not failed, not retried, nothing in the ledger) and billing goes on."""
    import workflows.settle

    monkeypatch.setattr(workflows.settle, "MAX_SETTLE_ATTEMPTS", 3)
    carrier = default_registry().carriers["ke-safari"]
    await simulator.control("faults", {"carrier": carrier.id, "kind": "lookup_error",
                                       "count": 3})
    msisdn, started = await subscribe_on(client, simulator, carrier.id, 99, "no_callback")
    handle = client.handle(started.subscription_id)
    for _ in range(100):  # the submission is accepted; its receipt never comes
        if (await handle.query(SubscriptionWorkflow.state)).recent_cycles:
            break
        await temporal_env.sleep(timedelta(minutes=10))
    state = await handle.query(SubscriptionWorkflow.state)
    assert [(c.cycle, c.outcome) for c in state.recent_cycles] == [(1, "unsettled")]
    assert (state.charges_succeeded, state.cycles_failed, state.status) == (0, 0, "active")
    assert ledger_of(engine, started.subscription_id) == []
    assert len(await simulator.transactions(carrier.id, msisdn)) == 1  # debited, once
    await client.cancel_subscription(started.subscription_id)
