"""Adversarial review of reconciliation with the carriers' settlement reports
(``reconciliation/``, ``activities/reconciliation.py``, ``workflows/reconciliation.py``): each
test is one attack on a money path and asserts the safe outcome — no money invented or dropped,
never a second ledger row for one debit, nothing closed as not charged that the carrier took,
our ledger equal to the carrier's books to the cent.

Charges are made unsettled through the real workflows against the simulators (time-skipping
server). The carrier's report is served over a real socket: either the simulator's own, or a
"tampering" report server that renders the simulator's books in the carrier's format (the
simulator's own ``render``) with what the attack changes (a row booked at another time, a row
twice, another amount, a malformed row, a report declared final early)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select
from temporalio.client import WorkflowFailureError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.reconciliation import (
    ReconciliationActivities,
    ReconciliationError,
    ReconciliationInput,
    ReconciliationOutput,
)
from activities.settlement import settle as original_settle
from carriers.loader import default_registry
from models import operations as ops
from models.money import from_decimal
from models.outbox import OutboxEntry
from models.reconciliation import ReconciliationItem, ReconciliationRun
from models.tables import (
    CarrierOperation,
    LedgerEntry,
    LedgerKind,
    OperationState,
    Period,
)
from reconciliation.compare import (
    ItemKind,
    OperationSide,
    Ours,
    Resolution,
    compare,
)
from reconciliation.formats import ReportFormatError, ReportRow, load_formats, parse
from reconciliation.report import report_for
from reconciliation.schedule import reconcile_now
from settings import Settings
from simulators import settlement_reports
from simulators.books import Transaction
from starter import StartedSubscription, SubscriptionClient
from tests.conftest import GameBackendServer, Simulator
from tests.test_attacks_flows import grants_of, operations_of, short_settling
from tests.test_money_safety import cycles, few_settling_attempts, operation, subscribe, until
from tests.test_subscription_workflow import next_jan_31
from tests.workflow_helpers import (
    new_msisdn,
    next_weekday,
    ruled_client,
    rules_with,
    subscribe_to,
)
from tests.workflow_helpers import until as until_state
from workflows.reconciliation import DailyReconciliationWorkflow, ReconciliationWorkflow

REGISTRY = default_registry()
SIM_FORMATS = settlement_reports._load_formats()
CARRIER = "mx-maya"  # Parlay X: no look-up, no deduplication; semicolons and decimal commas


# -- the tampering report server -----------------------------------------------------------------


class TamperedReports:
    """Serves ``/_reports/{carrier}/{day}.csv`` like the simulator does, from the simulator's
    books, with what a test changes: bookings moved to another time, extra rows, rows left
    out, a whole raw text, or a day declared final (or preliminary)."""

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self.url = ""
        self.booked: dict[str, datetime] = {}  # server reference -> when the carrier booked it
        self.extra: dict[tuple[str, date], list[Transaction]] = {}
        self.dropped: set[str] = set()  # server references left out
        self.raw: dict[tuple[str, date], str] = {}
        self.final: dict[tuple[str, date], bool] = {}
        self.served: list[tuple[str, date]] = []

    def rows(self, carrier_id: str, day: date) -> list[Transaction]:
        book = self.simulator.core.books[carrier_id]
        moved = [dataclasses.replace(t, created_at=self.booked[t.server_reference].isoformat())
                 if t.server_reference in self.booked else t
                 for t in list(book.by_reference.values()) if t.server_reference not in self.dropped]
        rows = [t for t in moved if settlement_reports._booked_at(t).date() == day]
        rows += self.extra.get((carrier_id, day), [])
        return sorted(rows, key=lambda t: (t.created_at, t.server_reference))

    async def report(self, request: web.Request) -> web.Response:
        carrier_id = request.match_info["carrier"]
        day = date.fromisoformat(request.match_info["day"])
        self.served.append((carrier_id, day))
        carrier = self.simulator.core.carriers[carrier_id]
        text = self.raw.get((carrier_id, day))
        if text is None:
            text = settlement_reports.render(SIM_FORMATS[carrier.protocol],
                                             self.rows(carrier_id, day))
        final = self.final.get((carrier_id, day), day < datetime.now(UTC).date())
        return web.Response(text=text, content_type="text/csv", charset="utf-8",
                            headers={"X-Report-Status": "final" if final else "preliminary"})


@pytest.fixture
async def reports(simulator: Simulator) -> AsyncIterator[TamperedReports]:
    served = TamperedReports(simulator)
    app = web.Application()
    app.router.add_get("/_reports/{carrier}/{day}.csv", served.report)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    served.url = f"http://127.0.0.1:{port}"
    yield served
    await runner.cleanup()


def reconciler(engine: Engine, settings: Settings, reports: TamperedReports
               ) -> ReconciliationActivities:
    return ReconciliationActivities(engine, REGISTRY, {**settings.simulator_urls,
                                                       "sim": reports.url})


@pytest.fixture
async def queue(temporal_env: WorkflowEnvironment, engine: Engine,
                settings: Settings) -> AsyncIterator[str]:
    """A reconciliation worker on the simulator's own reports."""
    name = f"reconcile-attacks-{uuid.uuid4()}"
    activities = ReconciliationActivities(engine, REGISTRY, settings.simulator_urls)
    async with Worker(temporal_env.client, task_queue=name,
                      workflows=[ReconciliationWorkflow, DailyReconciliationWorkflow],
                      activities=activities.all()):
        yield name


@pytest.fixture(autouse=True)
def no_faults_left(simulator: Simulator) -> Any:
    yield
    simulator.core.faults.clear()


# -- helpers ------------------------------------------------------------------------------------


def today() -> date:
    return datetime.now(UTC).date()


async def run(activities: ReconciliationActivities, day: date,
              carrier_id: str = CARRIER) -> ReconciliationOutput:
    return await activities.reconcile_carrier_day(ReconciliationInput(carrier_id,
                                                                      day.isoformat()))


async def unsettled_charge(client: SubscriptionClient, simulator: Simulator,
                           env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch,
                           seed: str, debited: bool = True
                           ) -> tuple[str, StartedSubscription, str, Transaction | None]:
    """A mx-maya charge left unsettled: the carrier debited it and the reply was lost
    (``debited``), or it answered 500 every time and took nothing. Returns the number, the
    subscription, the charge's key and the carrier's booking."""
    few_settling_attempts(monkeypatch)
    first = await next_jan_31(env)
    msisdn, started = await subscribe(client, CARRIER, f"recon-attack-{seed}-{uuid.uuid4()}",
                                      first, Period.MONTHLY)
    if debited:
        await simulator.fault(CARRIER, "reset_after_debit", msisdn)
    else:
        await simulator.fault(CARRIER, "error_500", msisdn, count=20)
    state = await until(env, client.handle(started.subscription_id),
                        lambda s: s.recent_cycles, step=timedelta(hours=2))
    assert cycles(state)[:1] == [(1, "unsettled")]
    key = f"{started.key_prefix}-c1-a0"
    assert operation(client.engine, key).state == OperationState.UNSETTLED
    booked = [t for t in simulator.core.books[CARRIER].by_reference.values()
              if t.client_correlator == key]
    assert len(booked) == (1 if debited else 0)
    return msisdn, started, key, booked[0] if booked else None


def entries(engine: Engine, key: str) -> list[LedgerEntry]:
    with Session(engine) as session:
        return list(session.exec(select(LedgerEntry).where(LedgerEntry.idempotency_key == key)))


def items_for(engine: Engine, key: str, day: date,
              carrier_id: str = CARRIER) -> list[ReconciliationItem]:
    with Session(engine) as session:
        return list(session.exec(
            select(ReconciliationItem).join(ReconciliationRun).where(
                ReconciliationRun.carrier_id == carrier_id, ReconciliationRun.day == day,
                sa.or_(col(ReconciliationItem.idempotency_key) == key,
                       col(ReconciliationItem.match_key) == key))))


def unresolved_lines(engine: Engine, key: str, day: date | None = None) -> list[str]:
    """The lines of the printed report an operator reads as open, for ``key``'s items."""
    day = day or today()
    names = {i.match_key for i in items_for(engine, key, day)}
    return [line for line in report_for(engine, day, CARRIER).splitlines()
            if "[unresolved]" in line and any(f" {name} " in line for name in names)]


def snapshot(engine: Engine) -> tuple[object, ...]:
    """Everything a reconciliation could write."""
    with Session(engine) as session:
        return (session.exec(select(func.count()).select_from(LedgerEntry)).one(),
                sorted((o.idempotency_key, o.state, o.outcome, str(o.updated_at))
                       for o in session.exec(select(CarrierOperation)).all()),
                sorted((i.id, i.kind, i.match_key, i.resolution, i.detail)
                       for i in session.exec(select(ReconciliationItem)).all()),
                sorted((r.id, r.final, r.missing, r.extra, r.reconciled, r.not_charged,
                        r.unresolved, str(r.updated_at))
                       for r in session.exec(select(ReconciliationRun)).all()))


def set_sent_at(engine: Engine, key: str, created_at: datetime,
                last_sent_at: datetime | None) -> None:
    with Session(engine) as session:
        session.execute(sa.update(CarrierOperation).where(
            col(CarrierOperation.idempotency_key) == key).values(
            created_at=created_at, last_sent_at=last_sent_at))
        session.commit()


async def books_match(simulator: Simulator, engine: Engine, msisdn: str,
                      subscription_id: int, carrier_id: str = CARRIER) -> None:
    """Our ledger equals the carrier's books for this subscriber to the minor unit (a
    ``reconciled`` entry is a charge)."""
    theirs = sorted((t["kind"], from_decimal(Decimal(t["amount"]), t["currency"]))
                    for t in await simulator.transactions(carrier_id, msisdn))
    with Session(engine) as session:
        ours = sorted(("charge" if e.kind == LedgerKind.RECONCILED else LedgerKind(e.kind).value,
                       e.amount_minor) for e in session.exec(select(LedgerEntry).where(
                           LedgerEntry.subscription_id == subscription_id)))
    assert ours == theirs, f"ledger {ours} != carrier books {theirs}"


def net_taken(engine: Engine, subscription_id: int, cycle: int) -> int:
    with Session(engine) as session:
        return sum(e.amount_minor if e.kind in (LedgerKind.CHARGE, LedgerKind.RECONCILED)
                   else -e.amount_minor for e in session.exec(select(LedgerEntry).where(
                       LedgerEntry.subscription_id == subscription_id,
                       LedgerEntry.cycle == cycle)))


async def wait_for(check: Callable[[], bool], rounds: int = 100) -> None:
    for _ in range(rounds):
        if check():
            return
        await asyncio.sleep(0.05)


# -- 1. late results and reconciliation, in either order -----------------------------------------


async def test_an_operator_settle_after_reconciliation_adds_no_row_and_does_not_fail(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, reports: TamperedReports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    msisdn, started, key, booked = await unsettled_charge(
        client, simulator, temporal_env, monkeypatch, "settle-after")
    assert booked is not None
    reports.final[(CARRIER, today())] = True
    result = await run(reconciler(engine, settings, reports), today())
    assert (key, "reconciled") in {(s.idempotency_key, s.resolution) for s in result.settled}
    await client.cancel_subscription(started.subscription_id)
    try:
        late = await client.settle(key)
    except WorkflowFailureError as exc:
        raise AssertionError(f"the late settlement failed: {exc.cause}") from exc
    finally:
        assert [e.kind for e in entries(engine, key)] == [LedgerKind.RECONCILED]
        await books_match(simulator, engine, msisdn, started.subscription_id)
    assert (late.state, late.outcome) == ("settled", "succeeded")


async def test_a_late_result_racing_reconciliation_settles_once_and_never_fails(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, reports: TamperedReports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The carrier's success arrives (stored on the record, as the relay does) and its late
    settlement starts; while it settles, the day's reconciliation reconciles the same key."""
    msisdn, started, key, booked = await unsettled_charge(
        client, simulator, temporal_env, monkeypatch, "race")
    assert booked is not None
    with Session(engine) as session:
        ops.store_report(session, key, "succeeded", booked.server_reference, None)
    reports.final[(CARRIER, today())] = True
    activities = reconciler(engine, settings, reports)
    original = original_settle
    raced: list[ReconciliationOutput] = []

    async def settle_after_reconciliation(*args: Any) -> Any:
        if args[2].idempotency_key == key and not raced:
            raced.append(await run(activities, today()))
        return await original(*args)

    monkeypatch.setattr("activities.billing.settle", settle_after_reconciliation)
    await client.cancel_subscription(started.subscription_id)
    try:
        late = await client.settle(key)
    except WorkflowFailureError as exc:
        raise AssertionError(f"the late settlement failed: {exc.cause}") from exc
    finally:
        assert raced and [s.idempotency_key for s in raced[0].settled].count(key) == 1
        assert len(entries(engine, key)) == 1
        await books_match(simulator, engine, msisdn, started.subscription_id)
    assert (late.state, late.outcome) == ("settled", "succeeded")


async def test_a_late_result_first_then_reconciliation_adds_nothing(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, reports: TamperedReports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    msisdn, started, key, booked = await unsettled_charge(
        client, simulator, temporal_env, monkeypatch, "late-first")
    assert booked is not None
    with Session(engine) as session:
        ops.store_report(session, key, "succeeded", booked.server_reference, None)
    late = await client.settle(key)
    assert (late.state, late.outcome) == ("settled", "succeeded")
    await client.cancel_subscription(started.subscription_id)
    reports.final[(CARRIER, today())] = True
    result = await run(reconciler(engine, settings, reports), today())
    assert key not in {s.idempotency_key for s in result.settled}
    assert [e.kind for e in entries(engine, key)] == [LedgerKind.CHARGE]
    assert items_for(engine, key, today()) == []  # matched to the cent: no mismatch
    await books_match(simulator, engine, msisdn, started.subscription_id)


# -- 2. when a report may close a charge ----------------------------------------------------------


async def test_a_preliminary_report_closes_nothing_and_a_final_one_does(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, reports: TamperedReports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    msisdn, started, key, _ = await unsettled_charge(
        client, simulator, temporal_env, monkeypatch, "preliminary", debited=False)
    await client.cancel_subscription(started.subscription_id)
    activities = reconciler(engine, settings, reports)
    reports.final[(CARRIER, today())] = False
    # (the output's `final` is the day's run row, final once any earlier run was: the
    # decisions follow this fetch's status)
    await run(activities, today())
    assert operation(engine, key).state == OperationState.UNSETTLED
    [item] = items_for(engine, key, today())
    assert (item.kind, item.resolution) == (ItemKind.UNSETTLED, None)
    reports.final[(CARRIER, today())] = True
    final = await run(activities, today())
    assert (key, "not_charged") in {(s.idempotency_key, s.resolution) for s in final.settled}
    closed = operation(engine, key)
    assert (closed.state, closed.outcome, closed.carrier_code) == (
        OperationState.SETTLED, "rejected", "NOT_CHARGED")
    assert entries(engine, key) == []
    await books_match(simulator, engine, msisdn, started.subscription_id)


async def test_a_debit_booked_just_after_midnight_is_not_closed_on_the_first_day(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, reports: TamperedReports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sent at 23:59:59, booked by the carrier at 00:00:01: the first day's final report
    does not show it. The next day's (preliminary) report does: never closed on day one, and
    reconciled by the next day's."""
    msisdn, started, key, booked = await unsettled_charge(
        client, simulator, temporal_env, monkeypatch, "midnight")
    assert booked is not None
    await client.cancel_subscription(started.subscription_id)
    first_day = today() - timedelta(days=1)
    midnight = datetime(today().year, today().month, today().day, tzinfo=UTC)
    set_sent_at(engine, key, midnight - timedelta(seconds=2), midnight - timedelta(seconds=1))
    reports.booked[booked.server_reference] = midnight + timedelta(seconds=1)
    activities = reconciler(engine, settings, reports)
    day_one = await run(activities, first_day)
    assert day_one.final
    assert operation(engine, key).state == OperationState.UNSETTLED
    assert entries(engine, key) == []
    assert all(i.resolution is None for i in items_for(engine, key, first_day))
    reports.final[(CARRIER, today())] = True
    day_two = await run(activities, today())
    assert (key, "reconciled") in {(s.idempotency_key, s.resolution) for s in day_two.settled}
    assert [e.kind for e in entries(engine, key)] == [LedgerKind.RECONCILED]
    await books_match(simulator, engine, msisdn, started.subscription_id)


async def test_a_debit_booked_before_a_resend_after_midnight_is_not_closed(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, reports: TamperedReports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """First sent at 23:59:58 and booked by the carrier at 23:59:59 (answer lost); sent again
    at 00:00:02 (the carrier deduplicates, so no second booking). The first day's
    reconciliation failed (report unavailable) or has not run; the second day's runs. Its
    final report rightly lacks the debit — it is in the first day's."""
    msisdn, started, key, booked = await unsettled_charge(
        client, simulator, temporal_env, monkeypatch, "resend-midnight")
    assert booked is not None
    await client.cancel_subscription(started.subscription_id)
    midnight = datetime(today().year, today().month, today().day, tzinfo=UTC)
    set_sent_at(engine, key, midnight - timedelta(seconds=2), midnight + timedelta(seconds=2))
    reports.booked[booked.server_reference] = midnight - timedelta(seconds=1)
    reports.final[(CARRIER, today())] = True
    await run(reconciler(engine, settings, reports), today())
    assert operation(engine, key).outcome != "rejected", (
        "closed as not charged although the carrier's previous day shows the debit")


# -- 3. what a report may say --------------------------------------------------------------------


async def test_a_row_reported_twice_books_one_entry_and_flags_the_second(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, reports: TamperedReports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    msisdn, started, key, booked = await unsettled_charge(
        client, simulator, temporal_env, monkeypatch, "twice")
    assert booked is not None
    await client.cancel_subscription(started.subscription_id)
    again = dataclasses.replace(booked, server_reference=f"{booked.server_reference}-2")
    reports.extra[(CARRIER, today())] = [again, booked]  # a second booking, and a repeated line
    reports.final[(CARRIER, today())] = True
    await run(reconciler(engine, settings, reports), today())
    [entry] = entries(engine, key)
    assert (entry.kind, entry.amount_minor) == (
        LedgerKind.RECONCILED, from_decimal(booked.amount, booked.currency))
    flagged = [i for i in items_for(engine, key, today()) if i.resolution is None]
    assert {(i.kind, i.match_key) for i in flagged} >= {
        (ItemKind.MISSING, f"ref:{again.server_reference}")}
    assert any(f"ref:{again.server_reference} " in line for line in unresolved_lines(engine, key))
    await books_match(simulator, engine, msisdn, started.subscription_id)


async def test_a_reconciled_amount_is_the_carriers_to_the_cent(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, reports: TamperedReports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The carrier took less than we asked (a partial debit): the entry holds what it took,
    our price kept as the list price."""
    _, started, key, booked = await unsettled_charge(
        client, simulator, temporal_env, monkeypatch, "less")
    assert booked is not None
    await client.cancel_subscription(started.subscription_id)
    asked = operation(engine, key).amount_minor
    taken = dataclasses.replace(booked, amount=booked.amount - Decimal("0.01"))
    reports.dropped.add(booked.server_reference)
    reports.extra[(CARRIER, today())] = [taken]
    reports.final[(CARRIER, today())] = True
    await run(reconciler(engine, settings, reports), today())
    [entry] = entries(engine, key)
    assert (entry.kind, entry.amount_minor, entry.list_price_minor, entry.carrier_reference) == (
        LedgerKind.RECONCILED, asked - 1, asked, booked.server_reference)


async def test_an_over_charge_is_booked_as_taken_and_left_for_an_operator(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, reports: TamperedReports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, started, key, booked = await unsettled_charge(
        client, simulator, temporal_env, monkeypatch, "more")
    assert booked is not None
    await client.cancel_subscription(started.subscription_id)
    asked = operation(engine, key).amount_minor
    taken = dataclasses.replace(booked, amount=booked.amount + Decimal("1.00"))
    reports.dropped.add(booked.server_reference)
    reports.extra[(CARRIER, today())] = [taken]
    reports.final[(CARRIER, today())] = True
    await run(reconciler(engine, settings, reports), today())
    [entry] = entries(engine, key)
    assert entry.amount_minor == asked + 100  # the ledger says what the carrier took
    assert unresolved_lines(engine, key), (
        f"the over-charge is flagged for no one: {items_for(engine, key, today())}")


async def test_a_malformed_report_is_refused_whole_and_writes_nothing(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, reports: TamperedReports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A report whose rows are all good but one (the debit we would reconcile is among the
    good ones): nothing is reconciled, closed or stored. Then the next day's report is the
    malformed one: the same."""
    _, started, key, booked = await unsettled_charge(
        client, simulator, temporal_env, monkeypatch, "malformed")
    assert booked is not None
    await client.cancel_subscription(started.subscription_id)
    fmt = SIM_FORMATS["parlayx"]
    good = settlement_reports.render(fmt, reports.rows(CARRIER, today()))
    reports.final[(CARRIER, today())] = True
    activities = reconciler(engine, settings, reports)
    for bad in (f"X1;{booked.created_at};{booked.msisdn};k;charge;MXN;1,00\r\n",  # a date
                "X2;01/01/2030 00:00:00;+52155;k;chargeback;MXN;1,00\r\n",      # a kind
                "X3;01/01/2030 00:00:00;+52155;k;charge;MXN;1.000,00\r\n",      # a thousands dot
                "X4;01/01/2030 00:00:00;+52155;k;charge;MXN;0,001\r\n",         # sub-cent
                "X5;01/01/2030 00:00:00;+52155;k;charge;MXN;-1,00\r\n",         # negative
                "X6;01/01/2030 00:00:00;+52155;k;charge;MXN;NaN\r\n",
                "X7;01/01/2030 00:00:00;+52155;k;charge;MXN\r\n"):              # a field short
        for day in (today(), today() + timedelta(days=1)):
            reports.raw.clear()
            reports.raw[(CARRIER, day)] = good + bad
            before = snapshot(engine)
            with pytest.raises(ReconciliationError):
                await run(activities, today())
            assert snapshot(engine) == before, bad
    assert operation(engine, key).state == OperationState.UNSETTLED
    reports.raw.clear()
    await run(activities, today())
    assert [e.kind for e in entries(engine, key)] == [LedgerKind.RECONCILED]


@pytest.mark.parametrize("amount", [
    "NaN", "sNaN", "0,00", "1,001",
    "Infinity",
])
def test_odd_amounts_are_refused_by_the_reader(amount: str) -> None:
    fmt = load_formats()["parlayx-cdr"]
    line = f"R1;01/01/2030 00:00:00;+5215512345678;k;charge;MXN;{amount}\r\n"
    with pytest.raises(ReportFormatError):
        parse(fmt, line)


# -- 4. matching without our key, and refunds ----------------------------------------------------


def _charge(key: str, msisdn: str, amount: int = 500, reported: str | None = None
            ) -> OperationSide:
    return OperationSide(key, "charge", "unsettled", None, amount, "GBP", msisdn, reported)


def test_an_smpp_debit_is_matched_by_its_message_id_alone() -> None:
    """The SMSC's report carries its message id, never our key: the debit is reconciled under
    the key whose submission got that id, with the message id as the reference; a debit whose
    message id we never learnt keeps the same number's other unsettled charge open."""
    booked = datetime(2030, 1, 1, 12, tzinfo=UTC)
    rows = [ReportRow(booked, "srv-1", "+447700900001", "charge", 500, "GBP", None, "m-1"),
            ReportRow(booked, "srv-2", "+447700900002", "charge", 500, "GBP", None, "m-x")]
    ours = Ours({}, {"k1": _charge("k1", "+447700900001"), "k2": _charge("k2", "447700900002")},
                {"m-1": "k1"}, frozenset({"k1", "k2"}))
    found = compare(rows, True, ours)
    assert [(r.key, r.amount_minor, r.carrier_reference) for r in found.reconcile] == [
        ("k1", 500, "m-1")]
    assert found.close == []
    [unmatched] = [i for i in found.items if i.match_key == "ref:srv-2"]
    assert (unmatched.kind, unmatched.resolution) == (ItemKind.MISSING, None)
    [kept] = [i for i in found.items if i.match_key == "k2"]
    assert (kept.kind, kept.resolution) == (ItemKind.UNSETTLED, None)


def test_a_pushed_success_missing_from_the_final_report_is_never_closed() -> None:
    ours = Ours({}, {"k1": _charge("k1", "+447700900001", reported="succeeded")}, {},
                frozenset({"k1"}))
    found = compare([], True, ours)
    assert found.close == [] and found.reconcile == []
    assert [(i.kind, i.resolution) for i in found.items] == [(ItemKind.UNSETTLED, None)]


def unsettled_refund(engine: Engine, started: StartedSubscription) -> str:
    """A refund of cycle 1 sent and left unsettled (as a workflow that gave up leaves it)."""
    with Session(engine) as session:
        charge = session.exec(select(LedgerEntry).where(
            LedgerEntry.subscription_id == started.subscription_id, LedgerEntry.cycle == 1,
            LedgerEntry.kind == LedgerKind.CHARGE)).one()
        key = f"{charge.idempotency_key}-r1"
        ops.reserve(session, ops.OperationSpec(
            key, LedgerKind.REFUND, charge.carrier_id, "refund-attack", charge.subscription_id,
            1, charge.amount_minor, charge.currency, charge.due_at or datetime.now(UTC)))
        assert ops.transition(session, key, OperationState.UNSETTLED, ambiguous=True,
                              unsettled_reason="attack: no answer")
    return key


async def charged_subscription(client: SubscriptionClient, env: WorkflowEnvironment,
                               seed: str) -> tuple[str, StartedSubscription]:
    msisdn, started = await subscribe(client, CARRIER, f"recon-refund-{seed}-{uuid.uuid4()}",
                                      await next_jan_31(env), Period.MONTHLY)
    state = await until(env, client.handle(started.subscription_id),
                        lambda s: s.recent_cycles, step=timedelta(hours=2))
    assert cycles(state)[:1] == [(1, "succeeded")]
    await client.cancel_subscription(started.subscription_id)
    return msisdn, started


async def test_an_unsettled_refund_the_carrier_booked_is_reported_never_decided(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, reports: TamperedReports,
) -> None:
    msisdn, started = await charged_subscription(client, temporal_env, "booked")
    key = unsettled_refund(engine, started)
    [charge] = [t for t in simulator.core.books[CARRIER].by_reference.values()
                if t.msisdn == msisdn]
    refund = dataclasses.replace(charge, server_reference=f"{charge.server_reference}-r",
                                 client_correlator=key, kind="refund",
                                 original_reference=charge.server_reference)
    reports.extra[(CARRIER, today())] = [refund]
    reports.final[(CARRIER, today())] = True
    result = await run(reconciler(engine, settings, reports), today())
    assert key not in {s.idempotency_key for s in result.settled}
    assert operation(engine, key).state == OperationState.UNSETTLED
    assert entries(engine, key) == []
    [item] = items_for(engine, key, today())
    assert (item.kind, item.resolution) == (ItemKind.MISSING, None)


async def test_an_unsettled_refund_missing_from_the_final_report_is_reported(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, reports: TamperedReports,
) -> None:
    _, started = await charged_subscription(client, temporal_env, "absent")
    key = unsettled_refund(engine, started)
    reports.final[(CARRIER, today())] = True
    await run(reconciler(engine, settings, reports), today())
    assert operation(engine, key).state == OperationState.UNSETTLED
    assert entries(engine, key) == []
    assert [(i.kind, i.resolution) for i in items_for(engine, key, today())] == [
        (ItemKind.UNSETTLED, None)]


# -- 5. running it twice, and a report corrected later -------------------------------------------


async def test_two_runs_at_once_settle_once_and_book_one_entry(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, reports: TamperedReports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two runs of the same carrier and day at once (a retried activity whose first attempt is
    still running, another worker): one ledger row, one decision each, both runs end."""
    msisdn, started, key, booked = await unsettled_charge(
        client, simulator, temporal_env, monkeypatch, "twice-at-once")
    _, never_started, never_key, _ = await unsettled_charge(
        client, simulator, temporal_env, monkeypatch, "twice-at-once-never", debited=False)
    for s in (started, never_started):
        await client.cancel_subscription(s.subscription_id)
    reports.final[(CARRIER, today())] = True
    first, second = reconciler(engine, settings, reports), reconciler(engine, settings, reports)
    results = await asyncio.gather(run(first, today()), run(second, today()),
                                   return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, failed
    outputs = [r for r in results if isinstance(r, ReconciliationOutput)]
    decided = [(s.idempotency_key, s.resolution) for o in outputs for s in o.settled
               if s.idempotency_key in (key, never_key)]
    assert sorted(decided) == sorted([(key, "reconciled"), (never_key, "not_charged")])
    assert [e.kind for e in entries(engine, key)] == [LedgerKind.RECONCILED]
    assert entries(engine, never_key) == []
    assert [(i.kind, i.resolution) for i in items_for(engine, key, today())] == [
        (ItemKind.MISSING, Resolution.RECONCILED)]
    await books_match(simulator, engine, msisdn, started.subscription_id)


async def test_a_debit_a_final_report_left_out_is_flagged_when_the_carrier_corrects_it(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, reports: TamperedReports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The carrier's final report left our debit out (its mistake): the charge is closed as
    not charged, as designed. The carrier republishes the day with it: the debit is listed
    for an operator, never silently dropped (and never booked twice)."""
    _, started, key, booked = await unsettled_charge(
        client, simulator, temporal_env, monkeypatch, "corrected")
    assert booked is not None
    await client.cancel_subscription(started.subscription_id)
    reports.dropped.add(booked.server_reference)
    reports.final[(CARRIER, today())] = True
    activities = reconciler(engine, settings, reports)
    await run(activities, today())
    assert operation(engine, key).carrier_code == "NOT_CHARGED"
    reports.dropped.clear()
    await run(activities, today())
    assert entries(engine, key) == []
    assert (ItemKind.MISSING, None) in {(i.kind, i.resolution)
                                        for i in items_for(engine, key, today())}
    assert unresolved_lines(engine, key)


# -- 6. what a reconciled charge means afterwards ------------------------------------------------


async def test_a_reconciled_entry_is_traced_like_any_ledger_entry(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, reports: TamperedReports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, started, key, booked = await unsettled_charge(
        client, simulator, temporal_env, monkeypatch, "traced")
    assert booked is not None
    await client.cancel_subscription(started.subscription_id)
    reports.final[(CARRIER, today())] = True
    await run(reconciler(engine, settings, reports), today())
    [entry] = entries(engine, key)
    assert entry.kind == LedgerKind.RECONCILED
    with Session(engine) as session:
        documents = session.exec(select(OutboxEntry).where(
            OutboxEntry.doc_id == f"ledger-{entry.id}")).all()
    assert documents, f"no traceability document for ledger entry {entry.id} ({key})"


@pytest.mark.xfail(strict=True, reason=(
    "FINDING: a reconciled cycle cannot be refunded: starter._check_refundable and "
    "BillingActivities._refund_target find the charge through ledger.charge_for_cycle / "
    "charge_refunded_by, which only accept kind CHARGE, so a `reconciled` debit (counted as "
    "money taken by rules/spend.py and chaos/books.py) answers 'has no charge for cycle 1'"))
async def test_a_reconciled_cycle_can_be_refunded_by_request(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, reports: TamperedReports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    msisdn, started, key, booked = await unsettled_charge(
        client, simulator, temporal_env, monkeypatch, "refund-reconciled")
    assert booked is not None
    await client.cancel_subscription(started.subscription_id)
    reports.final[(CARRIER, today())] = True
    await run(reconciler(engine, settings, reports), today())
    assert [e.kind for e in entries(engine, key)] == [LedgerKind.RECONCILED]
    refunded = await client.refund(started.subscription_id, 1)
    assert refunded.outcome == "succeeded"
    assert net_taken(engine, started.subscription_id, 1) == 0
    await books_match(simulator, engine, msisdn, started.subscription_id)


async def test_a_reconciled_success_is_delivered_or_refunded_on_a_ruled_subscription(
    temporal_env: WorkflowEnvironment, engine: Engine, settings: Settings, worker: Any,
    simulator: Simulator, game_backend: GameBackendServer, queue: str,
) -> None:
    carrier_id = "de-nordnetz"
    client = ruled_client(temporal_env, engine, settings, rules_with(opt_in="none"),
                          short_settling(carrier_id, 60))
    msisdn = new_msisdn(carrier_id, f"recon-attack-ruled-{uuid.uuid4()}")
    await simulator.fault(carrier_id, "timeout_after_debit", msisdn, delay_seconds=2)
    await simulator.fault(carrier_id, "lookup_error", count=20)
    due = await next_weekday(temporal_env, "Europe/Berlin", 11)
    started = await subscribe_to(client, f"{carrier_id}-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    state = await until_state(temporal_env, client.handle(sid), lambda s: bool(s.recent_cycles),
                              step=timedelta(minutes=1), rounds=60)
    assert state.recent_cycles[-1].outcome == "unsettled"
    simulator.core.faults.clear()
    [charge] = operations_of(engine, sid, LedgerKind.CHARGE)
    await simulator.control("reports/close", {"carrier": carrier_id,
                                              "date": today().isoformat()})
    result = await reconcile_now(temporal_env.client, queue, today(), carrier_id)
    assert (charge.idempotency_key, "reconciled") in {
        (s.idempotency_key, s.resolution) for s in result.settled}
    await temporal_env.sleep(timedelta(hours=6))
    grants = [g for g in await grants_of(game_backend, started.key_prefix)
              if g["grant_id"] == f"{charge.idempotency_key}-d"]
    taken = net_taken(engine, sid, 1)
    described = await client.handle(sid).describe()
    if described.status is not None and described.status.name == "RUNNING":
        await client.cancel_subscription(sid)
    await books_match(simulator, engine, msisdn, sid, carrier_id)
    assert grants or taken == 0, (
        f"paid {taken} (reconciled), nothing delivered and nothing refunded")
