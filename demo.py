"""`make demo`: the whole platform on this machine, billing a few hundred subscriptions live.

Starts the Temporal dev server (UI on http://localhost:8233), the OneAPI carrier simulator
(with random faults), and a worker; starts subscriptions on 10-second demo plans across the
registry's carriers; shows progress; then prints a summary checked against the simulator's books.
Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
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
    PricePoint,
    SmppSubmission,
    Subscription,
)
from settings import PROJECT_ROOT, Settings
from starter import StartSubscriptionRequest, SubscriptionClient

DATA_DIR = PROJECT_ROOT / ".data" / "demo"
SIM_PORT = 8701
console = Console(width=None if sys.stdout.isatty() else 110)


@dataclass
class DemoPlan:
    carrier: CarrierConfig
    product_id: str
    amount_minor: int
    currency: str


def demo_plans(registry: Registry) -> list[DemoPlan]:
    plans = []
    for carrier in registry.carriers.values():
        currency = registry.currency_of(carrier.id)
        for price in carrier.price_points:
            if price.period is Period.INTERVAL:
                plans.append(DemoPlan(carrier, price.product,
                                      registry.amount_minor(carrier.id, price), currency))
    return plans


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


async def start_all(client: SubscriptionClient, registry: Registry, count: int,
                    sim_url: str, rng: random.Random) -> list[int]:
    plans = demo_plans(registry)
    taken: set[str] = set()
    ids: list[int] = []
    async with httpx.AsyncClient(base_url=sim_url) as sim:
        for index in range(count):
            plan = plans[index % len(plans)]
            msisdn = sample_msisdn(plan.carrier, registry, rng, taken)
            roll = rng.random()
            if roll < 0.12:  # a few subscribers run short of credit: retries, some fail
                balance = to_decimal(plan.amount_minor * rng.randint(0, 3), plan.currency)
                await sim.post("/_control/accounts", json={
                    "carrier": plan.carrier.id, "msisdn": msisdn, "balance": str(balance)})
            started = await client.start_subscription(StartSubscriptionRequest(
                msisdn=msisdn, product_id=plan.product_id, amount_minor=plan.amount_minor,
                currency=plan.currency, period=Period.INTERVAL, carrier_id=plan.carrier.id))
            ids.append(started.subscription_id)
    return ids


async def summary(client: SubscriptionClient, engine: Engine, ids: list[int],
                  sim_url: str) -> None:
    per_carrier: dict[str, Counter[str]] = defaultdict(Counter)
    limiter = asyncio.Semaphore(20)

    async def state_of(sid: int) -> None:
        async with limiter:
            view = await client.describe_subscription(sid)
        with Session(engine) as session:
            carrier = session.exec(
                select(PricePoint.carrier_id).join(Subscription)
                .where(Subscription.id == sid)).one()
        retried = sum(1 for c in view.recent_cycles if c["attempts"] > 1)
        per_carrier[carrier].update(failed=view.cycles_failed, retried=retried)

    await asyncio.gather(*(state_of(sid) for sid in ids))
    with Session(engine) as session:
        rows = session.exec(
            select(LedgerEntry.carrier_id, LedgerEntry.currency, func.count(),
                   func.sum(LedgerEntry.amount_minor))
            .where(LedgerEntry.kind == LedgerKind.CHARGE)
            .group_by(LedgerEntry.carrier_id, LedgerEntry.currency)
        ).all()
    books = httpx.get(f"{sim_url}/_control/books", timeout=30).json()
    open_amounts = open_debits(engine, books)
    table = Table(title="Summary (ledger checked against the carrier simulator's books)")
    for column in ("carrier", "currency", "charges ok", "cycles retried", "cycles failed",
                   "revenue", "carrier books", "unsettled", "match"):
        table.add_column(column, justify="right")
    all_match = True
    for carrier_id, currency, count, total in sorted(rows):
        booked = sum((Decimal(t["amount"]) for t in books[carrier_id]["transactions"]
                      if t["kind"] == "charge"), Decimal(0))
        unsettled = open_amounts.get(carrier_id, Decimal(0))
        # every debit is in the ledger, or listed as unsettled (a late result or
        # reconciliation settles it): nothing lost, nothing twice
        match = to_decimal(int(total), currency) + unsettled == booked
        all_match &= match
        counts = per_carrier.get(carrier_id, Counter())
        table.add_row(carrier_id, currency, str(count), str(counts["retried"]),
                      str(counts["failed"]), format_major(int(total), currency),
                      format_major(from_decimal(booked, currency), currency),
                      format_major(from_decimal(unsettled, currency), currency)
                      if unsettled else "", "yes" if match else "NO")
    console.print(table)
    console.print("ledger plus listed unsettled charges equals the carrier books to the cent"
                  if all_match else "[red]ledger and carrier books differ[/red]")


def open_debits(engine: Engine, books: dict[str, Any]) -> dict[str, Decimal]:
    """Per carrier, what the carrier debited for charges we have not settled (unsettled or
    still settling), found in its books by our key (SMPP: by the message id we were given)."""
    with Session(engine) as session:
        open_ops = session.exec(select(CarrierOperation).where(
            CarrierOperation.kind == LedgerKind.CHARGE,
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
            if t["kind"] == "charge" and t["clientCorrelator"] in keys:
                amounts[op.carrier_id] += Decimal(t["amount"])
    return dict(amounts)


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
    settings = Settings(database_url=db_url, simulator_urls=simulator_urls,
                        carrier_secrets=stack.carrier_secrets)
    migrate(db_url)
    engine = make_engine(db_url)
    seed_reference_data(engine, registry)
    env = stack.env(CB_DATABASE_URL=db_url,
                    CB_SIMULATOR_URLS=json.dumps(simulator_urls))
    console.print("starting the callback receiver and a worker …")
    stack.start_callback_receiver(env)
    stack.start_worker("worker", env)

    client = await SubscriptionClient.connect(settings)
    console.print(f"starting {args.subscriptions} subscriptions on 10-second demo plans …")
    ids = await start_all(client, registry, args.subscriptions, sim_url, rng)
    began = time.monotonic()
    try:
        with Live(progress_table(engine, len(ids), 0, args.seconds), console=console,
                  refresh_per_second=2) as live:
            while (elapsed := time.monotonic() - began) < args.seconds:
                stack.check_alive()
                await asyncio.sleep(1)
                live.update(progress_table(engine, len(ids), elapsed, args.seconds))
    except asyncio.CancelledError:  # the first Ctrl-C: wind down and still show the summary
        console.print("\nCtrl-C: winding down (Ctrl-C again stops at once) …")
    console.print("cancelling the subscriptions …")
    cancel_began = time.monotonic()
    unanswered = await cancel_all(client, ids)
    console.print(f"cancelled {len(ids) - len(unanswered)} of {len(ids)} subscriptions in "
                  f"{time.monotonic() - cancel_began:.1f} s"
                  + (f"; {len(unanswered)} did not answer within {CANCEL_TIMEOUT_SECONDS} s: "
                     f"{unanswered[:10]}" if unanswered else ""))
    open_left = await wait_for_settlement(engine, SETTLE_WAIT_SECONDS)
    if open_left:
        console.print(f"{open_left} charges still settling after {SETTLE_WAIT_SECONDS} s: "
                      "they are counted as open below")
    await summary(client, engine, ids, sim_url)
    console.print("\nTemporal UI: [bold]http://localhost:8233[/bold]  "
                  "(try the query: SubscriptionStatus = 'cancelled' AND CountryCode = 'JP')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscriptions", type=int, default=300)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-hold", action="store_true",
                        help="stop everything right after the summary")
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
