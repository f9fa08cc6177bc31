"""`make bench-scale`: many subscriptions on one machine, most of them asleep.

``--subscriptions`` (10 000) subscriptions: all but ``--hot`` (500) on a monthly plan whose
first charge is a month away (a timer each, nothing else), the hot set on an interval plan
charged every ``--period`` seconds (10). Everything is started through the platform's client,
spread over the worker processes the server gives their tasks to. Then, over ``--window``
seconds of the hot set's billing:

* the hot set's charges per second and due → ledger commit latency;
* each worker's resident memory (``VmRSS``), and per subscription;
* bytes per subscription in the Temporal database (SQLite file and its WAL) and in ours;
* events per run of a sleeping and of a hot subscription (histories stay bounded: a run
  continues as new every ``cycles_per_run`` cycles).

Every phase is bounded (``--start-timeout``, ``--deadline``); the figures go to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlmodel import Session, select

from bench.billing import (
    BENCH_AMOUNT,
    DATA_DIR,
    Bench,
    aware,
    bounded,
    each,
    progress,
    run_bench,
)
from bench.report import line, percentile, seconds_pair
from carriers.numbers import sample_msisdn
from devstack import Stack
from models.tables import Carrier, LedgerEntry, LedgerKind, Period, PricePoint
from starter import StartedSubscription, StartSubscriptionRequest


def rss_bytes(pid: int) -> int:
    for text in Path(f"/proc/{pid}/status").read_text().splitlines():
        if text.startswith("VmRSS:"):
            return int(text.split()[1]) * 1024
    return 0


def file_bytes(path: Path) -> int:
    return sum(Path(f"{path}{suffix}").stat().st_size
               for suffix in ("", "-wal") if Path(f"{path}{suffix}").exists())


class Scale(Bench):
    def seed_monthly(self) -> None:
        with Session(self.engine) as session:
            for carrier in self.carriers:
                row = session.get(Carrier, carrier.id)
                assert row is not None, carrier.id
                session.merge(PricePoint(
                    id=f"bench-monthly-{carrier.id}", product_id="game-pass",
                    carrier_id=carrier.id, amount_minor=BENCH_AMOUNT, currency=row.currency,
                    period=Period.MONTHLY))
            session.commit()

    def requests(self, count: int, period: Period, first_at: datetime, spread_seconds: float
                 ) -> list[StartSubscriptionRequest]:
        made = []
        for i in range(count):
            carrier = self.carriers[i % len(self.carriers)]
            made.append(StartSubscriptionRequest(
                msisdn=sample_msisdn(carrier, self.registry, self.rng, self.taken),
                product_id="game-pass", amount_minor=BENCH_AMOUNT,
                currency=self.registry.country_of(carrier.id).currency, period=period,
                carrier_id=carrier.id,
                first_charge_at=first_at + timedelta(seconds=spread_seconds * i / count)))
        return made

    async def start_all(self, requests: Sequence[StartSubscriptionRequest]
                        ) -> list[StartedSubscription]:
        return await bounded(each(20, requests, self.subscriptions.start_subscription),
                             self.args.start_timeout, "starting subscriptions")

    async def events_per_run(self, workflow_id: str) -> int:
        handle = self.client.get_workflow_handle(workflow_id)
        return len([e async for e in handle.fetch_history_events()])


async def main_async(args: argparse.Namespace, stack: Stack) -> list[str]:
    scale = Scale(args, stack)
    await scale.setup()
    scale.seed_monthly()
    temporal_db = DATA_DIR / "temporal.db"
    ours_db = DATA_DIR / "billing.db"
    before = {"temporal": file_bytes(temporal_db), "ours": file_bytes(ours_db)}
    rss_before = {name: rss_bytes(scale._pid(name)) for name in scale.worker_names}

    cold_count = args.subscriptions - args.hot
    progress(f"starting {cold_count} monthly subscriptions (first charge in 30 days)")
    began = time.monotonic()
    cold = await scale.start_all(scale.requests(
        cold_count, Period.MONTHLY, datetime.now(UTC) + timedelta(days=30), 3600.0))
    start_rate = cold_count / (time.monotonic() - began)
    lead = args.hot / 20.0 + 5.0
    progress(f"starting {args.hot} subscriptions charged every {args.period} s")
    hot = await scale.start_all(scale.requests(
        args.hot, Period.INTERVAL, datetime.now(UTC) + timedelta(seconds=lead), args.period))
    await asyncio.sleep(lead + args.period + 2.0)
    scale.stack.check_alive()
    window_began = datetime.now(UTC)
    await asyncio.sleep(args.window)
    window_ended = datetime.now(UTC)
    scale.stack.check_alive()
    rss_after = {name: rss_bytes(scale._pid(name)) for name in scale.worker_names}
    after = {"temporal": file_bytes(temporal_db), "ours": file_bytes(ours_db)}
    hot_ids = [s.subscription_id for s in hot]
    with Session(scale.engine) as session:
        rows = session.exec(select(LedgerEntry.due_at, LedgerEntry.committed_at).where(
            LedgerEntry.kind == LedgerKind.CHARGE, LedgerEntry.subscription_id >= min(hot_ids),
            LedgerEntry.subscription_id <= max(hot_ids))).all()
    latencies = [(aware(c) - aware(d)).total_seconds() for d, c in rows
                 if window_began <= aware(c) < window_ended]
    rate = len(latencies) / (window_ended - window_began).total_seconds()
    cold_events = await scale.events_per_run(cold[0].workflow_id)
    hot_events = await scale.events_per_run(hot[0].workflow_id)
    total = args.subscriptions
    rss_total = sum(rss_after.values())
    out = [
        line("subscriptions", f"{total} ({cold_count} monthly, first charge in 30 days; "
                              f"{args.hot} charged every {args.period} s)"),
        line("worker processes", f"{args.workers}"),
        line("start rate", f"{start_rate:.0f}/s through the platform's client"),
        line("hot set billed", f"{rate:.1f} charges/s (demand {args.hot / args.period:.0f}/s), "
                               f"due → ledger commit {seconds_pair(latencies)}"),
        line("hot set p99", f"{percentile(latencies, 99):.3f} s"),
        line("worker rss", ", ".join(
            f"{name} {rss_before[name] / 2**20:.0f} → {rss_after[name] / 2**20:.0f} MiB"
            for name in scale.worker_names)),
        line("worker rss per subscription", f"{rss_total / total / 1024:.1f} KiB "
                                            f"(all workers' RSS over all subscriptions)"),
        line("temporal database per subscription",
             f"{(after['temporal'] - before['temporal']) / total / 1024:.1f} KiB "
             f"(SQLite file and WAL growth)"),
        line("our database per subscription",
             f"{(after['ours'] - before['ours']) / total / 1024:.1f} KiB "
             f"(rows, indexes, outbox; the hot set's charges included)"),
        line("events in a sleeping subscription's run", str(cold_events)),
        line("events in a hot subscription's run", f"{hot_events} (continues as new every "
                                                   f"24 cycles)"),
    ]
    progress("cancelling the hot set")
    await bounded(each(50, hot, scale._signal_cancel), args.start_timeout, "cancelling")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscriptions", type=int, default=10_000)
    parser.add_argument("--hot", type=int, default=500, help="subscriptions on a short period")
    parser.add_argument("--period", type=int, default=10, help="the hot set's seconds a charge")
    parser.add_argument("--window", type=float, default=40.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--carriers", default="fr-azur,fr-lumiere,de-rheinfunk,es-iberica")
    parser.add_argument("--persistence", choices=["memory", "sqlite", "wal"], default="wal")
    parser.add_argument("--queue-charges", action="store_true")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--deadline", type=float, default=1200.0)
    args = parser.parse_args(argv)
    if not 0 < args.hot < args.subscriptions:
        parser.error("--hot must be between 0 and --subscriptions")
    return args


def main() -> None:
    run_bench(main_async, parse_args(), "the scale run")


if __name__ == "__main__":
    main()
