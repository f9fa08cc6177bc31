"""Adversarial review of the ruled billing flows (``workflows/ruled_cycle.py``,
``workflows/subscription.py``): each test is one attack on a money path, on the time-skipping
server against the simulators and the game backend over real sockets, and asserts the safe
outcome (no double charge, no lost refund, no charge without delivery, no delivery without
payment, nothing over a cap, bad input refused with nothing written, our ledger equal to the
carrier's books). Ten of these attacks once succeeded (partial refund then compensation,
colliding refund ids, opt-in codes guessed in one batch, retries through a pause, a status
overwritten, a late success never delivered, a revoke given up, a failed balance look-up, the
monthly cap raced on SQLite, a two-part cycle half refundable); each is fixed and stays here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from activities import billing as billing_module
from activities.billing import BillingActivities
from carriers.loader import Registry, carrier_task_queue, default_registry
from models.tables import (
    CarrierInteraction,
    CarrierOperation,
    LedgerKind,
    OperationState,
    Subscription,
)
from rules.spend import spend_so_far
from rules.types import Caps, SpendSoFar
from settings import Settings
from starter import SubscriptionClient, SubscriptionRequestError
from tests.conftest import GameBackendServer, Simulator
from tests.workflow_helpers import (
    assert_books_match,
    ledger_of,
    net_minor,
    new_msisdn,
    next_weekday,
    ruled_client,
    rules_with,
    subscribe_to,
    until,
)
from workflows.refund import RefundWorkflow, refund_workflow_id
from workflows.subscription import SubscriptionWorkflow
from workflows.types import BillingState, RefundRequestInput

# -- helpers ------------------------------------------------------------------------------------






def short_settling(carrier_id: str, deadline_seconds: float) -> Registry:
    """The shipped registry with one carrier's settling deadline shortened (carrier data), so a
    charge with no final answer is left unsettled within minutes of workflow time."""
    registry = default_registry()
    carrier = registry.carriers[carrier_id].model_copy(
        update={"settle_deadline_seconds": deadline_seconds})
    return registry.model_copy(update={"carriers": {**registry.carriers, carrier_id: carrier}})


@pytest.fixture
def no_opt_in(temporal_env: WorkflowEnvironment, engine: Engine, settings: Settings,
              worker: Any) -> Iterator[SubscriptionClient]:
    yield ruled_client(temporal_env, engine, settings, rules_with(opt_in="none"))


@pytest.fixture
def with_pin(temporal_env: WorkflowEnvironment, engine: Engine, settings: Settings,
             worker: Any) -> Iterator[SubscriptionClient]:
    yield ruled_client(temporal_env, engine, settings, rules_with(
        opt_in="sms_pin", pin_digits=4, opt_in_deadline_seconds=600))


@pytest.fixture(autouse=True)
async def no_faults_left(simulator: Simulator, game_backend: GameBackendServer
                         ) -> Any:
    """Faults a test injected and did not use up never reach the next test."""
    yield
    simulator.core.faults.clear()
    simulator.core.unavailable_until.clear()
    await game_backend.control("faults", {"kind": "clear"})




def operations_of(engine: Engine, subscription_id: int,
                  kind: LedgerKind | None = None) -> list[CarrierOperation]:
    with Session(engine) as session:
        query = select(CarrierOperation).where(
            CarrierOperation.subscription_id == subscription_id)
        if kind is not None:
            query = query.where(CarrierOperation.kind == kind)
        return list(session.exec(query.order_by(col(CarrierOperation.id))))


def subscriber_ref(engine: Engine, settings: Settings, subscription_id: int) -> str:
    with Session(engine) as session:
        subscription = session.get(Subscription, subscription_id)
        assert subscription is not None
        return f"{settings.deployment_id}-{subscription.subscriber_id}"


async def grants_of(game_backend: GameBackendServer, key_prefix: str) -> list[dict[str, Any]]:
    books = await game_backend.control("books")
    return [g for g in books["entitlements"] if g["grant_id"].startswith(key_prefix)]


async def grant_requests(game_backend: GameBackendServer, grant_id: str) -> int:
    books = await game_backend.control("books")
    return int(books["grant_requests"].get(grant_id, 0))


async def state_of(client: SubscriptionClient, subscription_id: int) -> BillingState:
    return await client.handle(subscription_id).query(SubscriptionWorkflow.state)


async def carrier_debits(simulator: Simulator, carrier_id: str, msisdn: str) -> list[str]:
    return [t["kind"] for t in await simulator.transactions(carrier_id, msisdn)]


async def finish(client: SubscriptionClient, subscription_id: int) -> None:
    """Cancels the subscription if its workflow still runs."""
    described = await client.handle(subscription_id).describe()
    if described.status == WorkflowExecutionStatus.RUNNING:
        await client.cancel_subscription(subscription_id)


async def sent_pin(client: SubscriptionClient, subscription_id: int) -> str:
    """The code the workflow texted (read from its history, as the subscriber's phone would)."""
    async for event in client.handle(subscription_id).fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes"):
            scheduled = event.activity_task_scheduled_event_attributes
            if scheduled.activity_type.name != "send_notice":
                continue
            notice = json.loads(scheduled.input.payloads[0].data)
            if notice["kind"] == "opt_in_pin":
                return str(notice["params"]["pin"])
    raise AssertionError("no opt-in code was sent")


async def pending_opt_in(env: WorkflowEnvironment, client: SubscriptionClient,
                         subscription_id: int) -> BillingState:
    for _ in range(50):
        state = await state_of(client, subscription_id)
        if state.status == "pending_opt_in" and state.opt_in_deadline is not None:
            return state
        await env.sleep(timedelta(seconds=1))
    raise AssertionError("the opt-in never started")


# -- refunds ------------------------------------------------------------------------------------


async def test_two_refund_requests_racing_for_one_cycle_refund_it_once(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """Two services ask at the same moment, each with its own request id, for a refund of the
    same cycle: at most one refund may reach the carrier."""
    carrier_id = "pt-tejo-movel"
    msisdn = new_msisdn(carrier_id, "attack-refund-race")
    due = await next_weekday(temporal_env, "Europe/Lisbon", 11)
    started = await subscribe_to(no_opt_in, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    await until(temporal_env, no_opt_in.handle(sid), lambda s: s.deliveries == 1,
                step=timedelta(minutes=10), rounds=48)
    answers = await asyncio.gather(
        no_opt_in.request_refund(sid, 1, request_id="desk-a"),
        no_opt_in.request_refund(sid, 1, request_id="desk-b"),
        no_opt_in.request_refund(sid, 1, amount_minor=100, request_id="desk-c"),
        return_exceptions=True)
    succeeded = [a for a in answers if not isinstance(a, BaseException)
                 and a.outcome == "succeeded"]
    refused = [a for a in answers if isinstance(a, SubscriptionRequestError)]
    assert len(succeeded) == 1 and len(refused) == 2, answers
    refunds = [e for e in ledger_of(engine, sid) if e.kind == LedgerKind.REFUND]
    assert len(refunds) == 1
    state = await state_of(no_opt_in, sid)
    assert state.refunded_minor == refunds[0].amount_minor
    await finish(no_opt_in, sid)
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])


async def test_a_refund_above_a_partial_ladder_charge_is_refused_and_nothing_is_written(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """mx-maya charged half the price (44.50 of 89.00, the ladder): a refund of the full price,
    or of a cent more than was charged, must be refused by the workflow with nothing sent."""
    carrier_id = "mx-maya"
    msisdn = new_msisdn(carrier_id, "attack-ladder-refund")
    await simulator.set_balance(carrier_id, msisdn, "50.00")
    due = await next_weekday(temporal_env, "America/Mexico_City", 12)
    started = await subscribe_to(no_opt_in, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    state = await until(temporal_env, no_opt_in.handle(sid), lambda s: s.deliveries == 1,
                        step=timedelta(hours=1), rounds=48)
    assert state.recent_cycles[-1].amount_minor == 4450
    for amount in (8900, 4451):
        with pytest.raises(SubscriptionRequestError, match="between 0 and the 4450"):
            await no_opt_in.request_refund(sid, 1, amount_minor=amount,
                                           request_id=f"too-much-{amount}")
    assert operations_of(engine, sid, LedgerKind.REFUND) == []
    record = await no_opt_in.request_refund(sid, 1, request_id="all-of-it")
    assert (record.outcome, record.amount_minor) == ("succeeded", 4450)
    assert net_minor(ledger_of(engine, sid)) == 0
    await finish(no_opt_in, sid)
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])


async def test_a_partial_refund_then_a_failed_delivery_returns_the_whole_charge(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, game_backend: GameBackendServer, settings: Settings,
) -> None:
    carrier_id = "es-iberica"
    msisdn = new_msisdn(carrier_id, "attack-partial-then-compensation")
    due = await next_weekday(temporal_env, "Europe/Madrid", 12)
    started = await subscribe_to(no_opt_in, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    # the game backend is down for this subscriber past the delivery deadline (1 h)
    await game_backend.control("faults", {
        "kind": "unavailable", "operation": "grant", "count": 10_000,
        "subscriber_ref": subscriber_ref(engine, settings, sid)})
    handle = no_opt_in.handle(sid)
    await until(temporal_env, handle, lambda s: s.charges_succeeded == 1,
                step=timedelta(minutes=5), rounds=48)
    record = await no_opt_in.request_refund(sid, 1, amount_minor=200, request_id="goodwill")
    assert record.outcome == "succeeded"
    state = await until(temporal_env, handle, lambda s: s.delivery_failures == 1
                        and s.recent_cycles[-1].delivery is not None,
                        step=timedelta(minutes=10), rounds=30)
    entries = ledger_of(engine, sid)
    await finish(no_opt_in, sid)
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])
    assert await grants_of(game_backend, started.key_prefix) == []
    # nothing was delivered: everything paid is back, and the state says what moved
    assert net_minor(entries) == 0, [(e.kind, e.amount_minor) for e in entries]
    assert state.refunded_minor == sum(e.amount_minor for e in entries
                                       if e.kind == LedgerKind.REFUND)


async def test_a_refund_of_a_cycle_whose_charge_is_unsettled_is_refused(
    temporal_env: WorkflowEnvironment, engine: Engine, settings: Settings, worker: Any,
    simulator: Simulator,
) -> None:
    """The carrier took the charge but neither answered nor shows it to look-ups; the charge
    is left unsettled. A refund request for that cycle must be refused before anything is sent
    (nothing is known to have been charged)."""
    carrier_id = "it-tirreno"
    client = ruled_client(temporal_env, engine, settings, rules_with(opt_in="none"),
                          short_settling(carrier_id, 60))
    msisdn = new_msisdn(carrier_id, "attack-refund-unsettled")
    await simulator.fault(carrier_id, "timeout_after_debit", msisdn, delay_seconds=2)
    await simulator.fault(carrier_id, "lookup_error", count=20)
    due = await next_weekday(temporal_env, "Europe/Rome", 11)
    started = await subscribe_to(client, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    state = await until(temporal_env, client.handle(sid), lambda s: bool(s.recent_cycles),
                        step=timedelta(minutes=1), rounds=60)
    assert state.recent_cycles[-1].outcome == "unsettled"
    with pytest.raises(SubscriptionRequestError, match="has no charge"):
        await client.request_refund(sid, 1, request_id="too-early")
    assert operations_of(engine, sid, LedgerKind.REFUND) == []
    assert await carrier_debits(simulator, carrier_id, msisdn) == ["charge"]
    await finish(client, sid)


async def test_a_refund_racing_the_delivery_compensation_never_fails_the_subscription(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, game_backend: GameBackendServer, settings: Settings,
) -> None:
    carrier_id = "jp-sakura"
    msisdn = new_msisdn(carrier_id, "attack-refund-vs-compensation")
    due = await next_weekday(temporal_env, "Asia/Tokyo", 12)
    started = await subscribe_to(no_opt_in, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    await game_backend.control("faults", {
        "kind": "unavailable", "operation": "grant", "count": 10_000,
        "subscriber_ref": subscriber_ref(engine, settings, sid)})
    handle = no_opt_in.handle(sid)
    await until(temporal_env, handle, lambda s: s.charges_succeeded == 1,
                step=timedelta(minutes=5), rounds=48)
    # an operator refunds the cycle while the delivery is still being retried; the refund's
    # answer is lost and look-ups fail for a while, so its workflow keeps settling
    await simulator.fault(carrier_id, "timeout_after_debit", msisdn, delay_seconds=2)
    await simulator.fault(carrier_id, "lookup_error", count=12)
    carrier = no_opt_in.registry.carriers[carrier_id]
    _, key = no_opt_in._check_refundable(sid, 1)
    await temporal_env.client.start_workflow(
        RefundWorkflow.run,
        RefundRequestInput(sid, 1, "operator refund", carrier.settle_delays(), carrier_id, key,
                           carrier.settle_deadline_seconds,
                           carrier_task_queue(settings.task_queue, carrier)),
        id=refund_workflow_id(sid, 1), task_queue=settings.task_queue)
    failed = False
    for _ in range(9):  # past the delivery deadline (1 h)
        await temporal_env.sleep(timedelta(minutes=10))
        if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            failed = True
            break
    simulator.core.faults.clear()
    refund = temporal_env.client.get_workflow_handle(refund_workflow_id(sid, 1))
    for _ in range(12):
        if (await refund.describe()).status != WorkflowExecutionStatus.RUNNING:
            break
        await temporal_env.sleep(timedelta(minutes=10))
    entries = ledger_of(engine, sid)
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])
    assert net_minor(entries) == 0, [(e.kind, e.amount_minor) for e in entries]
    assert await grants_of(game_backend, started.key_prefix) == []
    assert not failed, (await handle.describe()).status
    state = await state_of(no_opt_in, sid)
    assert state.delivery_failures == 1
    await finish(no_opt_in, sid)


# -- opt-in -------------------------------------------------------------------------------------


async def test_a_burst_of_codes_is_checked_at_most_three_times(
    with_pin: SubscriptionClient, engine: Engine, temporal_env: WorkflowEnvironment,
) -> None:
    carrier_id = "de-rheinfunk"
    msisdn = new_msisdn(carrier_id, "attack-pin-burst")
    started = await subscribe_to(with_pin, f"{carrier_id}-pass-monthly", msisdn)
    sid = started.subscription_id
    await pending_opt_in(temporal_env, with_pin, sid)
    pin = await sent_pin(with_pin, sid)
    guesses = [f"{n:04d}" for n in range(40) if f"{n:04d}" != pin][:30]
    answers = await asyncio.gather(*(with_pin.confirm_opt_in(sid, g) for g in guesses),
                                   return_exceptions=True)
    checked = [a for a in answers if isinstance(a, SubscriptionRequestError)
               and "does not match" in str(a)]
    state = await state_of(with_pin, sid)
    await finish(with_pin, sid)
    assert state.opt_in_failures <= 3 and len(checked) <= 3, (state.opt_in_failures,
                                                               len(checked))


async def test_three_wrong_codes_end_the_opt_in_and_the_right_one_then_charges_nothing(
    with_pin: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    carrier_id = "de-nordnetz"
    msisdn = new_msisdn(carrier_id, "attack-pin-three")
    started = await subscribe_to(with_pin, f"{carrier_id}-pass-monthly", msisdn)
    sid = started.subscription_id
    await pending_opt_in(temporal_env, with_pin, sid)
    pin = await sent_pin(with_pin, sid)
    wrong = "0000" if pin != "0000" else "1111"
    for _ in range(3):
        with pytest.raises(SubscriptionRequestError, match="does not match"):
            await with_pin.confirm_opt_in(sid, wrong)
    with pytest.raises(SubscriptionRequestError):
        await with_pin.confirm_opt_in(sid, pin)
    await temporal_env.sleep(timedelta(days=40))
    result = await with_pin.handle(sid).result()
    assert result.status == "opt_in_expired" and not result.opted_in
    assert operations_of(engine, sid) == [] and ledger_of(engine, sid) == []
    assert await carrier_debits(simulator, carrier_id, msisdn) == []


async def test_a_code_after_the_deadline_is_refused_and_nothing_is_charged(
    with_pin: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    carrier_id = "fr-azur"
    msisdn = new_msisdn(carrier_id, "attack-pin-late")
    started = await subscribe_to(with_pin, f"{carrier_id}-pass-monthly", msisdn)
    sid = started.subscription_id
    await pending_opt_in(temporal_env, with_pin, sid)
    pin = await sent_pin(with_pin, sid)
    await temporal_env.sleep(timedelta(minutes=11))
    with pytest.raises(SubscriptionRequestError):
        await with_pin.confirm_opt_in(sid, pin)
    result = await with_pin.handle(sid).result()
    assert result.status == "opt_in_expired"
    assert operations_of(engine, sid) == []
    assert await carrier_debits(simulator, carrier_id, msisdn) == []


async def test_a_cancel_during_the_opt_in_wait_charges_nothing_and_refuses_the_code(
    with_pin: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    carrier_id = "gb-thames"
    msisdn = new_msisdn(carrier_id, "attack-pin-cancel")
    started = await subscribe_to(with_pin, f"{carrier_id}-pass-monthly", msisdn)
    sid = started.subscription_id
    await pending_opt_in(temporal_env, with_pin, sid)
    pin = await sent_pin(with_pin, sid)
    cancelled = await with_pin.cancel_subscription(sid)
    assert cancelled.status == "cancelled"
    with pytest.raises(SubscriptionRequestError):
        await with_pin.confirm_opt_in(sid, pin)
    await temporal_env.sleep(timedelta(days=40))
    described = await with_pin.handle(sid).describe()
    assert described.status == WorkflowExecutionStatus.COMPLETED
    assert operations_of(engine, sid) == []
    assert await carrier_debits(simulator, carrier_id, msisdn) == []


# -- a charge under way: pause, cancel, resume, plan change ---------------------------------------


async def wait_for_operation(engine: Engine, subscription_id: int, state: OperationState,
                             seconds: float = 10.0) -> CarrierOperation:
    """Waits (wall time) until the subscription's latest charge is in ``state``."""
    for _ in range(int(seconds * 10)):
        charges = operations_of(engine, subscription_id, LedgerKind.CHARGE)
        if charges and charges[-1].state == state:
            return charges[-1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no charge reached {state}: {operations_of(engine, subscription_id)}")


async def charge_pending_at_the_carrier(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    env: WorkflowEnvironment, carrier_id: str, zone: str, hour: int, seed: str,
) -> tuple[int, str]:
    """A subscription whose first charge the carrier took but whose answer was lost (our call
    timed out): the charge is pending, settled by look-up on the next timer."""
    msisdn = new_msisdn(carrier_id, seed)
    await simulator.fault(carrier_id, "timeout_after_debit", msisdn, delay_seconds=2)
    due = await next_weekday(env, zone, hour)
    started = await subscribe_to(client, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    await env.sleep(due - await env.get_current_time())
    await wait_for_operation(engine, started.subscription_id, OperationState.PENDING)
    return started.subscription_id, msisdn


async def test_a_pause_while_a_charge_is_pending_settles_it_once_never_resends_or_drops_it(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    carrier_id = "de-rheinfunk"
    sid, msisdn = await charge_pending_at_the_carrier(
        no_opt_in, simulator, engine, temporal_env, carrier_id, "Europe/Berlin", 12,
        "attack-pause-pending")
    paused = await no_opt_in.pause(sid)
    assert paused.paused
    state = await until(temporal_env, no_opt_in.handle(sid),
                        lambda s: s.charges_succeeded == 1 and s.deliveries == 1,
                        step=timedelta(minutes=1), rounds=30)
    [charge] = operations_of(engine, sid, LedgerKind.CHARGE)
    assert (charge.state, charge.sends) == (OperationState.SETTLED, 1)
    assert await carrier_debits(simulator, carrier_id, msisdn) == ["charge"]
    assert [e.kind for e in ledger_of(engine, sid)] == [LedgerKind.CHARGE]
    # and nothing more while paused
    await temporal_env.sleep(timedelta(days=45))
    assert (await state_of(no_opt_in, sid)).charges_succeeded == 1
    assert state.paused
    await finish(no_opt_in, sid)
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])


async def test_a_pause_while_a_charge_is_pending_still_reads_paused_afterwards(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    sid, _ = await charge_pending_at_the_carrier(
        no_opt_in, simulator, engine, temporal_env, "fr-lumiere", "Europe/Paris", 12,
        "attack-pause-pending-status")
    await no_opt_in.pause(sid)
    state = await until(temporal_env, no_opt_in.handle(sid),
                        lambda s: s.charges_succeeded == 1 and s.deliveries == 1,
                        step=timedelta(minutes=1), rounds=30)
    with Session(engine) as session:
        row = session.get(Subscription, sid)
        assert row is not None
        stored = row.status
    await finish(no_opt_in, sid)
    assert state.paused and stored == "paused"
    assert state.status == "paused", state.status


async def test_resume_of_a_cancelled_subscription_is_refused_while_its_charge_settles(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, game_backend: GameBackendServer,
) -> None:
    """Cancelled while its charge is pending: the charge is still settled (money may have
    moved) and delivered; resume, pause and a plan change are refused, before and after the
    workflow ends."""
    carrier_id = "it-tirreno"
    sid, msisdn = await charge_pending_at_the_carrier(
        no_opt_in, simulator, engine, temporal_env, carrier_id, "Europe/Rome", 12,
        "attack-resume-cancelled")
    cancelled = await no_opt_in.cancel_subscription(sid)
    assert cancelled.status == "cancelled"
    for refused in (no_opt_in.resume(sid), no_opt_in.pause(sid),
                    no_opt_in.change_plan(sid, f"{carrier_id}-pass-demo")):
        with pytest.raises(SubscriptionRequestError):
            await refused
    for _ in range(30):
        if (await no_opt_in.handle(sid).describe()).status != WorkflowExecutionStatus.RUNNING:
            break
        await temporal_env.sleep(timedelta(minutes=1))
    final = await no_opt_in.handle(sid).result()
    assert final.charges_succeeded == 1 and final.deliveries == 1
    with pytest.raises(SubscriptionRequestError, match="not running"):
        await no_opt_in.resume(sid)
    [charge] = operations_of(engine, sid, LedgerKind.CHARGE)
    assert charge.sends == 1
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])


async def test_a_pause_during_a_retry_wait_sends_no_charge_until_resumed(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    carrier_id = "gb-thames"
    msisdn = new_msisdn(carrier_id, "attack-pause-retry")
    await simulator.set_balance(carrier_id, msisdn, "0.50")
    due = await next_weekday(temporal_env, "Europe/London", 9)
    started = await subscribe_to(no_opt_in, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    await until(temporal_env, no_opt_in.handle(sid), lambda s: s.status == "past_due",
                step=timedelta(minutes=10), rounds=12)
    await no_opt_in.pause(sid)
    await simulator.set_balance(carrier_id, msisdn, "20.00")
    await temporal_env.sleep(timedelta(hours=8))
    sent = operations_of(engine, sid, LedgerKind.CHARGE)
    debits = await carrier_debits(simulator, carrier_id, msisdn)
    await finish(no_opt_in, sid)
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])
    assert len(sent) == 1 and debits == [], (len(sent), debits)


async def test_a_plan_change_during_a_retry_wait_keeps_the_cycles_price(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """The retry of cycle 1 charges cycle 1's price; the new plan starts with cycle 2."""
    carrier_id = "fr-azur"
    msisdn = new_msisdn(carrier_id, "attack-plan-retry")
    await simulator.set_balance(carrier_id, msisdn, "1.00")
    due = await next_weekday(temporal_env, "Europe/Paris", 10)
    started = await subscribe_to(no_opt_in, f"{carrier_id}-pass-weekly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    handle = no_opt_in.handle(sid)
    await until(temporal_env, handle, lambda s: s.status == "past_due",
                step=timedelta(minutes=10), rounds=12)
    await no_opt_in.change_plan(sid, f"{carrier_id}-pass-monthly")
    await simulator.set_balance(carrier_id, msisdn, "20.00")
    await until(temporal_env, handle, lambda s: s.charges_succeeded == 2,
                step=timedelta(hours=6), rounds=40)
    charges = [e for e in ledger_of(engine, sid) if e.kind == LedgerKind.CHARGE]
    assert [(e.cycle, e.amount_minor) for e in charges] == [(1, 149), (2, 499)]
    await finish(no_opt_in, sid)
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])


# -- caps -----------------------------------------------------------------------------------------


def capped(temporal_env: WorkflowEnvironment, engine: Engine, settings: Settings,
           **caps: int) -> SubscriptionClient:
    return ruled_client(temporal_env, engine, settings, rules_with(
        opt_in="none", caps=Caps(per_transaction_minor=4000, **caps)))


async def next_month_start(env: WorkflowEnvironment, zone: str, day: int, hour: int) -> datetime:
    start = (await next_weekday(env, zone, hour)).replace(day=day)
    if start <= await env.get_current_time():
        start = start.replace(month=start.month % 12 + 1, year=start.year + (start.month == 12))
    return start


def interactions_for(engine: Engine, key_prefix: str) -> list[CarrierInteraction]:
    with Session(engine) as session:
        return list(session.exec(select(CarrierInteraction).where(
            col(CarrierInteraction.idempotency_key).startswith(key_prefix),
            CarrierInteraction.operation != "send_sms")))


async def test_a_charge_in_flight_on_another_subscription_counts_against_the_monthly_cap(
    temporal_env: WorkflowEnvironment, engine: Engine, settings: Settings, worker: Any,
    simulator: Simulator,
) -> None:
    """GBP 4.50 a month for the subscriber: the 3.99 pass or the 0.79 gem pack, not both. The
    pass is charged; the carrier takes it but its answer is lost and look-ups fail for
    minutes, so it is in flight, not in the ledger. The gem pack falls due meanwhile: it must
    be postponed by the cap, never sent."""
    client = capped(temporal_env, engine, settings, per_month_minor=450)
    carrier_id = "gb-thames"
    msisdn = new_msisdn(carrier_id, "attack-cap-in-flight")
    start = await next_month_start(temporal_env, "Europe/London", 8, 10)
    await simulator.fault(carrier_id, "timeout_after_debit", msisdn, delay_seconds=2)
    await simulator.fault(carrier_id, "lookup_error", count=3)
    first = await subscribe_to(client, f"{carrier_id}-pass-monthly", msisdn,
                               first_charge_at=start.astimezone(UTC))
    second = await subscribe_to(client, f"{carrier_id}-gems-demo", msisdn,
                                first_charge_at=(start + timedelta(minutes=1)).astimezone(UTC))
    await temporal_env.sleep(start - await temporal_env.get_current_time())
    await wait_for_operation(engine, first.subscription_id, OperationState.PENDING)
    state = await until(temporal_env, client.handle(second.subscription_id), lambda s: any(
        d.rule == "GB.per_month" for d in s.decisions), step=timedelta(seconds=20), rounds=30)
    assert next(d for d in state.decisions if d.rule == "GB.per_month").kind == "postponed"
    assert operations_of(engine, second.subscription_id) == []
    await until(temporal_env, client.handle(first.subscription_id),
                lambda s: s.charges_succeeded == 1, step=timedelta(minutes=1), rounds=30)
    for sid in (first.subscription_id, second.subscription_id):
        await finish(client, sid)
    assert await carrier_debits(simulator, carrier_id, msisdn) == ["charge"]
    await assert_books_match(simulator, engine, carrier_id, msisdn,
                             [first.subscription_id, second.subscription_id])


async def test_two_subscriptions_due_at_the_same_moment_cannot_both_pass_the_cap(
    temporal_env: WorkflowEnvironment, engine: Engine, settings: Settings, worker: Any,
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same MSISDN, two subscriptions due at the same instant, a cap (GBP 4.50) that fits
    either first charge (3.99, 0.79) but not both: whatever the interleaving of the two cap
    checks (here a database slow to answer the spend query), the month's charges stay
    within the cap."""
    read_spend = spend_so_far
    both_read = threading.Barrier(2, timeout=5)
    overlapped: list[bool] = []

    def slow_spend_so_far(*args: Any, **kwargs: Any) -> SpendSoFar:
        spent = read_spend(*args, **kwargs)
        with contextlib.suppress(threading.BrokenBarrierError):
            both_read.wait()  # the other charge's check reads before this one writes
            overlapped.append(True)
        return spent

    monkeypatch.setattr(billing_module, "spend_so_far", slow_spend_so_far)
    client = capped(temporal_env, engine, settings, per_month_minor=450)
    carrier_id = "gb-thames"
    msisdn = new_msisdn(carrier_id, "attack-cap-same-moment")
    start = await next_month_start(temporal_env, "Europe/London", 9, 11)
    subs = [await subscribe_to(client, price, msisdn, first_charge_at=start.astimezone(UTC))
            for price in (f"{carrier_id}-pass-monthly", f"{carrier_id}-gems-demo")]
    await temporal_env.sleep(start + timedelta(hours=2) - await temporal_env.get_current_time())
    charged = sum(e.amount_minor for s in subs for e in ledger_of(engine, s.subscription_id))
    for started in subs:
        await finish(client, started.subscription_id)
    await assert_books_match(simulator, engine, carrier_id, msisdn,
                             [s.subscription_id for s in subs])
    # the check and the operation it records hold the write lock (SQLite) or the subscriber's
    # row (PostgreSQL): the second check waits for the first one's record, so the two reads
    # never overlap and the month stays within the cap
    assert not overlapped
    assert 0 < charged <= 450, charged


async def test_a_cap_refusal_records_no_operation_and_sends_nothing(
    temporal_env: WorkflowEnvironment, engine: Engine, settings: Settings, worker: Any,
    simulator: Simulator,
) -> None:
    """A monthly cap below the price: every month the charge is postponed by the rule, and
    no operation, no carrier request and no debit is ever made."""
    client = capped(temporal_env, engine, settings, per_month_minor=300)
    carrier_id = "gb-thames"
    msisdn = new_msisdn(carrier_id, "attack-cap-nothing-sent")
    start = await next_month_start(temporal_env, "Europe/London", 10, 10)
    started = await subscribe_to(client, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=start.astimezone(UTC))
    sid = started.subscription_id
    state = await until(temporal_env, client.handle(sid), lambda s: sum(
        d.rule == "GB.per_month" for d in s.decisions) >= 3, step=timedelta(days=1), rounds=100)
    assert state.charges_succeeded == 0 and state.recent_cycles == []
    assert operations_of(engine, sid) == []
    assert interactions_for(engine, started.key_prefix) == []
    assert await carrier_debits(simulator, carrier_id, msisdn) == []
    await finish(client, sid)


# -- delivery -------------------------------------------------------------------------------------


async def test_a_grant_whose_answer_is_dropped_is_found_on_retry_one_grant_and_no_refund(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, game_backend: GameBackendServer, settings: Settings,
) -> None:
    carrier_id = "kw-gulfcell"
    msisdn = new_msisdn(carrier_id, "attack-grant-dropped")
    due = await next_weekday(temporal_env, "Asia/Kuwait", 11)
    started = await subscribe_to(no_opt_in, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    await game_backend.control("faults", {
        "kind": "drop", "operation": "grant", "count": 1,
        "subscriber_ref": subscriber_ref(engine, settings, sid)})
    state = await until(temporal_env, no_opt_in.handle(sid), lambda s: s.deliveries == 1,
                        step=timedelta(minutes=1), rounds=60)
    assert (state.delivery_failures, state.refunds) == (0, 0)
    [grant] = await grants_of(game_backend, started.key_prefix)
    assert grant["status"] == "active"
    assert await grant_requests(game_backend, grant["grant_id"]) == 1
    assert [e.kind for e in ledger_of(engine, sid)] == [LedgerKind.CHARGE]
    await finish(no_opt_in, sid)
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])


async def test_a_grant_made_but_never_confirmed_is_revoked_and_the_charge_refunded(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, game_backend: GameBackendServer, settings: Settings,
) -> None:
    """The backend grants but the answer is lost, and every look-up of the grant fails until
    the delivery deadline: the grant that does exist is revoked and the payment refunded."""
    carrier_id = "bh-pearl"
    msisdn = new_msisdn(carrier_id, "attack-grant-never-confirmed")
    due = await next_weekday(temporal_env, "Asia/Bahrain", 11)
    started = await subscribe_to(no_opt_in, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    ref = subscriber_ref(engine, settings, sid)
    await game_backend.control("faults", {"kind": "drop", "operation": "grant", "count": 1,
                                          "subscriber_ref": ref})
    await game_backend.control("faults", {"kind": "unavailable", "operation": "lookup",
                                          "count": 10_000, "subscriber_ref": ref})
    state = await until(temporal_env, no_opt_in.handle(sid),
                        lambda s: s.recent_cycles != [] and s.recent_cycles[-1].delivery
                        is not None, step=timedelta(minutes=10), rounds=30)
    assert state.recent_cycles[-1].delivery == "refunded"
    [grant] = await grants_of(game_backend, started.key_prefix)
    assert grant["status"] == "revoked"
    assert net_minor(ledger_of(engine, sid)) == 0
    await finish(no_opt_in, sid)
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])


async def test_a_refund_after_a_failed_delivery_leaves_no_grant_standing(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, game_backend: GameBackendServer, settings: Settings,
) -> None:
    carrier_id = "pl-baltyk"
    msisdn = new_msisdn(carrier_id, "attack-revoke-fails")
    due = await next_weekday(temporal_env, "Europe/Warsaw", 11)
    started = await subscribe_to(no_opt_in, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    ref = subscriber_ref(engine, settings, sid)
    for operation, kind in (("grant", "drop"), ("lookup", "unavailable"),
                            ("revoke", "unavailable")):
        await game_backend.control("faults", {"kind": kind, "operation": operation,
                                              "count": 1 if kind == "drop" else 10_000,
                                              "subscriber_ref": ref})
    # the grant's answer is lost and the game stays down for hours: the revoke is retried
    # (for up to a day) before the payment goes back
    await until(temporal_env, no_opt_in.handle(sid),
                lambda s: s.delivery_failures == 1, step=timedelta(minutes=10), rounds=30)
    await temporal_env.sleep(timedelta(hours=3))
    assert net_minor(ledger_of(engine, sid)) > 0  # not refunded while the grant stands
    await game_backend.control("faults", {"kind": "clear"})
    state = await until(temporal_env, no_opt_in.handle(sid),
                        lambda s: s.recent_cycles[-1].delivery is not None,
                        step=timedelta(minutes=30), rounds=60)
    assert state.revokes_owed == []
    grants = await grants_of(game_backend, started.key_prefix)
    refunded = net_minor(ledger_of(engine, sid)) == 0
    await finish(no_opt_in, sid)
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])
    assert state.recent_cycles[-1].delivery == "refunded" and refunded
    assert [g["status"] for g in grants] == ["revoked"], grants


async def test_a_charge_settled_late_as_succeeded_is_delivered_or_refunded(
    temporal_env: WorkflowEnvironment, engine: Engine, settings: Settings, worker: Any,
    simulator: Simulator, game_backend: GameBackendServer,
) -> None:
    carrier_id = "de-nordnetz"
    client = ruled_client(temporal_env, engine, settings, rules_with(opt_in="none"),
                          short_settling(carrier_id, 60))
    msisdn = new_msisdn(carrier_id, "attack-late-settlement")
    await simulator.fault(carrier_id, "timeout_after_debit", msisdn, delay_seconds=2)
    await simulator.fault(carrier_id, "lookup_error", count=20)
    due = await next_weekday(temporal_env, "Europe/Berlin", 11)
    started = await subscribe_to(client, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    state = await until(temporal_env, client.handle(sid), lambda s: bool(s.recent_cycles),
                        step=timedelta(minutes=1), rounds=60)
    assert state.recent_cycles[-1].outcome == "unsettled"
    simulator.core.faults.clear()
    [charge] = operations_of(engine, sid, LedgerKind.CHARGE)
    late = await client.settle(charge.idempotency_key)
    assert (late.state, late.outcome) == ("settled", "succeeded")
    await temporal_env.sleep(timedelta(hours=6))
    state = await state_of(client, sid)
    grants = [g for g in await grants_of(game_backend, started.key_prefix)
              if g["grant_id"] == f"{charge.idempotency_key}-d"]
    entries = [e for e in ledger_of(engine, sid) if e.cycle == 1]
    await finish(client, sid)
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])
    assert [e.kind for e in entries][:1] == [LedgerKind.CHARGE]
    assert grants or net_minor(entries) == 0, (state.recent_cycles, entries)


# -- balance and the price ladder ----------------------------------------------------------------


async def test_a_ladder_charge_answered_pending_then_succeeded_is_booked_once_at_its_rung(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, game_backend: GameBackendServer,
) -> None:
    """za-springbok's ladder: 49.00, 20.00, 10.00. A 25.00 balance buys the 20.00 rung; the
    carrier takes it but the answer is lost; the look-up settles it. One debit, one ledger row
    of 20.00, a partial payment delivered for proportionally less time."""
    carrier_id = "za-springbok"
    msisdn = new_msisdn(carrier_id, "attack-ladder-pending")
    await simulator.set_balance(carrier_id, msisdn, "25.00")
    await simulator.fault(carrier_id, "timeout_after_debit", msisdn, delay_seconds=2)
    due = await next_weekday(temporal_env, "Africa/Johannesburg", 10)
    started = await subscribe_to(no_opt_in, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    state = await until(temporal_env, no_opt_in.handle(sid), lambda s: s.deliveries == 1,
                        step=timedelta(minutes=1), rounds=60)
    cycle = state.recent_cycles[-1]
    assert (cycle.amount_minor, cycle.partial) == (2000, True)
    [charge] = operations_of(engine, sid, LedgerKind.CHARGE)
    assert (charge.amount_minor, charge.sends, charge.ambiguous) == (2000, 1, True)
    assert [(e.kind, e.amount_minor) for e in ledger_of(engine, sid)] == [
        (LedgerKind.CHARGE, 2000)]
    [grant] = await grants_of(game_backend, started.key_prefix)
    granted_until = datetime.fromisoformat(grant["until"])
    assert granted_until - datetime.fromisoformat(grant["granted_at"]) < timedelta(days=14)
    assert interactions_for(engine, started.key_prefix)  # (the carrier calls are recorded)
    await finish(no_opt_in, sid)
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])


async def test_a_failed_balance_look_up_at_the_carrier_charges_full_price_first(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """mx-maya is unreachable when the balance is read: the balance is unknown, so the charge
    goes out at the full price (then down the ladder on 'insufficient funds'); it is never
    skipped and never guessed down."""
    carrier_id = "mx-maya"
    msisdn = new_msisdn(carrier_id, "attack-balance-unreachable")
    await simulator.set_balance(carrier_id, msisdn, "50.00")
    due = await next_weekday(temporal_env, "America/Mexico_City", 13)
    started = await subscribe_to(no_opt_in, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    await temporal_env.sleep(due - timedelta(seconds=5) - await temporal_env.get_current_time())
    await simulator.fault(carrier_id, "unavailable_for", delay_seconds=1.5)
    await temporal_env.sleep(timedelta(seconds=10))
    # the balance look-up and the charge are both refused (503); the charge waits to be resent
    await wait_for_operation(engine, sid, OperationState.RETRYABLE)
    await asyncio.sleep(1.6)  # the carrier is back (wall time)
    state = await until(temporal_env, no_opt_in.handle(sid), lambda s: s.charges_succeeded == 1,
                        step=timedelta(minutes=10), rounds=60)
    charges = operations_of(engine, sid, LedgerKind.CHARGE)
    assert charges[0].amount_minor == 8900
    assert state.recent_cycles[-1].amount_minor == 4450
    assert [(e.kind, e.amount_minor) for e in ledger_of(engine, sid)] == [
        (LedgerKind.CHARGE, 4450)]
    await finish(no_opt_in, sid)
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])


async def test_a_balance_look_up_failing_on_our_side_never_fails_the_subscription(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch,
) -> None:
    carrier_id = "za-karoo"
    msisdn = new_msisdn(carrier_id, "attack-balance-ours")
    due = await next_weekday(temporal_env, "Africa/Johannesburg", 11)
    started = await subscribe_to(no_opt_in, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    with Session(engine) as session:
        row = session.get(Subscription, sid)
        assert row is not None
        victim = row.subscriber_id
    read_msisdn = BillingActivities._msisdn

    def failing(self: BillingActivities, subscriber_id: int) -> str:
        if subscriber_id == victim:
            raise RuntimeError("database connection lost")
        return read_msisdn(self, subscriber_id)

    monkeypatch.setattr(BillingActivities, "_msisdn", failing)
    await temporal_env.sleep(due + timedelta(minutes=1) - await temporal_env.get_current_time())
    for _ in range(20):
        if operations_of(engine, sid) or (
                await no_opt_in.handle(sid).describe()).status != WorkflowExecutionStatus.RUNNING:
            break
        await asyncio.sleep(0.5)
    monkeypatch.undo()
    status = (await no_opt_in.handle(sid).describe()).status
    if status == WorkflowExecutionStatus.RUNNING:
        await until(temporal_env, no_opt_in.handle(sid), lambda s: s.charges_succeeded == 1,
                    step=timedelta(minutes=10), rounds=30)
        await finish(no_opt_in, sid)
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])
    assert status == WorkflowExecutionStatus.RUNNING, status


async def test_a_cycle_paid_in_two_parts_is_refunded_in_full(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    carrier_id = "mx-maya"
    msisdn = new_msisdn(carrier_id, "attack-remainder-refund")
    await simulator.set_balance(carrier_id, msisdn, "50.00")
    due = await next_weekday(temporal_env, "America/Mexico_City", 12)
    started = await subscribe_to(no_opt_in, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    handle = no_opt_in.handle(sid)
    await until(temporal_env, handle, lambda s: s.deliveries == 1,
                step=timedelta(minutes=10), rounds=48)
    await simulator.set_balance(carrier_id, msisdn, "100.00")
    await until(temporal_env, handle, lambda s: s.remainders_collected == 1,
                step=timedelta(hours=1), rounds=48)
    paid = sum(e.amount_minor for e in ledger_of(engine, sid) if e.cycle == 1)
    assert paid == 8900
    with contextlib.suppress(SubscriptionRequestError):
        await no_opt_in.request_refund(sid, 1, request_id="whole-cycle")
    entries = [e for e in ledger_of(engine, sid) if e.cycle == 1]
    await finish(no_opt_in, sid)
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])
    assert net_minor(entries) == 0, [(e.kind, e.amount_minor) for e in entries]
