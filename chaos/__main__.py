"""python -m chaos [--subscriptions N] [--seconds S] [--phases ...] [--local-charges]

Runs the chosen phases against a real stack started for the run and prints one table row per
phase and exactly one closing line:

    chaos: <faults> faults, <charges> charges, <d> double, <l> lost, <u> unsettled

It exits 1 if any key (or cycle) was debited twice, a debit was lost, a ledger row has no
debit, an amount differs, or a phase ran past its bound; 3 if the whole run's watchdog fired.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import threading
import time
from pathlib import Path

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table
from temporalio.client import Client

from carriers.loader import default_registry
from chaos.books import Check
from chaos.scenarios import (
    PHASES,
    Config,
    Context,
    PhaseResult,
    check,
    quiesce,
    run_phase,
    write_evidence,
)
from chaos.stack import ChaosStack
from models.db import normalize_url
from settings import PROJECT_ROOT
from starter import SubscriptionClient

DATA_DIR = PROJECT_ROOT / ".data" / "chaos"
console = Console(width=None if sys.stdout.isatty() else 140)
log = logging.getLogger("chaos")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscriptions", type=int, default=32, help="per phase")
    parser.add_argument("--seconds", type=float, default=45.0, help="billing time per phase")
    parser.add_argument("--quiesce-seconds", type=float, default=75.0)
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated, from: {', '.join(PHASES)}")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--local-charges", action="store_true",
                        help="subscriptions start their charges as local activities "
                             "(Settings.local_charges), overflowing to the carrier queues")
    args = parser.parse_args(argv)
    unknown = [p for p in args.phases.split(",") if p not in PHASES]
    if unknown:
        parser.error(f"unknown phases {unknown}; choose from {', '.join(PHASES)}")
    return args


def table(results: list[PhaseResult], final: Check | None) -> Table:
    out = Table(title="chaos: carriers' books vs ledger and operation records")
    for column in ("phase", "subs", "faults", "charges", "ledger", "double", "lost", "phantom",
                   "mismatch", "unsettled", "open", "seconds", "result"):
        out.add_column(column, justify="left" if column in ("phase", "result") else "right")
    for r in results:
        c = r.check
        out.add_row(r.name, str(r.subscriptions), str(r.faults), str(c.charges),
                    str(c.ledger_charges), str(c.double), str(c.lost), str(c.phantom),
                    str(c.mismatch), f"{c.unsettled} ({c.unsettled_with_debit} debited)",
                    f"{c.open} ({c.open_with_debit} debited)", f"{r.seconds:.0f}",
                    "TIMEOUT" if r.timed_out else "FAIL" if c.failed else "ok")
    if final is not None:
        out.add_row("all (final)", str(sum(r.subscriptions for r in results)),
                    str(sum(r.faults for r in results)), str(final.charges),
                    str(final.ledger_charges), str(final.double), str(final.lost),
                    str(final.phantom), str(final.mismatch),
                    f"{final.unsettled} ({final.unsettled_with_debit} debited)",
                    f"{final.open} ({final.open_with_debit} debited)", "",
                    "FAIL" if final.failed else "ok")
    return out


async def run(args: argparse.Namespace, stack: ChaosStack) -> tuple[list[PhaseResult], Check]:
    registry = stack.registry
    engine = sa.create_engine(normalize_url(stack.database_url), pool_pre_ping=True,
                              connect_args={"connect_timeout": 5})
    temporal = await asyncio.wait_for(Client.connect(stack.temporal_address), 30)
    client = SubscriptionClient(temporal, engine, registry, "subscription-billing",
                                local_charges=args.local_charges)
    config = Config(subscriptions=args.subscriptions, seconds=args.seconds,
                    quiesce_seconds=args.quiesce_seconds, seed=args.seed)
    ctx = Context(stack, client, engine, registry, config, random.Random(args.seed))
    results: list[PhaseResult] = []
    for name in args.phases.split(","):
        console.print(f"[bold]phase {name}[/bold]: {PHASES[name][0]}")
        result = await run_phase(ctx, name)
        results.append(result)
        for note in result.notes:
            console.print(f"  note: {note}")
        for problem in result.check.problems:
            console.print(f"  [red]{problem}[/red]")
    # the whole run, once more, after everything had a last chance to settle
    await quiesce(ctx, ctx.all_subscriptions, 30)
    final = await asyncio.wait_for(check(ctx, None), 60)
    await write_evidence(ctx, "final", final)
    engine.dispose()
    return results, final


def watchdog(stack: ChaosStack, seconds: float) -> None:
    def fire() -> None:
        time.sleep(seconds)
        print(f"chaos: watchdog fired after {seconds:.0f}s: stopping everything", flush=True)
        stack.emergency_stop()
        os._exit(3)
    threading.Thread(target=fire, daemon=True, name="chaos-watchdog").start()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    phases = args.phases.split(",")
    per_phase = 90 + args.seconds + 90 + args.quiesce_seconds + 60
    stack = ChaosStack(args.data_dir.resolve(), default_registry())
    watchdog(stack, 180 + per_phase * len(phases) + 150)
    began = time.monotonic()
    try:
        console.print(f"starting the stack under {args.data_dir} (PostgreSQL, Temporal, "
                      "simulators, callback receiver, worker) …")
        stack.start()
        results, final = asyncio.run(run(args, stack))
    finally:
        stack.stop()
    console.print(table(results, final))
    for problem in final.problems:
        console.print(f"[red]{problem}[/red]")
    faults = sum(r.faults for r in results)
    unsettled = final.unsettled + final.open
    console.print(f"total {time.monotonic() - began:.0f}s; unsettled = {final.unsettled} listed "
                  f"+ {final.open} still pending (being settled, or at carriers with no look-up); "
                  f"logs in {args.data_dir}")
    print(f"chaos: {faults} faults, {final.charges} charges, {final.double} double, "
          f"{final.lost} lost, {unsettled} unsettled", flush=True)
    failed = final.failed or any(r.failed for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
