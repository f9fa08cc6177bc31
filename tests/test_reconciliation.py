"""Reconciliation end to end: subscriptions billed through the real workflows and simulators
(faults make charges unsettled), the carrier's settlement report fetched over HTTP, decisions
written, the run stored and printed; the daily schedule on a Temporal dev server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.reconciliation import ReconciliationActivities, ReconciliationOutput
from carriers.loader import default_registry
from models.money import from_decimal
from models.reconciliation import ReconciliationItem, ReconciliationRun
from models.tables import CarrierOperation, LedgerEntry, LedgerKind, OperationState, Period
from reconciliation.report import report_for
from reconciliation.schedule import SCHEDULE_ID, ensure_schedule, reconcile_now
from settings import Settings, venv_binary
from starter import SubscriptionClient
from tests.conftest import Simulator
from tests.test_money_safety import (
    cycles,
    few_settling_attempts,
    operation,
    subscribe,
    until,
)
from tests.test_subscription_workflow import ledger_of, next_jan_31
from workflows.reconciliation import DailyReconciliationWorkflow, ReconciliationWorkflow
from workflows.subscription import SubscriptionWorkflow

REGISTRY = default_registry()


def _worker(client: Client, engine: Engine, settings: Settings, queue: str) -> Worker:
    activities = ReconciliationActivities(engine, REGISTRY, settings.simulator_urls)
    return Worker(client, task_queue=queue,
                  workflows=[ReconciliationWorkflow, DailyReconciliationWorkflow],
                  activities=activities.all())


@pytest.fixture
async def queue(temporal_env: WorkflowEnvironment, engine: Engine,
                settings: Settings) -> AsyncIterator[str]:
    name = f"reconcile-{uuid.uuid4()}"
    async with _worker(temporal_env.client, engine, settings, name):
        yield name


def today() -> date:
    return datetime.now(UTC).date()


async def close_day(simulator: Simulator, carrier_id: str, day: date) -> None:
    await simulator.control("reports/close", {"carrier": carrier_id, "date": day.isoformat()})


def items(engine: Engine, carrier_id: str, day: date) -> list[ReconciliationItem]:
    with Session(engine) as session:
        return list(session.exec(select(ReconciliationItem).join(ReconciliationRun).where(
            ReconciliationRun.carrier_id == carrier_id, ReconciliationRun.day == day)).all())


def snapshot(engine: Engine) -> tuple[object, ...]:
    """Everything a second run could write."""
    with Session(engine) as session:
        return (session.exec(select(func.count()).select_from(LedgerEntry)).one(),
                sorted((o.idempotency_key, o.state, o.outcome, str(o.updated_at))
                       for o in session.exec(select(CarrierOperation)).all()),
                sorted((i.id, i.kind, i.match_key, i.resolution, i.detail)
                       for i in session.exec(select(ReconciliationItem)).all()),
                sorted((r.id, r.missing, r.extra, r.reconciled, r.not_charged, r.unresolved,
                        str(r.updated_at)) for r in session.exec(select(ReconciliationRun)).all()))


async def test_a_clean_day_has_no_mismatch(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, queue: str,
) -> None:
    first = await next_jan_31(temporal_env)
    msisdn, started = await subscribe(client, "br-jacaranda", "recon-clean", first,
                                      Period.MONTHLY)
    handle = client.handle(started.subscription_id)
    await until(temporal_env, handle, lambda s: s.recent_cycles, step=timedelta(minutes=1))
    [entry] = ledger_of(engine, started.subscription_id)
    await close_day(simulator, "br-jacaranda", today())
    result = await reconcile_now(temporal_env.client, queue, today(), "br-jacaranda")
    assert result.final and result.report_rows >= 1
    # (other tests share the simulator's books for the day: only this subscription's keys)
    assert [s for s in result.settled
            if s.idempotency_key.startswith(started.key_prefix)] == []
    with Session(engine) as session:
        listed = session.exec(select(ReconciliationItem).where(
            col(ReconciliationItem.idempotency_key).startswith(started.key_prefix))).all()
    assert listed == []
    books = await simulator.transactions("br-jacaranda", msisdn)
    assert [from_decimal(Decimal(t["amount"]), t["currency"]) for t in books] == [
        entry.amount_minor]
    printed = report_for(engine, today(), "br-jacaranda")
    assert printed.splitlines()[-1].startswith("reconciliation mismatches: ")
    assert "br-jacaranda: final report" in printed
    await client.cancel_subscription(started.subscription_id)


async def test_unsettled_charges_are_reconciled_or_closed_once(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, queue: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mx-maya has no look-up and does not deduplicate: a lost reply after the debit, and a
    500 without one, both leave the cycle unsettled. The final report shows the first: a
    `reconciled` ledger entry with the carrier's figures, the operation settled; the second
    is closed as not charged with no ledger row. A second run writes nothing."""
    few_settling_attempts(monkeypatch)
    first = await next_jan_31(temporal_env)
    debited_msisdn, debited = await subscribe(client, "mx-maya", "recon-debited", first,
                                              Period.MONTHLY)
    never_msisdn, never = await subscribe(client, "mx-maya", "recon-never", first,
                                          Period.MONTHLY)
    await simulator.fault("mx-maya", "reset_after_debit", debited_msisdn)
    await simulator.fault("mx-maya", "error_500", never_msisdn, count=20)
    for started in (debited, never):
        state = await until(temporal_env, client.handle(started.subscription_id),
                            lambda s: s.recent_cycles, step=timedelta(hours=2))
        assert cycles(state) == [(1, "unsettled")]
    debited_key, never_key = f"{debited.key_prefix}-c1-a0", f"{never.key_prefix}-c1-a0"
    assert len(await simulator.transactions("mx-maya", never_msisdn)) == 0
    # (its later cycles may be billed meanwhile: the cycle-1 debit is the one reconciled)
    [booked] = [t for t in await simulator.transactions("mx-maya", debited_msisdn)
                if t["clientCorrelator"] == debited_key]

    await close_day(simulator, "mx-maya", today())
    result = await reconcile_now(temporal_env.client, queue, today(), "mx-maya")
    assert {(s.idempotency_key, s.resolution) for s in result.settled} >= {
        (debited_key, "reconciled"), (never_key, "not_charged")}

    # (time moved on meanwhile: later cycles were billed as usual)
    [entry] = [e for e in ledger_of(engine, debited.subscription_id) if e.cycle == 1]
    assert entry.kind == LedgerKind.RECONCILED and entry.idempotency_key == debited_key
    assert (entry.amount_minor, entry.currency, entry.carrier_reference) == (
        from_decimal(Decimal(booked["amount"]), booked["currency"]), booked["currency"],
        booked["serverReferenceCode"])
    settled = operation(engine, debited_key)
    assert (settled.state, settled.outcome, settled.carrier_code) == (
        OperationState.SETTLED, "succeeded", "RECONCILED")
    assert [e for e in ledger_of(engine, never.subscription_id) if e.cycle == 1] == []
    closed = operation(engine, never_key)
    assert (closed.state, closed.outcome, closed.carrier_code) == (
        OperationState.SETTLED, "rejected", "NOT_CHARGED")
    found = {i.match_key: (i.kind, i.resolution) for i in items(engine, "mx-maya", today())}
    assert found[debited_key] == ("missing", "reconciled")
    assert found[never_key] == ("unsettled", "not_charged")
    # the subscriptions were told: nothing of theirs is unsettled any more
    for started in (debited, never):
        state = await client.handle(started.subscription_id).query(SubscriptionWorkflow.state)
        assert state.unsettled_count == 0
    printed = report_for(engine, today(), "mx-maya")
    assert "[reconciled] unsettled charge" in printed and never_key in printed

    for started in (debited, never):
        await client.cancel_subscription(started.subscription_id)
    before = snapshot(engine)
    again = await reconcile_now(temporal_env.client, queue, today(), "mx-maya")
    assert again.settled == []
    assert (again.reconciled, again.not_charged) == (result.reconciled, result.not_charged)
    assert snapshot(engine) == before


async def test_a_booking_we_never_made_and_a_preliminary_report(
    simulator: Simulator, engine: Engine, temporal_env: WorkflowEnvironment, queue: str,
) -> None:
    """A debit at the carrier under a key we never sent is reported missing and left for an
    operator; on a preliminary report it is already listed, and the run, once final, keeps
    one row for it."""
    carrier_id = "it-pagamobile"
    book = simulator.core.books[carrier_id]
    msisdn = f"+39{uuid.uuid4().int % 10**9:09d}"
    book.account(msisdn).balance = Decimal("50")
    stranger = book.charge(msisdn, Decimal("2.50"), f"not-ours-{uuid.uuid4().hex[:8]}", "x")
    preliminary = await reconcile_now(temporal_env.client, queue, today(), carrier_id)
    assert not preliminary.final and preliminary.missing >= 1
    await close_day(simulator, carrier_id, today())
    final = await reconcile_now(temporal_env.client, queue, today(), carrier_id)
    assert final.final
    mine = [i for i in items(engine, carrier_id, today())
            if i.carrier_reference == stranger.server_reference]
    assert [(i.kind, i.report_amount_minor, i.resolution) for i in mine] == [
        ("missing", 250, None)]
    assert "reconciliation mismatches: 0" not in report_for(engine, today(), carrier_id)


async def finished(client: Client, workflow_id: str) -> ReconciliationOutput:
    """The result of a workflow the schedule starts a moment later."""
    for _ in range(100):
        try:
            result: ReconciliationOutput = await client.get_workflow_handle(
                workflow_id, result_type=ReconciliationOutput).result()
            return result
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError(f"{workflow_id} never started")


async def test_the_daily_schedule_reconciles_yesterday_for_each_carrier(
    engine: Engine, settings: Settings,
) -> None:
    """The time-skipping test server has no schedules (CreateSchedule is unimplemented), so
    this runs on a Temporal dev server: the schedule is created, then updated in place, and a
    triggered run reconciles the previous day of each carrier."""
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=venv_binary("temporal"))
    try:
        queue = f"reconcile-{uuid.uuid4()}"
        assert await ensure_schedule(env.client, queue, ["ke-kilima"]) == SCHEDULE_ID
        await ensure_schedule(env.client, queue, ["ke-kilima", "ng-niger"], hour=3)
        handle = env.client.get_schedule_handle(SCHEDULE_ID)
        described = await handle.describe()
        assert described.schedule.spec.calendars[0].hour[0].start == 3
        async with _worker(env.client, engine, settings, queue):
            await handle.trigger()
            yesterday = (today() - timedelta(days=1)).isoformat()
            results = [await finished(env.client, f"reconcile-{carrier_id}-{yesterday}")
                       for carrier_id in ("ke-kilima", "ng-niger")]
        assert [(r.carrier_id, r.day, r.final) for r in results] == [
            ("ke-kilima", yesterday, True), ("ng-niger", yesterday, True)]
        assert [r.mismatches for r in results] == [0, 0]
    finally:
        await env.shutdown()
