"""`make bench`: billing throughput on the dev server against a no-op timer+activity ceiling.

Both phases run the same shape of load on the same server: N workflows, each waking on a
durable timer every PERIOD seconds and running one activity. The ceiling's activity does
nothing; billing's charges the carrier simulator over HTTP and commits the ledger. Throughput
is counted over a steady-state window after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import func
from sqlmodel import Session, select
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Worker

from bench.noop import COMPLETIONS, NoopCycleWorkflow, noop
from carriers.loader import default_registry
from devstack import Stack
from models.db import make_engine, migrate
from models.seed import seed_reference_data
from models.tables import LedgerEntry, Period, PricePoint
from settings import PROJECT_ROOT, Settings
from starter import StartSubscriptionRequest, SubscriptionClient

T = TypeVar("T")

DATA_DIR = PROJECT_ROOT / ".data" / "bench"
SIM_PORT = 8711
SMPP_PORT = 2785
TEMPORAL_PORT = 7243

BILLABLE = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED: "workflow start",
    EventType.EVENT_TYPE_TIMER_STARTED: "timer",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED: "signal",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED: "update",
    EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES: "search-attribute upsert",
}


async def gather_limited(limit: int, coroutines: list[Awaitable[T]]) -> list[T]:
    gate = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[T]) -> T:
        async with gate:
            return await coro

    return await asyncio.gather(*(one(c) for c in coroutines))


async def run_ceiling(client: Client, args: argparse.Namespace) -> float:
    queue = f"bench-noop-{uuid.uuid4().hex[:6]}"
    async with Worker(client, task_queue=queue, workflows=[NoopCycleWorkflow], activities=[noop],
                      max_concurrent_activities=200, max_concurrent_workflow_tasks=200):
        handles = await gather_limited(50, [
            client.start_workflow(NoopCycleWorkflow.run, args.period, id=f"noop-{queue}-{i}",
                                  task_queue=queue)
            for i in range(args.subscriptions)
        ])
        await asyncio.sleep(args.warmup)
        start = time.time()
        await asyncio.sleep(args.window)
        end = time.time()
        done = sum(1 for t in COMPLETIONS if start <= t < end)
        await gather_limited(50, [h.signal(NoopCycleWorkflow.stop) for h in handles])
        await gather_limited(50, [h.result() for h in handles])
    return done / (end - start)


async def history_figures(
    handles: list[WorkflowHandle[Any, Any]], charges: int
) -> tuple[float, float, str]:
    events = 0
    actions: Counter[str] = Counter()
    for handle in handles:
        async for event in handle.fetch_history_events():
            events += 1
            kind = BILLABLE.get(event.event_type)
            if kind:
                actions[kind] += 1
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                actions["activity attempt"] += event.activity_task_started_event_attributes.attempt
    detail = ", ".join(f"{k} {v / max(charges, 1):.2f}" for k, v in sorted(actions.items()))
    return events / max(charges, 1), sum(actions.values()) / max(charges, 1), detail


async def run_billing(client: Client, stack: Stack, args: argparse.Namespace,
                      simulator_urls: dict[str, str]) -> dict[str, object]:
    db_path = DATA_DIR / "billing.db"
    for suffix in ("", "-wal", "-shm"):
        (DATA_DIR / f"billing.db{suffix}").unlink(missing_ok=True)
    db_url = f"sqlite:///{db_path}"
    registry = default_registry()
    migrate(db_url)
    engine = make_engine(db_url)
    seed_reference_data(engine, registry)
    # a bench-only plan with the benchmark's period
    with Session(engine) as session:
        session.merge(PricePoint(id="bench-plan", product_id="game-pass", carrier_id="fr-azur",
                                 amount_minor=1, currency="EUR", period=Period.INTERVAL,
                                 interval_seconds=int(args.period), retry_schedule_seconds="5"))
        session.commit()
    queue = f"bench-billing-{uuid.uuid4().hex[:6]}"
    env = stack.env(CB_DATABASE_URL=db_url, CB_SIMULATOR_URLS=json.dumps(simulator_urls),
                    CB_TASK_QUEUE=queue, CB_TEMPORAL_ADDRESS=f"127.0.0.1:{TEMPORAL_PORT}")
    stack.start_worker("bench-worker", env)
    settings = Settings(database_url=db_url, task_queue=queue,
                        temporal_address=f"127.0.0.1:{TEMPORAL_PORT}")
    subscriptions = SubscriptionClient(client, engine, registry, settings.task_queue)
    started = await gather_limited(20, [
        subscriptions.start_subscription(StartSubscriptionRequest(
            msisdn=f"+3361{i:07d}", product_id="game-pass", amount_minor=1, currency="EUR",
            period=Period.INTERVAL, carrier_id="fr-azur"))
        for i in range(args.subscriptions)
    ])
    await asyncio.sleep(args.warmup)
    start = datetime.now(UTC)
    await asyncio.sleep(args.window)
    end = datetime.now(UTC)
    stack.check_alive()
    # a signal, not the cancel update: under overload an update waits behind the backlog
    await gather_limited(50, [subscriptions.handle(s.subscription_id).signal("request_cancel")
                              for s in started])
    with Session(engine) as session:
        rows = session.exec(select(LedgerEntry.due_at, LedgerEntry.committed_at)).all()
        total_charges = session.exec(select(func.count()).select_from(LedgerEntry)).one()
    in_window = []
    for due, committed in rows:
        committed = committed.replace(tzinfo=UTC) if committed.tzinfo is None else committed
        due = due.replace(tzinfo=UTC) if due.tzinfo is None else due
        if start <= committed < end:
            in_window.append((committed - due).total_seconds())
    sample = started[: args.history_sample]
    sample_handles = [subscriptions.handle(s.subscription_id) for s in sample]
    with Session(engine) as session:
        sample_charges = session.exec(
            select(func.count()).select_from(LedgerEntry).where(
                LedgerEntry.subscription_id.in_([s.subscription_id for s in sample]))  # type: ignore[attr-defined]
        ).one()
    events, actions, detail = await history_figures(sample_handles, sample_charges)
    latencies = sorted(in_window)
    return {
        "rate": len(in_window) / (end - start).total_seconds(),
        "charges": total_charges,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"),
        "events": events,
        "actions": actions,
        "detail": detail,
    }


async def main_async(args: argparse.Namespace, stack: Stack) -> None:
    print(f"starting the Temporal dev server (persistence: {args.persistence}) and the simulator")
    stack.start_temporal(port=TEMPORAL_PORT, ui_port=TEMPORAL_PORT + 1000,
                         persistence=args.persistence)
    simulator_urls = stack.start_simulator(SIM_PORT, SMPP_PORT, default_balance="1000000")
    client = await Client.connect(f"127.0.0.1:{TEMPORAL_PORT}")
    print(f"ceiling: {args.subscriptions} no-op workflows, timer every {args.period}s, "
          f"warm-up {args.warmup}s, window {args.window}s")
    ceiling = await run_ceiling(client, args)
    print(f"ceiling: {ceiling:.1f} timer+activity cycles/s")
    print(f"billing: {args.subscriptions} subscriptions, charge every {args.period}s")
    billing = await run_billing(client, stack, args, simulator_urls)
    rate = float(billing["rate"])  # type: ignore[arg-type]
    print()
    print(f"persistence                    : dev server, {args.persistence}")
    print(f"no-op ceiling                  : {ceiling:.1f} cycles/s")
    print(f"billing                        : {rate:.1f} charges/s "
          f"({billing['charges']} charges in all)")
    print(f"billing/ceiling ratio          : {rate / ceiling:.2f}")
    print(f"history events per charge      : {billing['events']:.1f} "
          f"(first {args.history_sample} subscriptions, whole histories incl. start and cancel)")
    print(f"billable actions per charge    : {billing['actions']:.2f} ({billing['detail']})")
    print(f"timer fire -> ledger commit    : p50 {billing['p50']:.3f}s  p99 {billing['p99']:.3f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscriptions", type=int, default=1000)
    parser.add_argument("--period", type=float, default=5.0, help="seconds between charges")
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--window", type=float, default=40.0)
    parser.add_argument("--history-sample", type=int, default=50)
    parser.add_argument("--persistence", choices=["memory", "sqlite", "wal"], default="wal")
    args = parser.parse_args()
    stack = Stack(DATA_DIR)
    try:
        asyncio.run(main_async(args, stack))
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
