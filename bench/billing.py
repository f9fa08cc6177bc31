"""`make bench`: billing throughput on the dev server against a no-op timer+activity ceiling,
with the figures that explain it.

Both loads have the same shape on the same server: N workflows, each waking on a durable timer
every PERIOD seconds and running one activity. The ceiling's activity does nothing (its worker
is ``bench.noop_worker``, a process of its own); billing's charges a carrier simulator over HTTP and
commits the ledger (``worker.py``). Phases, each bounded in time:

1. three interleaved pairs (ceiling, billing, ceiling, billing, ...): rates, their ratio as the
   median of the pairs with the lowest and highest, CPU per charge of each process;
2. billing at half the ceiling's rate: latency (due → ledger commit) and, from a sample of
   workflow histories, where a cycle's time goes, events and billable actions per charge;
3. starts and cancellations through the platform against bare ``start_workflow`` and signals.

Progress goes to stderr; the figures go to stdout, one a line, the last one the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

import codec
from bench.histories import HistoryTotals
from bench.noop import NoopCycleWorkflow
from bench.procstat import CpuWindow
from bench.report import (
    append_run,
    git_commit,
    line,
    median,
    percentile,
    seconds_pair,
    spread,
)
from carriers.loader import Registry, carrier_task_queue, default_registry
from carriers.numbers import sample_msisdn
from devstack import Stack
from models.db import make_engine, migrate
from models.seed import seed_reference_data
from models.tables import Carrier, CarrierInteraction, LedgerEntry, LedgerKind, Period, PricePoint
from settings import PROJECT_ROOT, Settings
from starter import StartedSubscription, StartSubscriptionRequest, SubscriptionClient

T = TypeVar("T")
X = TypeVar("X")

DATA_DIR = PROJECT_ROOT / ".data" / "bench"
DOC = PROJECT_ROOT / "docs" / "benchmarks.md"
SIM_PORT = 8711
SMPP_PORT = 2785
TEMPORAL_PORT = 7243
RPC = timedelta(seconds=30)
BENCH_AMOUNT = 1  # minor units: the bench's own interval price point
DEFAULT_CARRIERS = "fr-azur,fr-lumiere,de-rheinfunk,es-iberica"
PROCESSES = ("temporal server", "worker", "simulator", "bench")
START_PACE = 40.0  # subscriptions started per second, at least (measured: 60–100)


BEGAN = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - BEGAN:6.1f}s] {message}", file=sys.stderr, flush=True)


async def bounded(awaitable: Awaitable[T], seconds: float, what: str) -> T:
    """``awaitable``'s result, or TimeoutError naming ``what`` after ``seconds`` (a
    TimeoutError from inside keeps its own message)."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        raise TimeoutError(f"{what}: no result within {seconds:.0f} s")
    return task.result()


async def each(limit: int, items: Sequence[X], call: Callable[[X], Awaitable[T]]) -> list[T]:
    """``call`` on every item, ``limit`` at a time."""
    gate = asyncio.Semaphore(limit)

    async def one(item: X) -> T:
        async with gate:
            return await call(item)

    return await asyncio.gather(*(one(item) for item in items))


async def timed_rate(limit: int, items: Sequence[X], call: Callable[[X], Awaitable[Any]],
                     seconds: float, what: str) -> float:
    """Calls per second of ``call`` over ``items``, ``limit`` at a time."""
    began = time.monotonic()
    await bounded(each(limit, items, call), seconds, what)
    return len(items) / (time.monotonic() - began)


async def drain(client: Client, workflow_ids: Sequence[str], seconds: float) -> float | None:
    """Waits for the workflows to close; seconds taken, or None when some were still open."""
    began = time.monotonic()

    async def closed(workflow_id: str) -> None:
        try:
            await client.get_workflow_handle(workflow_id).result(rpc_timeout=RPC)
        except Exception:  # noqa: BLE001 (failed or cancelled is closed too)
            pass

    try:
        await asyncio.wait_for(
            each(100, workflow_ids, closed), seconds)
    except TimeoutError:
        return None
    return time.monotonic() - began


async def wait_for_poller(client: Client, queue: str, kind: TaskQueueType.ValueType,
                          seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reply = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(namespace=client.namespace, task_queue=TaskQueue(name=queue),
                                     task_queue_type=kind), timeout=RPC)
        if reply.pollers:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"no worker polls {queue} after {seconds:.0f} s")


async def history(client: Client, workflow_id: str) -> list[HistoryEvent]:
    """All runs of a workflow, oldest first (a continue-as-new names the run before it)."""
    runs: list[list[HistoryEvent]] = []
    run_id: str | None = None
    for _ in range(50):
        handle = client.get_workflow_handle(workflow_id, run_id=run_id)
        events = [e async for e in handle.fetch_history_events(rpc_timeout=RPC)]
        await decode_activity_inputs(client, events)
        runs.append(events)
        previous = events[0].workflow_execution_started_event_attributes \
            .continued_execution_run_id if events else ""
        if not previous:
            break
        run_id = previous
    return [e for run in reversed(runs) for e in run]


async def decode_activity_inputs(client: Client, events: list[HistoryEvent]) -> None:
    """Opens the scheduled activities' inputs sealed by the payload codec, in place, so that
    their idempotency keys can be read."""
    payload_codec = client.data_converter.payload_codec
    if payload_codec is None:
        return
    for event in events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            payloads = event.activity_task_scheduled_event_attributes.input.payloads
            opened = await payload_codec.decode(list(payloads))
            del payloads[:]
            payloads.extend(opened)


def aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


@dataclass
class Phase:
    kind: str  # "ceiling" or "billing"
    workflows: int
    rate: float = math.nan
    charges: int = 0
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per charge, by process
    latencies: list[float] = field(default_factory=list)  # due → ledger commit, billing only
    window: tuple[float, float] = (0.0, 0.0)
    drained: float | None = None


class Bench:
    def __init__(self, args: argparse.Namespace, stack: Stack) -> None:
        self.args = args
        self.stack = stack
        self.registry: Registry = default_registry()
        self.rng = random.Random(7)
        self.taken: set[str] = set()
        self.carriers = [self.registry.carriers[c] for c in args.carriers.split(",")]
        self.db_url = f"sqlite:///{DATA_DIR / 'billing.db'}"
        self.queue = f"bench-billing-{uuid.uuid4().hex[:6]}"
        self.noop_queue = f"bench-noop-{uuid.uuid4().hex[:6]}"
        self.completions = DATA_DIR / "noop-completions.txt"
        self.address = f"127.0.0.1:{TEMPORAL_PORT}"
        self.pids: dict[str, int] = {}
        self.phase_no = 0
        self.worker_names = [f"bench-worker-{n}" for n in range(1, args.workers + 1)]
        self.last_ceiling_ids: list[str] = []
        self._client: Client | None = None
        self._engine: Engine | None = None
        self._subscriptions: SubscriptionClient | None = None

    @property
    def client(self) -> Client:
        assert self._client is not None
        return self._client

    @property
    def engine(self) -> Engine:
        assert self._engine is not None
        return self._engine

    @property
    def subscriptions(self) -> SubscriptionClient:
        assert self._subscriptions is not None
        return self._subscriptions

    # -- the stack -----------------------------------------------------------------------------

    def _pid(self, name: str) -> int:
        return next(child.pid for n, child in self.stack.children if n == name)

    async def setup(self) -> None:
        args = self.args
        progress(f"starting the Temporal dev server (persistence: {args.persistence}), "
                 "the simulator and both workers")
        self.stack.start_temporal(port=TEMPORAL_PORT, ui_port=TEMPORAL_PORT + 1000,
                                  persistence=args.persistence)
        urls = self.stack.start_simulator(SIM_PORT, SMPP_PORT, default_balance="1000000")
        for suffix in ("", "-wal", "-shm"):
            (DATA_DIR / f"billing.db{suffix}").unlink(missing_ok=True)
        self.completions.unlink(missing_ok=True)
        migrate(self.db_url)
        self._engine = make_engine(self.db_url)
        seed_reference_data(self.engine, self.registry)
        with Session(self.engine) as session:
            for carrier in self.carriers:
                row = session.get(Carrier, carrier.id)
                assert row is not None, carrier.id
                session.merge(PricePoint(
                    id=f"bench-{carrier.id}", product_id="game-pass", carrier_id=carrier.id,
                    amount_minor=BENCH_AMOUNT, currency=row.currency, period=Period.INTERVAL,
                    interval_seconds=args.period, retry_schedule_seconds="5"))
            session.commit()
        env = self.stack.env(CB_DATABASE_URL=self.db_url, CB_SIMULATOR_URLS=json.dumps(urls),
                             CB_TASK_QUEUE=self.queue, CB_TEMPORAL_ADDRESS=self.address,
                             CB_WORKER_PROCESSES=str(args.workers))
        for name in self.worker_names:
            self.stack.start_worker(name, env)
        # the stack's payload codec keys (stack.env hands them to both workers)
        settings = Settings(database_url=self.db_url, task_queue=self.queue,
                            temporal_address=self.address,
                            codec_keys=getattr(self.stack, "codec_keys", {}),
                            codec_current_key=env.get("CB_CODEC_CURRENT_KEY"))
        self.stack.spawn("noop-worker", [
            sys.executable, "-m", "bench.noop_worker", "--address", self.address, "--queue",
            self.noop_queue, "--completions", str(self.completions),
            "--max-concurrent-activities", str(settings.max_concurrent_activities),
            "--max-concurrent-workflow-tasks", str(settings.max_concurrent_workflow_tasks)])
        self._client = await bounded(
            Client.connect(self.address, data_converter=codec.data_converter(settings)), 60,
            "connecting to Temporal")
        # charges start as local activities (carriers/gate.py), unless --queue-charges
        self._subscriptions = SubscriptionClient(self.client, self.engine, self.registry,
                                                 self.queue,
                                                 local_charges=not args.queue_charges)
        workflow, activity = (TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                              TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY)
        await wait_for_poller(self.client, self.noop_queue, workflow, 60)
        await wait_for_poller(self.client, self.queue, workflow, 90)
        for carrier in self.carriers:
            await wait_for_poller(self.client, carrier_task_queue(self.queue, carrier),
                                  activity, 30)
        self.pids = {"temporal server": self._pid("temporal"), "simulator": self._pid("simulator"),
                     "bench": os.getpid()}

    def _cpu(self, workers: Sequence[str]) -> CpuWindow:
        return CpuWindow({**self.pids, **{name: self._pid(name) for name in workers}})

    # -- single calls, bounded by RPC -----------------------------------------------------------

    async def _start_noop(self, workflow_id: str) -> None:
        await self.client.start_workflow(NoopCycleWorkflow.run, float(self.args.period),
                                         id=workflow_id, task_queue=self.noop_queue,
                                         rpc_timeout=RPC)

    async def _park_noop(self, workflow_id: str) -> None:
        """A no-op workflow whose first timer is a day away: a bare start."""
        await self.client.start_workflow(NoopCycleWorkflow.run, 86400.0, id=workflow_id,
                                         task_queue=self.noop_queue, rpc_timeout=RPC)

    async def _stop_noop(self, workflow_id: str) -> None:
        await self.client.get_workflow_handle(workflow_id).signal(NoopCycleWorkflow.stop,
                                                                  rpc_timeout=RPC)

    async def _signal_cancel(self, started: StartedSubscription) -> None:
        await self.subscriptions.handle(started.subscription_id).signal("request_cancel",
                                                                        rpc_timeout=RPC)

    async def _history(self, workflow_id: str) -> list[HistoryEvent]:
        return await history(self.client, workflow_id)

    # -- the load phases -----------------------------------------------------------------------

    async def _window(self, phase: Phase, workers: Sequence[str], load_began: float
                      ) -> CpuWindow:
        """Warm-up counts from the first start, but lasts at least 2 s after the last."""
        await asyncio.sleep(max(load_began + self.args.warmup - time.monotonic(), 2.0))
        self.stack.check_alive()
        cpu = self._cpu(workers)
        cpu.start()
        began = time.time()
        await asyncio.sleep(self.args.window)
        cpu.stop()
        phase.window = (began, time.time())
        self.stack.check_alive()
        return cpu

    @staticmethod
    def _per_charge(phase: Phase, cpu: CpuWindow) -> None:
        assert cpu.used is not None
        used: dict[str, float] = {}
        for name, seconds in cpu.used.items():  # the worker processes count as one
            key = "worker" if "worker" in name else name
            used[key] = used.get(key, 0.0) + seconds
        phase.cpu_ms = {name: 1000 * seconds / max(phase.charges, 1)
                        for name, seconds in used.items()}

    async def ceiling(self, workflows: int) -> Phase:
        self.phase_no += 1
        phase = Phase("ceiling", workflows)
        progress(f"ceiling: {workflows} no-op workflows, timer every {self.args.period} s")
        ids = [f"noop-{self.phase_no}-{i}" for i in range(workflows)]
        load_began = time.monotonic()
        await bounded(each(50, ids, self._start_noop), self.args.start_timeout,
                      "starting the no-op workflows")
        cpu = await self._window(phase, ["noop-worker"], load_began)
        await bounded(each(50, ids, self._stop_noop), self.args.start_timeout,
                      "stopping the no-op workflows")
        phase.drained = await drain(self.client, ids, self.args.drain_timeout)
        await asyncio.sleep(0.6)  # the no-op worker flushes its completions every 0.25 s
        begin, end = phase.window
        times = [float(t) for t in self.completions.read_text().split()]
        phase.charges = sum(1 for t in times if begin <= t < end)
        phase.rate = phase.charges / (end - begin)
        self._per_charge(phase, cpu)
        progress(f"ceiling: {phase.rate:.1f} cycles/s; drained in "
                 f"{_drained(phase.drained)}")
        self.last_ceiling_ids = ids
        return phase

    def _requests(self, count: int, first_charge_at: datetime | None = None,
                  spread_from: datetime | None = None) -> list[StartSubscriptionRequest]:
        """``spread_from``: the first charges fall due evenly over one period from then, so
        the load is steady from the first round (as real renewals are spread), not a burst
        at the pace the subscriptions were started."""
        requests = []
        for i in range(count):
            if spread_from is not None:
                first_charge_at = spread_from + timedelta(seconds=self.args.period * i / count)
            carrier = self.carriers[i % len(self.carriers)]
            currency = self.registry.country_of(carrier.id).currency
            requests.append(StartSubscriptionRequest(
                msisdn=sample_msisdn(carrier, self.registry, self.rng, self.taken),
                product_id="game-pass", amount_minor=BENCH_AMOUNT, currency=currency,
                period=Period.INTERVAL, carrier_id=carrier.id, first_charge_at=first_charge_at))
        return requests

    async def _start(self, requests: list[StartSubscriptionRequest]) -> list[StartedSubscription]:
        return await bounded(each(20, requests, self.subscriptions.start_subscription),
                             self.args.start_timeout, "starting subscriptions")

    async def billing(self, workflows: int, sample: int = 0) -> tuple[Phase, HistoryTotals]:
        self.phase_no += 1
        phase = Phase("billing", workflows)
        progress(f"billing: {workflows} subscriptions, a charge every {self.args.period} s")
        # the starts must be done before the first charges fall due
        lead = workflows / START_PACE + 2.0
        requests = self._requests(workflows,
                                  spread_from=datetime.now(UTC) + timedelta(seconds=lead))
        load_began = time.monotonic()
        started = await self._start(requests)
        # warm-up: a whole round of charges first, and the --warmup at least
        cpu = await self._window(phase, self.worker_names,
                                 max(load_began, load_began + lead + self.args.period + 1.0
                                     - self.args.warmup))
        # a signal, not the cancel update: under overload an update waits behind the backlog
        await bounded(each(50, started, self._signal_cancel), self.args.start_timeout,
                      "cancelling subscriptions")
        phase.drained = await drain(self.client, [s.workflow_id for s in started],
                                    self.args.drain_timeout)
        ids = [s.subscription_id for s in started]
        begin, end = (datetime.fromtimestamp(t, UTC) for t in phase.window)
        with Session(self.engine) as session:
            rows = session.exec(select(LedgerEntry.due_at, LedgerEntry.committed_at).where(
                LedgerEntry.kind == LedgerKind.CHARGE,
                LedgerEntry.subscription_id >= min(ids),
                LedgerEntry.subscription_id <= max(ids))).all()
        for due, committed in rows:
            if begin <= aware(committed) < end:
                phase.latencies.append((aware(committed) - aware(due)).total_seconds())
        phase.charges = len(phase.latencies)
        phase.rate = phase.charges / (end - begin).total_seconds()
        self._per_charge(phase, cpu)
        progress(f"billing: {phase.rate:.1f} charges/s; drained in {_drained(phase.drained)}")
        totals = HistoryTotals()
        if sample:
            totals = await bounded(self._histories([s.workflow_id for s in started[:sample]],
                                                   "charge_subscription",
                                                   ("request_cancel", "cancel"), phase.window),
                                   self.args.start_timeout, "fetching billing histories")
        return phase, totals

    async def _histories(self, workflow_ids: Sequence[str], activity_type: str,
                         cancel_names: Sequence[str], window: tuple[float, float] | None
                         ) -> HistoryTotals:
        totals = HistoryTotals()
        fetched = await each(10, workflow_ids, self._history)
        for events in fetched:
            totals.add(events, activity_type, cancel_names, window)
        return totals

    async def ceiling_histories(self, sample: int) -> HistoryTotals:
        return await bounded(self._histories(self.last_ceiling_ids[:sample], "noop", ("stop",),
                                             None),
                             self.args.start_timeout, "fetching no-op histories")

    def carrier_calls(self, keys: Sequence[str]) -> dict[str, float]:
        """Seconds spent in carrier calls per idempotency key (the interactions' latency_ms)."""
        spent: dict[str, float] = {}
        with Session(self.engine) as session:
            for at in range(0, len(keys), 500):
                chunk = list(keys[at:at + 500])
                rows = session.exec(
                    select(CarrierInteraction.idempotency_key,
                           func.sum(CarrierInteraction.latency_ms))
                    .where(CarrierInteraction.idempotency_key.in_(chunk))  # type: ignore[attr-defined]
                    .group_by(CarrierInteraction.idempotency_key)).all()
                spent.update({key: total / 1000 for key, total in rows})
        return spent

    # -- starts and cancellations -------------------------------------------------------------

    async def start_and_cancel(self, count: int) -> dict[str, float]:
        """Platform starts and cancels (the cancel update) against bare start_workflow and
        signals, on the same server, 20 at a time, with nothing else running."""
        progress(f"starts and cancellations: {count} of each kind, 20 at a time")
        later = datetime.now(UTC) + timedelta(days=1)
        requests = self._requests(count, first_charge_at=later)
        limit, seconds = 20, self.args.start_timeout
        bare_ids = [f"bare-{uuid.uuid4().hex[:8]}-{i}" for i in range(count)]
        rates = {"bare start": await timed_rate(limit, bare_ids, self._park_noop, seconds,
                                                "bare starts")}
        started: list[StartedSubscription] = []

        async def start(request: StartSubscriptionRequest) -> None:
            started.append(await self.subscriptions.start_subscription(request))

        rates["start"] = await timed_rate(limit, requests, start, seconds,
                                          "subscription starts")
        await asyncio.sleep(1.0)  # the first workflow tasks (a timer each) out of the way
        rates["cancel"] = await timed_rate(limit, [s.subscription_id for s in started],
                                           self.subscriptions.cancel_subscription, seconds,
                                           "subscription cancels")
        rates["bare signal"] = await timed_rate(limit, bare_ids, self._stop_noop, seconds,
                                                "bare signals")
        return rates


def _drained(seconds: float | None) -> str:
    return "(not within the drain timeout)" if seconds is None else f"{seconds:.1f} s"


def _actions_detail(totals: HistoryTotals) -> str:
    charges = max(totals.steady_charges, 1)
    return ", ".join(f"{k} {v / charges:.2f}" for k, v in sorted(totals.steady_actions.items()))


def figures(args: argparse.Namespace, bench: Bench, pairs: list[tuple[Phase, Phase]],
            half: Phase, half_totals: HistoryTotals, noop_totals: HistoryTotals,
            rates: dict[str, float]) -> tuple[list[str], dict[str, str]]:
    """The lines to print, and the cells of the recorded row."""
    ceilings = [c.rate for c, _ in pairs]
    billings = [b.rate for _, b in pairs]
    ratios = [b.rate / c.rate for c, b in pairs if c.rate > 0]
    demand = args.subscriptions / args.period
    out = [
        line("persistence", f"dev server, {args.persistence}"),
        line("load", f"{args.subscriptions} workflows, one cycle each every {args.period} s: "
                     f"demand {demand:.0f}/s"),
        line("worker processes", f"billing {args.workers}, no-op 1"),
        line("carriers", f"{', '.join(c.id for c in bench.carriers)}; their queues allow "
                         f"{sum(c.rate_limit_per_second for c in bench.carriers):.0f}/s"),
        line("no-op ceiling", f"{spread(ceilings, 1)} cycles/s"),
        line("billing", f"{spread(billings, 1)} charges/s"),
    ]
    cpu_cells = []
    for name in (*PROCESSES, "all"):
        def of(phase: Phase, name: str = name) -> float:
            return sum(phase.cpu_ms.values()) if name == "all" else phase.cpu_ms.get(name,
                                                                                       math.nan)
        billing_ms = median([of(b) for _, b in pairs])
        noop_ms = median([of(c) for c, _ in pairs])
        out.append(line(f"cpu ms per charge, {name}", f"{billing_ms:.2f} (no-op: {noop_ms:.2f})"))
        if name != "all":
            cpu_cells.append(f"{billing_ms:.1f}")
    phases = [p for pair in pairs for p in pair] + [half]
    out.append(line("phases drained within --drain-timeout",
                    f"{sum(p.drained is not None for p in phases)} of {len(phases)}"))
    saturated = [x for _, b in pairs for x in b.latencies]
    out.append(line("due → ledger commit under the full load", seconds_pair(saturated)))
    out.append(line("half load", f"{half.workflows} subscriptions, demand "
                                 f"{half.workflows / args.period:.1f}/s (half the ceiling), "
                                 f"billed {half.rate:.1f}/s"))
    p50, p99 = percentile(half.latencies, 50), percentile(half.latencies, 99)
    out.append(line("p50 at half load", f"{p50:.3f} s"))
    out.append(line("p99 at half load", f"{p99:.3f} s"))
    lat = half_totals.latency
    out.append(line("timer lag (fired − due)", seconds_pair(lat.timer_lag)))
    out.append(line("workflow task (scheduled → completed)", seconds_pair(lat.task_total)))
    out.append(line("workflow task queue wait (scheduled → started)", seconds_pair(lat.task_queue)))
    out.append(line("activity schedule-to-start", seconds_pair(lat.activity_queue)))
    out.append(line("activity run", seconds_pair(lat.activity_run)))
    keys = [k for k, _ in lat.runs_by_key if k]
    carrier = bench.carrier_calls(keys)
    calls = [carrier[k] for k in keys if k in carrier]
    rest = [run - carrier[k] for k, run in lat.runs_by_key if k and k in carrier]
    out.append(line("activity run, carrier call", seconds_pair(calls)))
    out.append(line("activity run, database and the rest (run − carrier call)",
                    seconds_pair(rest)))
    events, actions = half_totals.per_charge()
    noop_events, noop_actions = noop_totals.per_charge()
    out.append(line("events per charge (steady state)",
                    f"{events:.2f} (no-op cycle: {noop_events:.2f})"))
    out.append(line("actions per charge (steady state)",
                    f"{actions:.2f} ({_actions_detail(half_totals)}; no-op cycle: "
                    f"{noop_actions:.2f})"))
    start_events, start_actions = half_totals.per_start()
    cancel_events, cancel_actions = half_totals.per_cancel()
    out.append(line("events per start / per cancellation",
                    f"{start_events:.1f} / {cancel_events:.1f} (histories: "
                    f"{half_totals.histories}, closed: {half_totals.complete})"))
    out.append(line("actions per start / per cancellation",
                    f"{start_actions:.2f} / {cancel_actions:.2f}"))
    out.append(line("start rate", f"{rates['start']:.0f}/s (bare start_workflow: "
                                  f"{rates['bare start']:.0f}/s)"))
    out.append(line("cancel rate", f"{rates['cancel']:.0f}/s (cancel update; bare signal: "
                                   f"{rates['bare signal']:.0f}/s)"))
    out.append(line("ratio", spread(ratios)))
    cells = {
        "ceiling": spread(ceilings, 1), "billing": spread(billings, 1), "ratio": spread(ratios),
        "half": f"{p50:.3f} s / {p99:.3f} s", "events": f"{events:.2f}",
        "actions": f"{actions:.2f}", "cpu": ", ".join(cpu_cells),
    }
    return out, cells


def pairs_only(args: argparse.Namespace, pairs: list[tuple[Phase, Phase]]) -> list[str]:
    """The throughput lines alone (``make bench-curve`` runs one of these per worker count)."""
    ratios = [b.rate / c.rate for c, b in pairs if c.rate > 0]
    cpu = median([sum(b.cpu_ms.values()) for _, b in pairs])
    return [line("worker processes", f"billing {args.workers}, no-op 1"),
            line("no-op ceiling", f"{spread([c.rate for c, _ in pairs], 1)} cycles/s"),
            line("billing", f"{spread([b.rate for _, b in pairs], 1)} charges/s"),
            line("cpu ms per charge, all", f"{cpu:.2f}"),
            line("ratio", spread(ratios))]


async def main_async(args: argparse.Namespace, stack: Stack) -> list[str]:
    bench = Bench(args, stack)
    await bench.setup()
    pairs: list[tuple[Phase, Phase]] = []
    for _ in range(args.pairs):
        ceiling = await bench.ceiling(args.subscriptions)
        billing, _totals = await bench.billing(args.subscriptions)
        pairs.append((ceiling, billing))
    if args.pairs_only:
        return pairs_only(args, pairs)
    noop_totals = await bench.ceiling_histories(args.history_sample)
    half_rate = median([c.rate for c, _ in pairs]) / 2
    half_count = max(int(round(half_rate * args.period)), 4)
    half, half_totals = await bench.billing(half_count, sample=args.history_sample)
    rates = await bench.start_and_cancel(args.start_cancel)
    lines, cells = figures(args, bench, pairs, half, half_totals, noop_totals, rates)
    if args.record:
        options = (f"{args.subscriptions} × every {args.period} s, {args.pairs} pairs of "
                   f"{args.warmup:g}+{args.window:g} s, {args.persistence}, "
                   f"{args.workers} worker{'s' if args.workers > 1 else ''}"
                   + (", queue charges" if args.queue_charges else ", local charges")
                   + (", quick" if args.quick else ""))
        append_run(DOC, [datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), git_commit(PROJECT_ROOT),
                         options, cells["ceiling"], cells["billing"], cells["ratio"],
                         cells["half"], cells["events"], cells["actions"], cells["cpu"]])
        progress(f"recorded in {DOC.relative_to(PROJECT_ROOT)}")
    return lines


QUICK = {"subscriptions": 80, "period": 2, "warmup": 5.0, "window": 5.0, "history_sample": 10,
         "start_cancel": 30, "drain_timeout": 20.0}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscriptions", type=int, default=1000,
                        help="workflows in each full-load phase (default 1000)")
    parser.add_argument("--period", type=int, default=5, help="seconds between charges")
    parser.add_argument("--warmup", type=float, default=12.0,
                        help="seconds from the first start to the window")
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured per phase")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved ceiling/billing pairs")
    parser.add_argument("--history-sample", type=int, default=40,
                        help="histories read for the latency split and events per charge")
    parser.add_argument("--start-cancel", type=int, default=100,
                        help="subscriptions started and cancelled for the start/cancel rates")
    parser.add_argument("--workers", type=int, default=2,
                        help="billing worker processes (each is one Python process: one core)")
    parser.add_argument("--carriers", default=DEFAULT_CARRIERS,
                        help="carriers billed, round robin (each queue is rate limited)")
    parser.add_argument("--persistence", choices=["memory", "sqlite", "wal"], default="wal")
    parser.add_argument("--start-timeout", type=float, default=120.0,
                        help="bound on starting, signalling or reading one phase's workflows")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="bound on waiting for a phase's workflows to close")
    parser.add_argument("--deadline", type=float, default=720.0,
                        help="the whole run stops after this many seconds")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--queue-charges", action="store_true",
                        help="charge on the carriers' task queues only (no local activities)")
    parser.add_argument("--pairs-only", action="store_true",
                        help="the interleaved pairs alone (no half load, starts or cancels)")
    parser.add_argument("--record", action="store_true",
                        help="append the run to the table in docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    return args


def run_bench(main: Callable[[argparse.Namespace, Stack], Awaitable[list[str]]],
              args: argparse.Namespace, what: str) -> None:
    """Runs one bench on its own stack within ``args.deadline``, then prints its figures
    (exit status 1 when there are none)."""
    stack = Stack(DATA_DIR)
    lines: list[str] = []
    try:
        lines = asyncio.run(bounded(main(args, stack), args.deadline, what))
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
    print()
    for text in lines:
        print(text)
    if not lines:
        sys.exit(1)


def main() -> None:
    run_bench(main_async, parse_args(), "the whole bench")


if __name__ == "__main__":
    main()
