"""Money safety against carriers that misbehave the way real ones do: each test names the
finding of the money-safety issue it covers. Time-skipping server, simulators on sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from carriers.loader import default_registry
from carriers.numbers import sample_msisdn
from models import operations
from models.tables import CarrierInteraction, CarrierOperation, OperationState, Period, Subscription
from settings import Settings
from starter import StartedSubscription, StartSubscriptionRequest, SubscriptionClient
from tests.conftest import Simulator
from tests.test_subscription_workflow import ledger_of, next_jan_31
from workflows import search_attributes as sa
from workflows.subscription import SubscriptionWorkflow
from workflows.types import BillingState, CycleResult, Plan, SubscriptionInput

REGISTRY = default_registry()
SETTLING_ATTEMPTS = 3


def few_settling_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    import workflows.settle

    monkeypatch.setattr(workflows.settle, "MAX_SETTLE_ATTEMPTS", SETTLING_ATTEMPTS)


async def subscribe(client: SubscriptionClient, carrier_id: str, seed: object,
                    first: datetime | None = None, period: Period | None = None,
                    ) -> tuple[str, StartedSubscription]:
    carrier = REGISTRY.carriers[carrier_id]
    msisdn = sample_msisdn(carrier, REGISTRY, random.Random(f"money-safety-{seed}"))
    price = next(p for p in carrier.price_points if period in (None, p.period))
    started = await client.start_subscription(StartSubscriptionRequest(
        msisdn=msisdn, product_id=price.product, period=price.period,
        amount_minor=REGISTRY.amount_minor(carrier_id, price),
        currency=REGISTRY.currency_of(carrier_id), first_charge_at=first))
    return msisdn, started


def operation(engine: Engine, key: str) -> CarrierOperation:
    with Session(engine) as session:
        found = operations.find(session, key)
        assert found is not None, key
        return found


def sent(engine: Engine, key: str, operation_name: str = "charge") -> int:
    """How many times the request itself (not a look-up) went to the carrier."""
    with Session(engine) as session:
        return len(session.exec(select(CarrierInteraction).where(
            CarrierInteraction.idempotency_key == key,
            CarrierInteraction.operation == operation_name)).all())


async def billing_issue(handle: WorkflowHandle[Any, Any]) -> str | None:
    return (await handle.describe()).typed_search_attributes.get(sa.BILLING_ISSUE)


async def until(env: WorkflowEnvironment, handle: WorkflowHandle[Any, Any], done: Any,
                step: timedelta = timedelta(minutes=10), rounds: int = 400) -> BillingState:
    """Moves time on (to the next charge first, then in steps) until ``done(state)``."""
    state: BillingState = await handle.query(SubscriptionWorkflow.state)
    ahead = state.next_charge_at - await env.get_current_time()
    if ahead > timedelta(0):
        await env.sleep(ahead)
    for _ in range(rounds):
        state = await handle.query(SubscriptionWorkflow.state)
        if done(state):
            return state
        await env.sleep(step)
    raise AssertionError(f"not reached: {state}")


def cycles(state: BillingState) -> list[tuple[int, str]]:
    return [(c.cycle, c.outcome) for c in state.recent_cycles]


# -- 1. a failed look-up is not an answer ----------------------------------------------------


async def test_a_lost_reply_at_a_carrier_without_lookup_is_unsettled_never_failed_or_resent(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding 1 (and 4, 5): mx-maya declares neither a look-up nor deduplication. Its reply
    to a debited charge is lost: the cycle is neither failed nor charged again; it is listed as
    unsettled, with the BillingIssue attribute, and the carrier debited exactly once."""
    few_settling_attempts(monkeypatch)
    first = await next_jan_31(temporal_env)
    msisdn, started = await subscribe(client, "mx-maya", 1, first, Period.MONTHLY)
    await simulator.fault("mx-maya", "reset_after_debit", msisdn)
    handle = client.handle(started.subscription_id)
    state = await until(temporal_env, handle, lambda s: s.recent_cycles,
                        step=timedelta(hours=2))
    key = f"{started.key_prefix}-c1-a0"
    assert cycles(state) == [(1, "unsettled")]
    assert (state.cycles_failed, state.charges_succeeded) == (0, 0)
    assert ledger_of(engine, started.subscription_id) == []
    assert len(await simulator.transactions("mx-maya", msisdn)) == 1
    assert sent(engine, key) == 1 and sent(engine, key, "status") == 0
    assert operation(engine, key).state == OperationState.UNSETTLED
    assert key in [o.idempotency_key for o in await client.unsettled("mx-maya")]
    assert await billing_issue(handle) == "unsettled"
    await client.cancel_subscription(started.subscription_id)


async def test_a_failed_lookup_is_asked_again_never_taken_as_the_answer(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """Finding 1: the reply is lost and the next two look-ups fail (HTTP 500): the cycle is
    not marked failed; the third look-up finds the one debit and the ledger takes it."""
    first = await next_jan_31(temporal_env)
    msisdn, started = await subscribe(client, "fr-azur", 2, first, Period.MONTHLY)
    await simulator.fault("fr-azur", "reset_after_debit", msisdn)
    await simulator.control("faults", {"carrier": "fr-azur", "kind": "lookup_error",
                                       "count": 2})
    handle = client.handle(started.subscription_id)
    state = await until(temporal_env, handle, lambda s: s.recent_cycles,
                        step=timedelta(minutes=1))
    key = f"{started.key_prefix}-c1-a0"
    assert cycles(state) == [(1, "succeeded")]
    books = await simulator.transactions("fr-azur", msisdn)
    assert len(books) == 1
    assert [e.carrier_reference for e in ledger_of(engine, started.subscription_id)] == [
        books[0]["serverReferenceCode"]]
    assert sent(engine, key) == 1 and sent(engine, key, "status") == 3
    await client.cancel_subscription(started.subscription_id)


# -- 2. callbacks are bound to their operation and carrier -----------------------------------


async def pending_charge(client: SubscriptionClient, simulator: Simulator, engine: Engine,
                         carrier_id: str, seed: object) -> tuple[str, StartedSubscription, str]:
    """A charge the carrier has taken but whose callback never comes."""
    carrier = REGISTRY.carriers[carrier_id]
    msisdn = sample_msisdn(carrier, REGISTRY, random.Random(f"money-safety-{seed}"))
    await simulator.fault(carrier_id, "no_callback", msisdn)
    price = next(p for p in carrier.price_points if p.period is Period.MONTHLY)
    started = await client.start_subscription(StartSubscriptionRequest(
        msisdn=msisdn, product_id=price.product, period=price.period,
        amount_minor=REGISTRY.amount_minor(carrier_id, price),
        currency=REGISTRY.currency_of(carrier_id)))
    key = f"{started.key_prefix}-c1-a0"
    for _ in range(200):
        with Session(engine) as session:
            found = operations.find(session, key)
            if found is not None and found.state == OperationState.PENDING:
                return msisdn, started, key
        await asyncio.sleep(0.05)
    raise AssertionError("the charge never became pending")


async def test_a_callback_signed_by_another_carrier_settles_nothing(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """Finding 2: fr-cote's valid callback credential cannot settle es-cobromovil's charge:
    the receiver refuses it, and the charge is settled by es-cobromovil's own look-up."""
    msisdn, started, key = await pending_charge(client, simulator, engine, "es-cobromovil", 3)
    answer = await simulator.control("callback", {
        "carrier": "es-cobromovil", "key": key, "outcome": "insufficient_funds",
        "sign_as": "fr-cote", "to": "fr-cote"})
    assert answer["status"] == 403, answer
    handle = client.handle(started.subscription_id)
    state = await until(temporal_env, handle, lambda s: s.recent_cycles,
                        step=timedelta(seconds=30))
    assert cycles(state) == [(1, "succeeded")]
    assert len(await simulator.transactions("es-cobromovil", msisdn)) == 1
    assert len(ledger_of(engine, started.subscription_id)) == 1
    assert operation(engine, key).reported_outcome is None  # never stored: not its carrier
    await client.cancel_subscription(started.subscription_id)


async def test_a_reported_failure_is_confirmed_by_lookup_before_a_new_retry_slot(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """Finding 2: a correctly signed "insufficient funds" for a charge that in fact debited
    would open retry slot a1 and debit twice. It is confirmed by look-up first: the look-up
    finds the debit, the cycle succeeds, slot a1 is never charged."""
    msisdn, started, key = await pending_charge(client, simulator, engine, "es-cobromovil", 4)
    answer = await simulator.control("callback", {
        "carrier": "es-cobromovil", "key": key, "outcome": "insufficient_funds"})
    assert answer["status"] == 200, answer
    handle = client.handle(started.subscription_id)
    state = await until(temporal_env, handle, lambda s: s.recent_cycles,
                        step=timedelta(seconds=5))
    assert cycles(state) == [(1, "succeeded")]
    assert state.insufficient_funds_retries == 0
    assert len(await simulator.transactions("es-cobromovil", msisdn)) == 1
    assert len(ledger_of(engine, started.subscription_id)) == 1
    assert sent(engine, f"{started.key_prefix}-c1-a1") == 0
    await client.cancel_subscription(started.subscription_id)


# -- 3. ambiguity is bounded; a cancel waits for no charge ------------------------------------


async def test_cancel_answers_while_a_charge_is_still_settling_and_the_charge_still_settles(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """Finding 3: the cancel update returns while the charge waits for its result; the
    charge is still settled afterwards (it may have debited), then the workflow ends."""
    msisdn, started, key = await pending_charge(client, simulator, engine, "fr-cote", 5)
    handle = client.handle(started.subscription_id)
    cancelled = await asyncio.wait_for(client.cancel_subscription(started.subscription_id),
                                       timeout=10)
    assert cancelled.status == "cancelled"
    assert operation(engine, key).state == OperationState.PENDING
    for _ in range(100):
        if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            break
        await temporal_env.sleep(timedelta(seconds=30))
    state = await handle.result()
    assert cycles(state) == [(1, "succeeded")]
    assert len(await simulator.transactions("fr-cote", msisdn)) == 1
    assert len(ledger_of(engine, started.subscription_id)) == 1
    with Session(engine) as session:
        row = session.get(Subscription, started.subscription_id)
        assert row is not None and row.status == "cancelled"


async def test_a_one_off_purchase_answers_a_cancel_that_arrives_while_charging(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
) -> None:
    """Finding 11: a one-off plan whose charge is in flight when a cancel update arrives
    answers the update (cancelled) before it returns; the charge itself completes."""
    carrier = REGISTRY.carriers["fr-azur"]
    msisdn = sample_msisdn(carrier, REGISTRY, random.Random("money-safety-6"))
    await simulator.fault("fr-azur", "latency", msisdn, delay_seconds=0.8)
    price = next(p for p in carrier.price_points if p.period is Period.ONE_OFF)
    started = await client.start_subscription(StartSubscriptionRequest(
        msisdn=msisdn, product_id=price.product, period=price.period,
        amount_minor=REGISTRY.amount_minor("fr-azur", price), currency="EUR"))
    await asyncio.sleep(0.3)
    cancelled = await asyncio.wait_for(client.cancel_subscription(started.subscription_id), 10)
    assert cancelled.status == "cancelled"
    state = await client.handle(started.subscription_id).result()
    assert cycles(state) == [(1, "succeeded")]
    assert len(ledger_of(engine, started.subscription_id)) == 1


# -- 5. what stays unsettled is visible and still takes a late result ------------------------


async def test_a_late_result_settles_an_unsettled_charge_and_clears_the_issue(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding 5: the look-ups keep failing until the charge is listed as unsettled; then the
    carrier's callback arrives late: the ledger takes it, the operation is settled, and the
    subscription's BillingIssue is cleared."""
    few_settling_attempts(monkeypatch)
    msisdn, started, key = await pending_charge(client, simulator, engine, "fr-cote", 7)
    await simulator.control("faults", {"carrier": "fr-cote", "kind": "lookup_error",
                                       "count": SETTLING_ATTEMPTS})
    handle = client.handle(started.subscription_id)
    state = await until(temporal_env, handle, lambda s: s.recent_cycles,
                        step=timedelta(hours=2))
    assert cycles(state) == [(1, "unsettled")]
    assert await billing_issue(handle) == "unsettled"
    answer = await simulator.control("callback", {"carrier": "fr-cote", "key": key,
                                                  "outcome": "success"})
    assert answer["status"] == 200, answer
    for _ in range(100):
        if operation(engine, key).state == OperationState.SETTLED:
            break
        await asyncio.sleep(0.1)
    settled = operation(engine, key)
    assert (settled.state, settled.outcome) == (OperationState.SETTLED, "succeeded")
    books = await simulator.transactions("fr-cote", msisdn)
    assert len(books) == 1
    assert [e.idempotency_key for e in ledger_of(engine, started.subscription_id)] == [key]
    for _ in range(50):
        if await billing_issue(handle) is None:
            break
        await asyncio.sleep(0.1)
    assert await billing_issue(handle) is None
    assert (await handle.query(SubscriptionWorkflow.state)).unsettled_keys == []
    await client.cancel_subscription(started.subscription_id)


# -- 6. credentials and configuration ---------------------------------------------------------


async def test_rotated_credentials_hold_charges_without_failing_the_subscriber(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, settings: Settings,
) -> None:
    """Finding 6: the carrier rotates our password: charges are refused (401) and wait,
    loudly (BillingIssue), without failing the cycle; once the credential is right again the
    same charge goes through, once."""
    first = await next_jan_31(temporal_env)
    msisdn, started = await subscribe(client, "de-rheinfunk", 8, first, Period.MONTHLY)
    carrier = REGISTRY.carriers["de-rheinfunk"]
    password = settings.carrier_secrets[carrier.auth.secret_ref].get_secret_value()
    await simulator.control("credentials", {"carrier": carrier.id, "password": "rotated"})
    handle = client.handle(started.subscription_id)
    try:
        await temporal_env.sleep(first + timedelta(minutes=20)
                                 - await temporal_env.get_current_time())
        state = await handle.query(SubscriptionWorkflow.state)
        assert state.recent_cycles == [] and state.cycles_failed == 0
        assert await billing_issue(handle) == "credentials_rejected"
        assert len(await simulator.transactions(carrier.id, msisdn)) == 0
    finally:
        await simulator.control("credentials", {"carrier": carrier.id, "password": password})
    state = await until(temporal_env, handle, lambda s: s.recent_cycles,
                        step=timedelta(minutes=10))
    assert cycles(state) == [(1, "succeeded")]
    assert len(await simulator.transactions(carrier.id, msisdn)) == 1
    assert await billing_issue(handle) is None
    await client.cancel_subscription(started.subscription_id)


async def test_a_configuration_error_is_not_retried_and_is_visible(
    client: SubscriptionClient, engine: Engine, temporal_env: WorkflowEnvironment,
    settings: Settings,
) -> None:
    """Finding 6: a carrier the worker does not know is our error, not the subscriber's and
    not the carrier's: the charge fails once, nothing is sent, and BillingIssue says so."""
    msisdn, started = await subscribe(client, "fr-azur", 9,
                                      datetime.now(UTC) + timedelta(days=3650))
    await client.cancel_subscription(started.subscription_id)
    with Session(engine) as session:
        row = session.get(Subscription, started.subscription_id)
        assert row is not None
    broken = SubscriptionInput(
        subscription_id=started.subscription_id, subscriber_id=row.subscriber_id,
        carrier_id="xx-nowhere", country_code="FR", product_id="game-pass",
        price_point_id=started.price_point_id,
        plan=Plan("monthly", 499, "EUR", []), key_prefix=f"{started.key_prefix}x")
    handle = await temporal_env.client.start_workflow(
        SubscriptionWorkflow.run, broken, id=f"config-error-{started.subscription_id}",
        task_queue=settings.task_queue)
    for _ in range(100):
        state = await handle.query(SubscriptionWorkflow.state)
        if state.recent_cycles:
            break
        await asyncio.sleep(0.05)
    assert cycles(state) == [(1, "error")]
    assert state.configuration_error and "xx-nowhere" in state.configuration_error
    assert await billing_issue(handle) == "configuration"
    assert sent(engine, f"{started.key_prefix}x-c1-a0") == 0
    await handle.signal(SubscriptionWorkflow.request_cancel)
    await handle.result()


# -- 9. a refund asked again after an unsettled refund is looked up, not resent --------------


async def test_a_refund_asked_again_after_it_was_left_unsettled_is_never_sent_again(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding 9: mx-maya (no look-up, no deduplication) loses the reply to a refund it made;
    the refund is left unsettled. Asking for the refund again does not send it again."""
    few_settling_attempts(monkeypatch)
    first = await next_jan_31(temporal_env)
    msisdn, started = await subscribe(client, "mx-maya", 10, first, Period.MONTHLY)
    handle = client.handle(started.subscription_id)
    await until(temporal_env, handle, lambda s: s.charges_succeeded == 1,
                step=timedelta(minutes=10))
    await simulator.fault("mx-maya", "reset_after_debit", msisdn)

    # (waiting for the refund's result lets the test server skip its timers)
    assert (await client.refund(started.subscription_id, 1)).outcome == "unsettled"
    assert (await client.refund(started.subscription_id, 1)).outcome == "unsettled"
    refunds = [t for t in await simulator.transactions("mx-maya", msisdn)
               if t["kind"] == "refund"]
    assert len(refunds) == 1
    refund_key = f"{started.key_prefix}-r1"
    assert sent(engine, refund_key, "refund") == 1
    assert operation(engine, refund_key).state == OperationState.UNSETTLED
    await client.cancel_subscription(started.subscription_id)


def test_cycle_results_keep_their_shape() -> None:
    # recorded histories carry CycleResult positionally: its fields only ever grow at the end
    assert [f for f in CycleResult.__dataclass_fields__][:6] == [
        "cycle", "due_at", "outcome", "attempts", "carrier_reference", "carrier_code"]
    # later fields carry defaults, so states recorded before them still decode
    added = list(CycleResult.__dataclass_fields__.values())[6:]
    assert added and all(f.default is not dataclasses.MISSING for f in added)


async def test_unsettled_listing_from_the_command_line(
    client: SubscriptionClient, engine: Engine,
) -> None:
    """Finding 5: `starter.py unsettled` reads the same list operators query."""
    listed = await client.unsettled()
    with Session(engine) as session:
        rows = session.exec(select(CarrierOperation).where(
            CarrierOperation.state == OperationState.UNSETTLED)).all()
    assert sorted(o.idempotency_key for o in listed) == sorted(r.idempotency_key for r in rows)
