"""`make demo`: the whole platform on this machine, billing a few hundred subscriptions live.

Starts the Temporal dev server (UI on http://localhost:8233), the carrier simulators (with
random faults), the game backend, the callback receiver and a worker; starts subscriptions on
10-second demo plans across the registry's countries, each billed under its country's rules at
this moment's local time (countries outside their charging hours are postponed, not charged);
subscribers type back the opt-in codes they receive by SMS; a few are short of credit (retries,
the price ladder), a few are refused by the game (their payment is refunded), a few ask for a
refund. Shows progress, then prints a summary counted from the ledger and the workflows and
checked against the simulator's books. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from pydantic import SecretStr
from rich.console import Console
from rich.live import Live
from rich.table import Table
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError

from carriers.loader import CarrierConfig, Registry, default_registry
from carriers.numbers import sample_msisdn
from devstack import Stack
from models.db import make_engine, migrate
from models.money import format_major, from_decimal, to_decimal
from models.seed import seed_reference_data
from models.tables import (
    CarrierInteraction,
    CarrierOperation,
    LedgerEntry,
    LedgerKind,
    OperationState,
    Period,
    SmppSubmission,
    Subscription,
)
from reconciliation.report import report_for
from reconciliation.schedule import reconcile_now
from rules import windows
from rules.resolve import resolve_rules
from rules.types import ChargingRules
from settings import PROJECT_ROOT, Settings
from starter import StartSubscriptionRequest, SubscriptionClient, SubscriptionRequestError
from traceability.indexer import OutboxDrainer, indexed_counts, make_client
from workflows.subscription import SubscriptionWorkflow
from workflows.types import BillingState

DATA_DIR = PROJECT_ROOT / ".data" / "demo"
SIM_PORT = 8701
# the SMSC that sends the platform's texts (opt-in codes, receipts) to every carrier's numbers
NOTICE_CARRIER = "gb-mersey"
REFUNDS_ASKED = 5
console = Console(width=None if sys.stdout.isatty() else 110)


@dataclass
class DemoPlan:
    carrier: CarrierConfig
    product_id: str
    amount_minor: int
    currency: str
    rules: ChargingRules
    # the country's charging window is open at this moment
    open_now: bool


def demo_plans(registry: Registry, now: datetime) -> list[DemoPlan]:
    plans = []
    for carrier in registry.carriers.values():
        currency = registry.currency_of(carrier.id)
        country = registry.country_of(carrier.id)
        for price in carrier.price_points:
            if price.period is not Period.INTERVAL:
                continue
            amount = registry.amount_minor(carrier.id, price)
            rules = resolve_rules(country.code, carrier.id, price.product, amount,
                                  Period.INTERVAL.value, carrier.timezone)
            if rules.blocked:
                continue
            plans.append(DemoPlan(carrier, price.product, amount, currency, rules,
                                  windows.next_allowed(now, rules) is None))
    return plans


def population(plans: list[DemoPlan], count: int, rng: random.Random) -> list[DemoPlan]:
    """Mostly plans whose country may be charged now; a sixth outside its hours, to show
    charges postponed by the rules rather than sent."""
    open_plans = [p for p in plans if p.open_now] or plans
    closed = [p for p in plans if not p.open_now]
    chosen = []
    for index in range(count):
        pool = closed if closed and index % 6 == 5 else open_plans
        chosen.append(pool[(index // 6 + index) % len(pool)] if pool is open_plans
                      else rng.choice(pool))
    return chosen


def progress_table(engine: Engine, started: int, elapsed: float, seconds: int) -> Table:
    with Session(engine) as session:
        charges = session.exec(select(func.count()).select_from(LedgerEntry)).one()
        outcomes = dict(session.exec(
            select(CarrierInteraction.outcome, func.count()).group_by(CarrierInteraction.outcome)
        ).all())
        revenue = session.exec(
            select(LedgerEntry.currency, func.sum(LedgerEntry.amount_minor))
            .where(LedgerEntry.kind == LedgerKind.CHARGE).group_by(LedgerEntry.currency)
        ).all()
    table = Table(title=f"Billing live — {elapsed:4.0f}s of {seconds}s — UI http://localhost:8233")
    for column in ("subscriptions", "charges ok", "insufficient funds", "carrier faults",
                   "rejected", "revenue"):
        table.add_column(column, justify="right")
    faults = outcomes.get("unknown", 0) + outcomes.get("transient", 0)
    table.add_row(
        str(started), str(charges), str(outcomes.get("insufficient_funds", 0)), str(faults),
        str(outcomes.get("rejected", 0)),
        "  ".join(f"{format_major(int(total), cur)} {cur}" for cur, total in revenue),
    )
    return table


@dataclass
class DemoSubscriber:
    subscription_id: int
    msisdn: str
    plan: DemoPlan
    # types back the opt-in code it receives (a few never do)
    confirms: bool = True
    confirmed: bool = False


async def start_all(client: SubscriptionClient, registry: Registry, count: int,
                    sim_url: str, game_url: str, rng: random.Random, now: datetime
                    ) -> list[DemoSubscriber]:
    plans = population(demo_plans(registry, now), count, rng)
    taken: set[str] = set()
    started_subscribers: list[DemoSubscriber] = []
    async with httpx.AsyncClient(base_url=sim_url) as sim, \
            httpx.AsyncClient(base_url=game_url) as game:
        for plan in plans:
            msisdn = sample_msisdn(plan.carrier, registry, rng, taken)
            roll = rng.random()
            if plan.rules.balance_policy == "ladder" and roll < 0.3:
                # enough for a lower price point, not the full price: a partial payment
                balance = to_decimal(plan.rules.ladder_minor[-1] + 1, plan.currency)
            elif roll < 0.1:  # short of credit: refused, retried on the country's schedule
                balance = to_decimal(plan.amount_minor * rng.randint(0, 1), plan.currency)
            else:
                balance = None
            if balance is not None:
                await sim.post("/_control/accounts", json={
                    "carrier": plan.carrier.id, "msisdn": msisdn, "balance": str(balance)})
            started = await client.start_subscription(StartSubscriptionRequest(
                msisdn=msisdn, product_id=plan.product_id, amount_minor=plan.amount_minor,
                currency=plan.currency, period=Period.INTERVAL, carrier_id=plan.carrier.id))
            if rng.random() < 0.03:  # the game has closed this player's account
                subscriber = await asyncio.to_thread(subscriber_id_of, client.engine,
                                                     started.subscription_id)
                await game.post("/_control/faults", json={
                    "kind": "refuse", "subscriber_ref": f"{client.deployment_id}-{subscriber}"})
            started_subscribers.append(DemoSubscriber(
                started.subscription_id, msisdn, plan, confirms=rng.random() > 0.04))
    return started_subscribers


def subscriber_id_of(engine: Engine, subscription_id: int) -> int:
    with Session(engine) as session:
        subscription = session.get(Subscription, subscription_id)
        assert subscription is not None
        return subscription.subscriber_id


PIN = re.compile(r"\b(\d{4,8})\b")


async def type_back_codes(client: SubscriptionClient, subscribers: list[DemoSubscriber],
                          sim_url: str) -> None:
    """What subscribers do with the code they receive by SMS: type it back (a few never)."""
    limiter = asyncio.Semaphore(20)
    async with httpx.AsyncClient(base_url=sim_url, timeout=10) as sim:

        async def type_back(subscriber: DemoSubscriber) -> None:
            async with limiter:
                texts = (await sim.get("/_control/sms", params={
                    "msisdn": subscriber.msisdn})).json()
                codes = [m.group(1) for t in texts if t["direction"] == "notice"
                         for m in [PIN.search(t["text"])] if m]
                if not codes:
                    return
                try:
                    await client.confirm_opt_in(subscriber.subscription_id, codes[-1])
                except SubscriptionRequestError:
                    pass  # not (or no longer) waiting for a code
                subscriber.confirmed = True

        while True:
            waiting = [s for s in subscribers if s.confirms and not s.confirmed]
            await asyncio.gather(*(type_back(s) for s in waiting), return_exceptions=True)
            await asyncio.sleep(1)


async def ask_for_refunds(client: SubscriptionClient, subscribers: list[DemoSubscriber],
                          how_many: int) -> int:
    """A few subscribers ask for half of a charge back; the workflow validates each."""
    done = 0
    for subscriber in subscribers:
        if done >= how_many:
            break
        if not subscriber.plan.carrier.protocol.startswith(("oneapi", "parlayx", "camara")):
            continue
        try:
            state = await client.handle(subscriber.subscription_id).query(
                SubscriptionWorkflow.state)
        except RPCError:
            continue
        paid = [c for c in state.recent_cycles if c.outcome == "succeeded"
                and c.amount_minor > 1 and not c.refunded_minor]
        if not paid:
            continue
        try:
            await asyncio.wait_for(client.request_refund(
                subscriber.subscription_id, paid[0].cycle, paid[0].amount_minor // 2,
                request_id=f"demo-{subscriber.subscription_id}-{paid[0].cycle}",
                reason="goodwill"), 30)
            done += 1
        except (SubscriptionRequestError, TimeoutError, RPCError, WorkflowUpdateFailedError):
            continue
    return done


async def summary(client: SubscriptionClient, engine: Engine,
                  subscribers: list[DemoSubscriber], sim_url: str) -> bool:
    """Prints the figures, counted from the ledger and the workflows' states, and whether the
    ledger equals the carrier simulator's books; True if it does."""
    states: list[BillingState] = []
    limiter = asyncio.Semaphore(20)

    async def state_of(sid: int) -> None:
        async with limiter:
            try:
                states.append(await asyncio.wait_for(
                    client.handle(sid).query(SubscriptionWorkflow.state), 10))
            except (RPCError, TimeoutError):
                pass

    await asyncio.gather(*(state_of(s.subscription_id) for s in subscribers))
    with Session(engine) as session:
        rows = session.execute(
            sa.select(col(LedgerEntry.carrier_id), col(LedgerEntry.currency),
                      col(LedgerEntry.kind), func.count(), func.sum(LedgerEntry.amount_minor))
            .group_by(col(LedgerEntry.carrier_id), col(LedgerEntry.currency),
                      col(LedgerEntry.kind))
        ).all()
    ledger: dict[tuple[str, str], dict[str, tuple[int, int]]] = defaultdict(dict)
    for carrier_id, currency, kind, count, total in rows:
        ledger[(carrier_id, currency)][str(kind)] = (int(count), int(total))
    books = httpx.get(f"{sim_url}/_control/books", timeout=30).json()
    open_charges = open_debits(engine, books, LedgerKind.CHARGE)
    open_refunds = open_debits(engine, books, LedgerKind.REFUND)
    table = Table(title="Summary (ledger checked against the carrier simulator's books)")
    for column in ("carrier", "currency", "charges", "refunds", "net", "carrier books",
                   "unsettled", "match"):
        table.add_column(column, justify="right")
    all_match = True
    for (carrier_id, currency), kinds in sorted(ledger.items()):
        charges, charged = kinds.get(LedgerKind.CHARGE.value, (0, 0))
        refunds, refunded = kinds.get(LedgerKind.REFUND.value, (0, 0))
        booked = {kind: sum((Decimal(t["amount"]) for t in books[carrier_id]["transactions"]
                             if t["kind"] == kind), Decimal(0)) for kind in ("charge", "refund")}
        unsettled = open_charges.get(carrier_id, Decimal(0))
        # every debit and credit is in the ledger, or listed as unsettled (a late result or
        # reconciliation settles it): nothing lost, nothing twice
        match = (to_decimal(charged, currency) + unsettled == booked["charge"]
                 and to_decimal(refunded, currency) + open_refunds.get(carrier_id, Decimal(0))
                 == booked["refund"])
        all_match &= match
        net = booked["charge"] - booked["refund"]
        table.add_row(carrier_id, currency, str(charges), str(refunds),
                      format_major(charged - refunded, currency),
                      format_major(from_decimal(net, currency), currency),
                      format_major(from_decimal(unsettled, currency), currency)
                      if unsettled else "", "yes" if match else "NO")
    console.print(table)
    figures = {
        "subscriptions": len(subscribers),
        "charges": sum(k.get(LedgerKind.CHARGE.value, (0, 0))[0] for k in ledger.values()),
        "partial payments": sum(st.partial_payments for st in states),
        "retries": sum(st.insufficient_funds_retries for st in states),
        "postponed": sum(st.postponements for st in states),
        "refused by rule": sum(st.refusals for st in states),
        "opt-ins confirmed": sum(1 for st in states if st.opted_in),
        "delivered": sum(st.deliveries for st in states),
        "refunds": sum(k.get(LedgerKind.REFUND.value, (0, 0))[0] for k in ledger.values()),
        "unsettled": sum(st.unsettled_count for st in states),
    }
    for name, value in figures.items():
        console.print(f"{name}: {value}")
    console.print(f"books match: {'yes' if all_match else 'no'}")
    return all_match


def open_debits(engine: Engine, books: dict[str, Any], kind: LedgerKind) -> dict[str, Decimal]:
    """Per carrier, what the carrier booked for operations we have not settled (unsettled or
    still settling), found in its books by our key (SMPP: by the message id we were given)."""
    with Session(engine) as session:
        open_ops = session.exec(select(CarrierOperation).where(
            CarrierOperation.kind == kind,
            col(CarrierOperation.state).in_([OperationState.UNSETTLED, OperationState.PENDING,
                                             OperationState.SENDING]))).all()
        message_ids = {(r.carrier_id, r.idempotency_key): r.message_id
                       for r in session.exec(select(SmppSubmission)).all()}
    amounts: dict[str, Decimal] = defaultdict(Decimal)
    for op in open_ops:
        keys = {op.idempotency_key}
        if message_ids.get((op.carrier_id, op.idempotency_key)):
            keys.add(f"smpp-{message_ids[(op.carrier_id, op.idempotency_key)]}")
        for t in books.get(op.carrier_id, {}).get("transactions", []):
            if t["kind"] == kind.value and t["clientCorrelator"] in keys:
                amounts[op.carrier_id] += Decimal(t["amount"])
    return dict(amounts)


async def reconcile_today(client: SubscriptionClient, subscribers: list[DemoSubscriber],
                          sim_url: str) -> str:
    """Each carrier's settlement report of today (closed early: the demo's day is short)
    against the ledger; the report's last line counts what stays mismatched."""
    today = datetime.now(UTC).date()
    carriers = sorted({s.plan.carrier.id for s in subscribers})
    async with httpx.AsyncClient(base_url=sim_url, timeout=10) as sim:
        for carrier_id in carriers:
            await sim.post("/_control/reports/close",
                           json={"carrier": carrier_id, "date": today.isoformat()})
    for carrier_id in carriers:
        try:
            await asyncio.wait_for(reconcile_now(client.client, client.task_queue, today,
                                                 carrier_id), RECONCILE_TIMEOUT_SECONDS)
        except (TimeoutError, RPCError) as exc:
            console.print(f"reconciliation of {carrier_id} did not finish: {exc!r}")
    report = await asyncio.to_thread(report_for, client.engine, today)
    return report.rstrip().splitlines()[-1]


RECONCILE_TIMEOUT_SECONDS = 60.0
CHROMIUM = "/usr/bin/chromium"


async def screenshot(url: str, path: Path) -> str:
    """The statistics page as a headless Chromium renders it (bounded in time)."""
    if not Path(CHROMIUM).exists():
        return f"not taken: {CHROMIUM} is missing (scripts/ensure-chromium.sh installs it)"
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        process = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
            "--window-size=1280,2200", "--virtual-time-budget=5000", f"--screenshot={path}",
            url, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            await asyncio.wait_for(process.wait(), 60)
        except TimeoutError:
            process.kill()
            return "not taken: chromium did not finish within 60 s"
    return str(path) if path.exists() else "not taken: chromium wrote nothing"


async def index_everything(engine: Engine, opensearch_url: str) -> tuple[int, int]:
    """Drains what the worker's drainer has not yet sent (bounded), then counts."""
    client = make_client(opensearch_url)
    drainer = OutboxDrainer(engine, client, refresh=True)
    deadline = time.monotonic() + INDEX_WAIT_SECONDS
    while time.monotonic() < deadline:
        if not await asyncio.to_thread(drainer.drain_once):
            break
    return await asyncio.to_thread(indexed_counts, engine, client)


INDEX_WAIT_SECONDS = 60.0
CANCEL_TIMEOUT_SECONDS = 30.0
SETTLE_WAIT_SECONDS = 30.0


async def cancel_all(client: SubscriptionClient, ids: list[int]) -> list[int]:
    """Cancels every subscription; a cancel waits for no charge, so each answers at once. The
    ones that do not answer within the bound are returned, never waited for."""
    limiter = asyncio.Semaphore(100)
    unanswered: list[int] = []

    async def cancel(sid: int) -> None:
        async with limiter:
            try:
                await asyncio.wait_for(client.cancel_subscription(sid), CANCEL_TIMEOUT_SECONDS)
            except (TimeoutError, RPCError, WorkflowUpdateFailedError):
                unanswered.append(sid)

    await asyncio.gather(*(cancel(sid) for sid in ids))
    return sorted(unanswered)


def _open_operations(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(CarrierOperation).where(
            col(CarrierOperation.state).in_([OperationState.SENDING, OperationState.PENDING]))
        ).one())


async def wait_for_settlement(engine: Engine, seconds: float) -> int:
    """Charges already sent go on settling after a cancel: wait for them, bounded."""
    deadline = time.monotonic() + seconds
    while (left := await asyncio.to_thread(_open_operations, engine)) and \
            time.monotonic() < deadline:
        await asyncio.sleep(1)
    return left


async def run(args: argparse.Namespace, stack: Stack) -> None:
    rng = random.Random(args.seed)
    registry = default_registry()
    db_path = DATA_DIR / "billing.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    db_url = f"sqlite:///{db_path}"

    console.print("starting Temporal dev server (SQLite in WAL mode under .data/demo) …")
    stack.start_temporal(persistence="wal")
    console.print("starting the carrier simulators (HTTP and SMSC) with 5% random faults …")
    simulator_urls = stack.start_simulator(SIM_PORT, chaos_rate=0.05, default_balance="1000")
    sim_url = simulator_urls["sim"]
    console.print("starting the game backend, OpenSearch (in memory) and the statistics page …")
    game_url = stack.start_game_backend()
    opensearch_url = stack.start_opensearch()
    statistics_url = stack.start_statistics(opensearch_url, db_url)
    settings = Settings(database_url=db_url, simulator_urls=simulator_urls,
                        carrier_secrets=stack.carrier_secrets, game_backend_url=game_url,
                        notice_carrier_id=NOTICE_CARRIER, opensearch_url=opensearch_url,
                        codec_keys={k: SecretStr(v) for k, v in stack.codec_keys.items()},
                        codec_current_key="dev")
    migrate(db_url)
    engine = make_engine(db_url)
    seed_reference_data(engine, registry)
    env = stack.env(CB_DATABASE_URL=db_url,
                    CB_SIMULATOR_URLS=json.dumps(simulator_urls),
                    CB_GAME_BACKEND_URL=game_url, CB_NOTICE_CARRIER_ID=NOTICE_CARRIER,
                    CB_OPENSEARCH_URL=opensearch_url)
    console.print("starting the codec server (payloads are encrypted; the UI decodes them), "
                  "the callback receiver and a worker …")
    stack.start_codec_server()
    stack.start_callback_receiver(env)
    stack.start_worker("worker", env)

    client = await SubscriptionClient.connect(settings)
    now = datetime.now(UTC)
    console.print(f"starting {args.subscriptions} subscriptions on 10-second demo plans, "
                  "each under its country's rules at this moment's local time …")
    subscribers = await start_all(client, registry, args.subscriptions, sim_url, game_url,
                                  rng, now)
    ids = [s.subscription_id for s in subscribers]
    typing = asyncio.create_task(type_back_codes(client, subscribers, sim_url))
    began = time.monotonic()
    refunds_asked = False
    try:
        with Live(progress_table(engine, len(ids), 0, args.seconds), console=console,
                  refresh_per_second=2) as live:
            while (elapsed := time.monotonic() - began) < args.seconds:
                stack.check_alive()
                await asyncio.sleep(1)
                if not refunds_asked and elapsed > args.seconds / 2:
                    refunds_asked = True
                    await ask_for_refunds(client, subscribers, REFUNDS_ASKED)
                live.update(progress_table(engine, len(ids), elapsed, args.seconds))
    except asyncio.CancelledError:  # the first Ctrl-C: wind down and still show the summary
        console.print("\nCtrl-C: winding down (Ctrl-C again stops at once) …")
    typing.cancel()
    console.print("cancelling the subscriptions …")
    cancel_began = time.monotonic()
    unanswered = await cancel_all(client, ids)
    console.print(f"cancelled {len(ids) - len(unanswered)} of {len(ids)} subscriptions in "
                  f"{time.monotonic() - cancel_began:.1f} s"
                  + (f"; {len(unanswered)} did not answer within {CANCEL_TIMEOUT_SECONDS} s: "
                     f"{unanswered[:10]}" if unanswered else ""))
    open_left = await wait_for_settlement(engine, SETTLE_WAIT_SECONDS)
    if open_left:
        console.print(f"{open_left} operations still settling after {SETTLE_WAIT_SECONDS} s: "
                      "they are counted as open below")
    await summary(client, engine, subscribers, sim_url)
    console.print(await reconcile_today(client, subscribers, sim_url))
    indexed, total = await index_everything(engine, opensearch_url)
    console.print(f"interactions indexed: {indexed} of {total}")
    console.print(f"statistics: {statistics_url}")
    if args.screenshot is not None:
        console.print(f"statistics screenshot: {await screenshot(statistics_url, args.screenshot)}")
    console.print("\nTemporal UI: [bold]http://localhost:8233[/bold]  "
                  "(try the query: SubscriptionStatus = 'cancelled' AND CountryCode = 'JP')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscriptions", type=int, default=300)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--screenshot", type=Path, default=None,
                        help="save the statistics page as a headless Chromium renders it")
    parser.add_argument("--no-hold", "--exit", dest="no_hold", action="store_true",
                        help="wind down and exit after the summary")
    args = parser.parse_args()
    stack = Stack(DATA_DIR)
    try:
        asyncio.run(run(args, stack))
        if not args.no_hold and sys.stdin.isatty():
            console.print("Everything is still running for the UI; Ctrl-C stops it.")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        console.print("\nCtrl-C: stopping …")
    finally:
        stack.stop()
        console.print(f"stopped; logs are in {DATA_DIR}")


if __name__ == "__main__":
    main()
