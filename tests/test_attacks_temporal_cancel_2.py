"""Second round of attacks on a Temporal cancellation (the UI's Cancel) of a subscription
(7d4d11b, patch ``temporal-cancel-ends-like-the-cancel-update``): the billing loop runs as a task
awaited through ``asyncio.shield``; the CancelledError reaches ``SubscriptionWorkflow.run``,
which then sets ``cancel_requested`` and ``OperationSettler.end_soon()``.

The cancellation reaches ``run`` two event-loop steps after the workflow task that carries it
is applied (the SDK defers ``Task.cancel`` with ``call_soon``; the cancelled shield wakes ``run``
with another ``call_soon``), while the billing task goes on deciding. Whatever else that
workflow task resolves for the billing task could have it send a new charge before the flag is
set (a cancel update, by contrast, is applied before every other job of its workflow task).
Attack 1: it does not for an answer or a timer (the SDK resolves those in three steps or more,
and wait conditions only once the ready queue is empty). Attack 2: it does when the cancel
comes with the start itself, since the billing task's first step runs before ``run`` hears of
the cancel (``workflow.cancellation_reason()`` already says so).

To put a cancellation into the same workflow task as an activity's completion, the tests stop
the workflow worker only (the carrier's activity worker goes on), let the activity complete,
cancel, and start a workflow worker again: its first workflow task holds both events.

Every test drives the real components, as tests/test_attacks_temporal_cancel.py does: the
time-skipping Temporal server (time skipped only where a test says so), workers built by
``worker.build_worker``, the carrier simulator and the game backend over their sockets, the
SQLite database. A test marked ``xfail(strict=True, raises=...)`` is an attack that succeeds (a
real bug): it fails with the named AssertionError subclass only."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker
from temporalio.workflow import NondeterminismError

from activities.billing import BillingActivities
from activities.messages import StatusInput
from carriers.base import CarrierAdapter, OperationResult
from carriers.loader import Registry
from models.tables import LedgerKind, OperationState, Period, Subscription
from rules.resolve import resolve_rules
from rules.types import ChargingRules
from settings import PROJECT_ROOT, Settings
from starter import RulesResolver, SubscriptionClient, SubscriptionRequestError
from tests.conftest import GameBackendServer, Simulator
from tests.test_attacks_flows import grants_of, subscriber_ref
from tests.test_attacks_local_charge import (
    _WORKER_SCRIPT,
    CARRIER,
    Calls,
    _plain_settings,
    books_match,
    eventually,
    instrument,
    ledger_of,
    one_off,
    only,
    operations_of,
)
from tests.test_attacks_temporal_cancel import BEFORE, ended, grant_asked, listed, priced, stop
from worker import WORKFLOWS, build_worker, make_adapter_pool
from workflows.subscription import SubscriptionWorkflow
from workflows.types import BillingState, RefundRecord

# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
async def clean_faults(simulator: Simulator, game_backend: GameBackendServer) -> Any:
    """Faults a test injected and did not use up never reach the next test."""
    yield
    simulator.core.faults.clear()
    simulator.core.unavailable_until.clear()
    await game_backend.control("faults", {"kind": "clear"})


def open_rules(**changes: Any) -> RulesResolver:
    """Ruled, with nothing that would move a charge in time (no opt-in, a window open all day,
    no maintenance, no texts, no balance check), plus ``changes``; ``ladder="half"``: the price
    ladder full price, then half of it."""
    half = changes.pop("ladder", None) == "half"

    def resolve(country: str, carrier: str, product: str, price: int, period: str,
                zone: str | None) -> ChargingRules:
        quiet: dict[str, Any] = {
            "opt_in": "none", "window_start_minute": 0, "window_end_minute": 1440,
            "maintenance": [], "preferred_minute": None, "welcome_text": False,
            "receipt_after_charge": False, "monthly_reminder": False,
            "renewal_reminder_days_before": None, "balance_check": False}
        rules = replace(resolve_rules(country, carrier, product, price, period, zone),
                        **{**quiet, **changes})
        if half:
            rules = replace(rules, balance_policy="ladder", ladder_minor=[price, price // 2],
                            remainder="write_off")
        return rules

    return resolve


@dataclass
class Split:
    """A worker group as worker.py builds it, whose workflow worker can be stopped and started
    again while the carrier's activity worker goes on."""
    settings: Settings
    client: SubscriptionClient
    calls: Calls
    adapters: Any
    workflow_worker: Worker | None
    _config: Any

    def adapter(self, carrier_id: str) -> CarrierAdapter:
        adapter: CarrierAdapter = self.adapters.get(carrier_id)
        return adapter

    async def stop_workflows(self) -> None:
        assert self.workflow_worker is not None
        worker, self.workflow_worker = self.workflow_worker, None
        await worker.__aexit__(None, None, None)

    async def start_workflows(self) -> None:
        assert self.workflow_worker is None
        self.workflow_worker = Worker(**self._config)
        await self.workflow_worker.__aenter__()


@asynccontextmanager
async def split_worker(env: WorkflowEnvironment, base: Settings, engine: Engine,
                       registry: Registry, resolver: RulesResolver | None = None,
                       **changes: Any) -> AsyncIterator[Split]:
    # (no workflow cache, so no sticky queue: a workflow task waits on the shared queue for
    # whichever workflow worker polls next)
    settings = base.model_copy(update={"task_queue": f"tc2-{uuid.uuid4().hex[:8]}",
                                       "max_cached_workflows": 0, **changes})
    adapters = make_adapter_pool(registry, settings, engine, env.client)
    calls = Calls()
    for carrier_id in registry.carriers:
        instrument(adapters, carrier_id, calls)
    client = SubscriptionClient(env.client, engine, registry, settings.task_queue,
                                settings.deployment_id, local_charges=False,
                                apply_rules=resolver is not None,
                                rules_resolver=resolver or resolve_rules)
    group = build_worker(env.client, settings, engine, adapters, registry)
    split = Split(settings, client, calls, adapters, group.workers[0],
                  group.workers[0].config())
    try:
        async with AsyncExitStack() as stack:
            for worker in group.workers[1:]:  # the carriers' activity workers
                await stack.enter_async_context(worker)
            await group.workers[0].__aenter__()
            try:
                yield split
            finally:
                if split.workflow_worker is not None:
                    await split.stop_workflows()
        await group.__aexit__(None, None, None)  # (its closers: the game backend's client)
    finally:
        await adapters.aclose()


def slow_first(split: Split, carrier_id: str, kind: str, seconds: float) -> asyncio.Event:
    """The adapter's first ``kind`` call waits ``seconds`` before it goes to the carrier; the
    event is set when it starts."""
    adapter = split.adapter(carrier_id)
    original = getattr(adapter, kind)
    started = asyncio.Event()

    async def slow(*args: Any, **kwargs: Any) -> OperationResult:
        first = not started.is_set()
        started.set()
        if first:
            await asyncio.sleep(seconds)
        answer: OperationResult = await original(*args, **kwargs)
        return answer

    setattr(adapter, kind, slow)
    return started


async def cancel_with_the_answer(split: Split, handle: WorkflowHandle[Any, Any],
                                 answered: Callable[[], Awaitable[bool]]) -> None:
    """Stops the workflow worker while an activity runs, waits until it has answered (its
    completion recorded, the workflow task for it not yet taken), cancels the workflow, and
    starts a workflow worker again: one workflow task then holds the activity's completion and
    the cancel request, in that order."""
    await split.stop_workflows()
    deadline = time.monotonic() + 15
    while not await answered():
        assert time.monotonic() < deadline, "the activity never answered"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # (its completion reaches the server)
    await handle.cancel()
    await split.start_workflows()


async def waiting_for(check: Callable[[], Awaitable[bool]], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"not reached within {seconds} s"
        await asyncio.sleep(0.1)


def row_status(engine: Engine, subscription_id: int) -> str:
    with Session(engine) as session:
        row = session.get(Subscription, subscription_id)
        assert row is not None
        return str(getattr(row.status, "value", row.status))


class NondeterministicUpgrade(AssertionError):
    """A history recorded by the code before 7d4d11b, with no Temporal cancel in it, does not
    replay on today's code: every such running subscription would stop billing."""


@asynccontextmanager
async def old_worker(env: WorkflowEnvironment, settings: Settings, tmp_path: Path,
                     queue: str, *carriers: str) -> AsyncIterator[subprocess.Popen[str]]:
    """A worker process running the workflows of ``BEFORE`` (everything else as today), as
    tests/test_attacks_temporal_cancel.py builds it."""
    old = tmp_path / "old"
    (old / "workflows").mkdir(parents=True)
    for source in (PROJECT_ROOT / "workflows").glob("*.py"):
        (old / "workflows" / source.name).write_text(subprocess.run(
            ["git", "show", f"{BEFORE}:workflows/{source.name}"], cwd=PROJECT_ROOT, check=True,
            capture_output=True, text=True).stdout)
    mine = settings.model_copy(update={"task_queue": queue, "carrier_timeout_seconds": 5.0})
    config = env.client.service_client.config
    process = subprocess.Popen(
        [sys.executable, "-c", _WORKER_SCRIPT], cwd=old,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(old), str(PROJECT_ROOT)]),
             "LC_SETTINGS": json.dumps(_plain_settings(mine)),
             "LC_TARGET": config.target_host, "LC_NAMESPACE": env.client.namespace,
             "LC_CARRIERS": ",".join(carriers)},
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)
        assert line.strip() == "polling"
        yield process
    finally:
        process.kill()
        process.wait(10)


# -- 1. the cancel arrives in the workflow task that carries a charge's answer ---------------


def one_task_holds_both(events: Sequence[Any]) -> bool:
    """The activity's completion and the cancel request reached the workflow in one workflow
    task (no workflow task started between them)."""
    kinds = [e.event_type for e in events]
    done = max(i for i, k in enumerate(kinds) if k == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
               and EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED in kinds[i:])
    asked = kinds.index(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED)
    return done < asked and EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED not in kinds[done:asked]


@pytest.mark.parametrize("path", ["ruled ladder", "plain, next cycle overdue",
                                  "plain, continue-as-new due"])
async def test_a_cancel_arriving_with_a_charges_answer_sends_no_new_charge(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator, path: str,
) -> None:
    """The cancellation and a charge's answer reach the workflow in one workflow task, the
    answer first. If the billing task woke before ``run`` set ``cancel_requested`` it would send
    the next charge at once, without a timer: (ruled) the carrier refuses the full price for
    lack of credit, and the price ladder's half price follows at once; (plain, an interval plan)
    the subscription started 25 s in the past (the client allows 5 min), so cycle 2 is overdue
    when cycle 1 is answered, and follows at once; (plain, one cycle per run) the answer ends
    the run, which continues as new unless a cancel was seen: a new run would never hear of
    the cancel request (it stays with the closed run) and would bill on. Neither the cancel
    update nor the code before sent it. Withstood: the SDK resolves an activity through a
    shield (three loop steps), so ``run`` (two) sets the flag first; continue-as-new follows a
    wait condition, checked only once the ready queue is empty. (A version of ``run`` that set
    the flag a few steps later sends the next charge in the first two cases.)"""
    registry = only(CARRIER)
    ruled = path.startswith("ruled")
    async with split_worker(temporal_env, settings, engine, registry,
                            open_rules(ladder="half") if ruled else None,
                            carrier_timeout_seconds=5.0) as split:
        request = one_off(CARRIER) if ruled else priced(CARRIER, Period.INTERVAL).model_copy(
            update={"first_charge_at": await temporal_env.get_current_time()
                    - timedelta(seconds=25),
                    "cycles_per_run": 1 if path.endswith("continue-as-new due") else 24})
        started = slow_first(split, CARRIER, "charge", 1.5)
        if ruled:
            await simulator.fault(CARRIER, "insufficient_funds", request.msisdn)
        sid = (await split.client.start_subscription(request)).subscription_id
        handle = split.client.handle(sid)
        await asyncio.wait_for(started.wait(), 10)

        async def answered() -> bool:
            return any(o.state != OperationState.SENDING for o in operations_of(engine, sid))

        await cancel_with_the_answer(split, handle, answered)
        try:
            status = await ended(handle, 20)
            await asyncio.sleep(0.5)
            assert one_task_holds_both((await handle.fetch_history()).events)
            debits = await simulator.transactions(CARRIER, request.msisdn)
            ours = await books_match(simulator, engine, CARRIER, request.msisdn, sid)
            assert len(split.calls.of("charge")) == 1, [
                (o.amount_minor, o.state) for o in operations_of(engine, sid)]
            assert len(debits) == (0 if ruled else 1) and len(ours) == len(debits)
            assert status == WorkflowExecutionStatus.CANCELED
            assert row_status(engine, sid) == "cancelled"
            state: BillingState = await handle.query(SubscriptionWorkflow.state)
            assert state.cancel_requested and state.next_cycle == (1 if ruled else 2)
        finally:
            await stop(handle)


# -- 2. a cancel that reaches the workflow in its first workflow task ------------------------


class ChargedAfterCancel(AssertionError):
    """The operator cancelled the workflow in Temporal before it had decided anything; it
    charged the subscriber all the same."""


@pytest.mark.parametrize("path", ["plain", "ruled"])
async def test_a_subscription_cancelled_before_its_first_workflow_task_charges_nothing(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator, path: str,
) -> None:
    """Subscriptions started while the workflow workers are away (a deploy, an outage) have
    not run their first workflow task. The operator cancels one in the UI before the workers
    come back. Its first workflow task then holds the start and the cancel request: nothing
    was decided before the cancel, so nothing may be charged (the code before, and a cancel
    update, charge nothing). Plain: an interval plan due at once; ruled: open rules."""
    registry = only(CARRIER)
    async with split_worker(temporal_env, settings, engine, registry,
                            open_rules() if path == "ruled" else None,
                            carrier_timeout_seconds=5.0) as split:
        await split.stop_workflows()
        request = priced(CARRIER, Period.INTERVAL)
        sid = (await split.client.start_subscription(request)).subscription_id
        handle = split.client.handle(sid)
        try:
            await handle.cancel()
            await split.start_workflows()
            status = await ended(handle, 10)
            await asyncio.sleep(0.5)
            kinds = [e.event_type for e in (await handle.fetch_history()).events]
            assert kinds[:3] == [EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
                                 EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
                                 EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED]
            assert status == WorkflowExecutionStatus.CANCELED
            assert row_status(engine, sid) == "cancelled"
            debits = await simulator.transactions(CARRIER, request.msisdn)
            ours = await books_match(simulator, engine, CARRIER, request.msisdn, sid)
            if debits or split.calls.of("charge"):
                state: BillingState = await handle.query(SubscriptionWorkflow.state)
                raise ChargedAfterCancel(
                    f"cancelled before its first workflow task; carrier books "
                    f"{[(d['kind'], d['amount']) for d in debits]}, ledger {ours}, cycle 1 "
                    f"{state.recent_cycles[0].outcome if state.recent_cycles else None!r}")
        finally:
            await stop(handle)


async def test_the_code_before_charged_nothing_when_cancelled_before_its_first_task(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator, tmp_path: Path,
) -> None:
    """The control for attack 2: the code before 7d4d11b (``BEFORE``, its own worker process)
    in the same situation. Its run awaited the charge directly, so the cancel cancelled the
    charge's activity in the workflow task that scheduled it: never sent. That history (a
    cancel in the first workflow task) also replays on today's code (the unpatched branch)."""
    queue = f"tc2-old-{uuid.uuid4().hex[:8]}"
    client = SubscriptionClient(temporal_env.client, engine, only(CARRIER), queue,
                                settings.deployment_id)
    request = priced(CARRIER, Period.INTERVAL)
    sid = (await client.start_subscription(request)).subscription_id
    handle = client.handle(sid)
    await handle.cancel()  # (before any worker polls the queue)
    async with old_worker(temporal_env, settings, tmp_path, queue, CARRIER):
        try:
            status = await ended(handle, 10)
            history = await handle.fetch_history()
        finally:
            await stop(handle)
    assert status == WorkflowExecutionStatus.CANCELED
    assert [e.event_type for e in history.events][:3] == [
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
        EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED]
    assert await simulator.transactions(CARRIER, request.msisdn) == []
    assert operations_of(engine, sid) == [] and ledger_of(engine, sid) == []
    try:
        await Replayer(workflows=WORKFLOWS).replay_workflow(history)
    except NondeterminismError as exc:
        raise NondeterministicUpgrade(str(exc)[:400]) from None


# -- 3. a pause whose status write is retried when the cancel arrives ---------------------------


class LeftLive(AssertionError):
    """The workflow ended cancelled; the subscription's row says it is live (paused), so the
    subscriber can never subscribe to the product again."""


def fail_writes_until(monkeypatch: pytest.MonkeyPatch, status: str, release: asyncio.Event
                      ) -> list[str]:
    """Writes of ``status`` to a subscription row fail as SQLite does under contention until
    ``release`` is set (the activity fails; Temporal retries it: 1 s, 2 s, 4 s...); returns
    the statuses refused."""
    refused: list[str] = []
    original = BillingActivities._write_status

    def write(self: BillingActivities, change: StatusInput) -> None:
        if change.status == status and not release.is_set():
            refused.append(change.status)
            raise OperationalError("UPDATE subscription", {},
                                   sqlite3.OperationalError("database is locked"))
        original(self, change)

    monkeypatch.setattr(BillingActivities, "_write_status", write)
    return refused


async def eventually_async(check: Callable[[], Awaitable[Any]], seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    while not (value := await check()):
        assert time.monotonic() < deadline, f"not reached within {seconds} s"
        await asyncio.sleep(0.1)
    return value


async def test_a_cancel_while_a_pauses_status_write_is_retried_leaves_the_row_cancelled(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A subscription whose first charge is an hour away is paused; the pause's write of the
    row fails (SQLite busy) and Temporal retries it (1 s, 2 s, 4 s...). The operator cancels in
    Temporal meanwhile: the workflow records the cancellation (its own write succeeds), waits
    for the pause handler, and closes CANCELED; the pause's retried write then succeeds. The
    row must say cancelled. (The cancel update takes the same path: ``_record_cancellation``
    before the handlers finish.)"""
    registry = only(CARRIER)
    release = asyncio.Event()
    refused = fail_writes_until(monkeypatch, "paused", release)
    async with split_worker(temporal_env, settings, engine, registry,
                            carrier_timeout_seconds=5.0) as split:
        request = priced(CARRIER, Period.INTERVAL).model_copy(update={
            "first_charge_at": await temporal_env.get_current_time() + timedelta(hours=1)})
        sid = (await split.client.start_subscription(request)).subscription_id
        handle = split.client.handle(sid)
        try:
            pausing = asyncio.create_task(split.client.pause(sid))
            await eventually(lambda: refused, 5, step=0.02)
            await handle.cancel()
            await eventually(lambda: row_status(engine, sid) == "cancelled", 5)
            release.set()  # the database is free again: the pause's next attempt writes
            state = await asyncio.wait_for(pausing, 10)
            status = await ended(handle, 5)
            assert status == WorkflowExecutionStatus.CANCELED
            assert state.paused and state.cancel_requested
            assert await simulator.transactions(CARRIER, request.msisdn) == []
            assert (await handle.query(SubscriptionWorkflow.state)).status == "cancelled"
            row = row_status(engine, sid)
            if row != "cancelled":
                try:
                    again = await split.client.start_subscription(request.model_copy(update={
                        "first_charge_at": None}))
                    await stop(split.client.handle(again.subscription_id))
                    buys = "may subscribe again"
                except SubscriptionRequestError as exc:
                    buys = f"cannot subscribe again: {exc}"
                raise LeftLive(f"workflow {status.name}, its state cancelled; row {row} "
                               f"(the pause's write refused {len(refused)} times, then "
                               f"retried); the subscriber {buys}")
        finally:
            await stop(handle)


# -- 4. an operator's refund refused by the carrier when the cancel arrives ----------------------


class HiddenRefund(AssertionError):
    """A refund owed to the subscriber (never taken by the carrier) is neither sent, nor in the
    ledger, nor listed as unsettled: the operation is left SENDING, which only a workflow that
    is settling it may hold, so no operator sees it and ``starter.py settle`` refuses it."""


async def test_a_cancel_while_an_operators_refund_is_refused_ends_soon_and_lists_it_owed(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator, game_backend: GameBackendServer,
) -> None:
    """A ruled subscription every 10 s, cycle 1 paid and delivered. An operator refunds it
    (request_refund); the carrier answers 503 (nothing happened) and the refund waits 5 s to
    be sent again. The operator cancels the subscription in Temporal meanwhile. The refund
    workflow is told to end soon: it is not sent again and the subscription ends at once
    (withstood); cycle 2 is never charged (withstood). The refund is owed and was never
    taken: it must stay listed as unsettled, for an operator to send again."""
    registry = only(CARRIER)
    async with split_worker(temporal_env, settings, engine, registry, open_rules(),
                            carrier_timeout_seconds=5.0) as split:
        client = split.client
        request = priced(CARRIER, Period.INTERVAL)
        sid = (await client.start_subscription(request)).subscription_id
        handle = client.handle(sid)
        try:
            await eventually(lambda: ledger_of(engine, sid), 5)
            await asyncio.sleep(0.5)  # (delivered)
            await simulator.fault(CARRIER, "error_503", request.msisdn, count=3)
            refunding = asyncio.create_task(client.request_refund(sid, 1, None, "ticket-1"))
            await eventually(lambda: [o for o in operations_of(engine, sid)
                                      if o.kind == LedgerKind.REFUND
                                      and o.state == OperationState.RETRYABLE], 5)
            await handle.cancel()
            cancelled_at = time.monotonic()
            status = await ended(handle, 8)
            record: RefundRecord = await asyncio.wait_for(refunding, 5)
            assert status == WorkflowExecutionStatus.CANCELED
            assert time.monotonic() - cancelled_at < 4  # before the refund's 5 s backoff
            await temporal_env.sleep(timedelta(seconds=15))  # past cycle 2's due time
            await books_match(simulator, engine, CARRIER, request.msisdn, sid)
            debits = await simulator.transactions(CARRIER, request.msisdn)
            assert [d["kind"] for d in debits] == ["charge"]
            assert [c[1] for c in split.calls.log if c[1] != "status"] == ["charge", "refund"]
            assert row_status(engine, sid) == "cancelled"
            assert record.outcome == "unsettled"
            [refund] = [o for o in operations_of(engine, sid) if o.kind == LedgerKind.REFUND]
            key = refund.idempotency_key
            if key not in await listed(client, CARRIER):
                again = await client.settle(key)
                raise HiddenRefund(
                    f"refund {key}: state {refund.state}, sends {refund.sends} (sent once), "
                    f"not listed; the request says {record.outcome!r}; `settle` answers "
                    f"{again.state!r}: {again.message!r}")
        finally:
            await stop(handle)


# -- 5. a charge settled late while the ending workflow waits for an update handler ---------------


class UndeliveredPayment(AssertionError):
    """The subscriber paid (the ledger says so); nothing was delivered, nothing refunded, and
    nothing tells an operator."""


async def test_a_charge_settled_late_while_the_cancelled_workflow_ends_is_still_delivered(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator, game_backend: GameBackendServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ruled subscription every 10 s; cycle 1's charge debits and loses its answer, look-ups
    fail until the settle deadline (1 s here): the charge is listed as unsettled and the
    subscription goes on. It is paused; the pause's row write fails (SQLite busy) and is
    retried. The operator cancels it in Temporal: the cancellation is recorded and the
    workflow waits for the pause handler. Meanwhile an operator settles the charge
    (``starter.py settle``: succeeded), which tells the workflow (operation_settled): the
    cycle is paid, so the workflow starts delivering it; the game backend is briefly
    unavailable (the grant is retried). The pause's write then succeeds, and the game backend
    is back. Paid must end delivered, refunded, or at least shown to an operator."""
    registry = only(CARRIER, settle_delays_seconds=[0.5], settle_deadline_seconds=1.0)
    release = asyncio.Event()
    failed = fail_writes_until(monkeypatch, "paused", release)
    async with split_worker(temporal_env, settings, engine, registry, open_rules(),
                            carrier_timeout_seconds=5.0) as split:
        client = split.client
        request = priced(CARRIER, Period.INTERVAL)
        await simulator.fault(CARRIER, "reset_after_debit", request.msisdn)
        await simulator.fault(CARRIER, "lookup_error", count=20)
        started = await client.start_subscription(request)
        sid = started.subscription_id
        handle = client.handle(sid)
        try:
            async def listed_here() -> list[str]:
                return [u.idempotency_key for u in await client.unsettled(CARRIER)
                        if u.subscription_id == sid]

            [key] = await eventually_async(listed_here, 10)
            simulator.core.faults.clear()
            pausing = asyncio.create_task(client.pause(sid))
            await eventually(lambda: failed, 5, step=0.02)
            await handle.cancel()
            await eventually(lambda: row_status(engine, sid) == "cancelled", 5)
            await game_backend.control("faults", {
                "kind": "unavailable", "operation": "grant", "count": 100,
                "subscriber_ref": subscriber_ref(engine, split.settings, sid)})
            late = await client.settle(key)
            assert (late.state, late.outcome) == ("settled", "succeeded"), late
            await asyncio.sleep(0.5)  # (operation_settled reached the workflow: it delivers)
            release.set()  # the pause's next write succeeds
            assert (await asyncio.wait_for(pausing, 10)).paused
            await game_backend.control("faults", {"kind": "clear"})  # the game is back
            status = await ended(handle, 15)
            await asyncio.sleep(1)
            entries = ledger_of(engine, sid)
            await books_match(simulator, engine, CARRIER, request.msisdn, sid)
            assert [e.kind for e in entries] == [LedgerKind.CHARGE]
            assert status == WorkflowExecutionStatus.CANCELED
            state: BillingState = await handle.query(SubscriptionWorkflow.state)
            grants = await grants_of(game_backend, started.key_prefix)
            if not grants and key not in await listed_here() and not (
                    state.billing_issue or state.refunds_owed):
                raise UndeliveredPayment(
                    f"charged {entries[0].amount_minor} {entries[0].currency} (settled late); "
                    f"no grant, no refund, not listed; cycle 1 {state.recent_cycles[0]}; "
                    f"BillingIssue {state.billing_issue!r}; workflow {status.name}")
        finally:
            await stop(handle)


# -- 6. a cancel while the workflow waits: for the opt-in code, while paused, postponed ----------


def window_closed_now(now: datetime) -> RulesResolver:
    """Open rules whose charging window (one minute) opens ten minutes from ``now``, local
    time: a charge due now is postponed."""
    base = open_rules()

    def resolve(country: str, carrier: str, product: str, price: int, period: str,
                zone: str | None) -> ChargingRules:
        rules = base(country, carrier, product, price, period, zone)
        local = now.astimezone(ZoneInfo(rules.timezone))
        start = min((local.hour * 60 + local.minute + 10) % 1440, 1438)
        return replace(rules, window_start_minute=start, window_end_minute=start + 1)

    return resolve


@pytest.mark.parametrize("waiting", ["opt-in code", "paused", "postponed"])
async def test_a_cancel_while_the_workflow_waits_ends_it_at_once_and_charges_nothing_more(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator, waiting: str,
) -> None:
    """A ruled subscription every 10 s, cancelled in Temporal while it waits: (opt-in code)
    for the code it texted, before any charge; (paused) paused after cycle 1, with cycle 2
    fallen due; (postponed) cycle 1 due outside the charging window, postponed ten minutes.
    Withstood: each wait wakes on cancel_requested; the workflow closes CANCELED within
    seconds, the row says cancelled, and nothing is charged after, even once the window opens
    and the cycles fall due."""
    assert settings.notice_carrier_id is not None
    registry = only(CARRIER, settings.notice_carrier_id)  # (the opt-in code's text)
    now = await temporal_env.get_current_time()
    resolver = {"opt-in code": open_rules(opt_in="sms_pin", pin_digits=4,
                                          opt_in_deadline_seconds=3600),
                "paused": open_rules(), "postponed": window_closed_now(now)}[waiting]
    async with split_worker(temporal_env, settings, engine, registry, resolver,
                            carrier_timeout_seconds=5.0) as split:
        client = split.client
        request = priced(CARRIER, Period.INTERVAL)
        sid = (await client.start_subscription(request)).subscription_id
        handle = client.handle(sid)
        charged = 0
        try:
            if waiting == "opt-in code":
                await eventually(lambda: row_status(engine, sid) == "pending_opt_in", 5)
                await asyncio.sleep(1)  # (the code is texted; the deadline runs)
            elif waiting == "paused":
                await eventually(lambda: ledger_of(engine, sid), 5)
                charged = 1
                await asyncio.sleep(0.5)  # (delivered)
                await client.pause(sid)
                await temporal_env.sleep(timedelta(seconds=15))  # cycle 2 falls due
            else:
                async def postponed() -> bool:
                    state: BillingState = await handle.query(SubscriptionWorkflow.state)
                    return state.postponements > 0
                await waiting_for(postponed, 5)
            state: BillingState = await handle.query(SubscriptionWorkflow.state)
            assert state.next_cycle == 1 + charged and not state.cancel_requested
            await handle.cancel()
            assert await ended(handle, 4) == WorkflowExecutionStatus.CANCELED
            await temporal_env.sleep(timedelta(minutes=20))  # the window opens; cycles due
            await asyncio.sleep(0.5)
            assert len(await books_match(simulator, engine, CARRIER, request.msisdn,
                                         sid)) == charged
            assert len(split.calls.of("charge")) == charged
            assert row_status(engine, sid) == "cancelled"
            state = await handle.query(SubscriptionWorkflow.state)
            assert state.status == "cancelled" and state.cancel_requested
        finally:
            await stop(handle)


class ChargedWhilePaused(AssertionError):
    """A paused subscription was charged (the pause update promises no charge falls due)."""


@pytest.mark.xfail(strict=True, raises=ChargedWhilePaused, reason=(
    "the plain path of SubscriptionWorkflow._bill (no rules) never reads state.paused: it "
    "sleeps to the next due time and charges (and sets the status back to active)"))
async def test_a_plain_subscription_paused_then_cancelled_charges_nothing_after_the_pause(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """The plain path (no rules): a subscription every 10 s, cycle 1 charged, then paused
    (the update succeeds, the row says paused); 25 s later the operator cancels it in
    Temporal. Nothing may be charged between the pause and the cancel. (Not a fault of
    7d4d11b: the pause is ignored by the plain loop; the cancel then ends it.)"""
    registry = only(CARRIER)
    async with split_worker(temporal_env, settings, engine, registry,
                            carrier_timeout_seconds=5.0) as split:
        request = priced(CARRIER, Period.INTERVAL)
        sid = (await split.client.start_subscription(request)).subscription_id
        handle = split.client.handle(sid)
        try:
            await eventually(lambda: ledger_of(engine, sid), 5)
            paused = await split.client.pause(sid)
            assert paused.paused and row_status(engine, sid) == "paused"
            await temporal_env.sleep(timedelta(seconds=25))  # cycles 2 and 3 fall due
            await asyncio.sleep(0.5)
            state: BillingState = await handle.query(SubscriptionWorkflow.state)
            await handle.cancel()
            assert await ended(handle, 5) == WorkflowExecutionStatus.CANCELED
            assert row_status(engine, sid) == "cancelled"
            ours = await books_match(simulator, engine, CARRIER, request.msisdn, sid)
            if len(ours) > 1:
                raise ChargedWhilePaused(
                    f"charged {len(ours)} times, {len(ours) - 1} after the pause; the state "
                    f"said {state.status!r} (paused={state.paused}) before the cancel")
        finally:
            await stop(handle)


# -- 7. the cancel update and a Temporal cancel together, while a charge settles ---------------


async def test_the_cancel_update_and_a_temporal_cancel_together_record_one_cancellation(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """A one-off purchase: the carrier debits and drops the connection (PENDING); look-ups
    fail. The operator sends the cancel update and presses Cancel in the UI at the same
    moment. Withstood: the update returns at once (it waits for no charge); the Temporal
    cancel ends the settling: the charge is listed and looked up once, never resent; one
    cancellation is recorded (one status write); the workflow closes CANCELED."""
    registry = only(CARRIER)
    async with split_worker(temporal_env, settings, engine, registry,
                            carrier_timeout_seconds=5.0) as split:
        client = split.client
        request = one_off(CARRIER)
        await simulator.fault(CARRIER, "reset_after_debit", request.msisdn)
        sid = (await client.start_subscription(request)).subscription_id
        handle = client.handle(sid)
        await eventually(lambda: [o for o in operations_of(engine, sid)
                                  if o.state == OperationState.PENDING], 10)
        await simulator.fault(CARRIER, "lookup_error", count=5)
        answered, _ = await asyncio.gather(client.cancel_subscription(sid), handle.cancel())
        assert answered.cancel_requested
        assert await ended(handle, 10) == WorkflowExecutionStatus.CANCELED
        [operation] = operations_of(engine, sid)
        assert (operation.state, operation.sends) == (OperationState.UNSETTLED, 1)
        assert operation.idempotency_key in await listed(client, CARRIER)
        assert len(await simulator.transactions(CARRIER, request.msisdn)) == 1
        assert ledger_of(engine, sid) == []
        assert [c[1] for c in split.calls.log] == ["charge", "status"]  # looked up once
        assert row_status(engine, sid) == "cancelled"
        writes = [e async for e in handle.fetch_history_events()
                  if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
                  and e.activity_task_scheduled_event_attributes.activity_type.name
                  == "record_subscription_status"]
        assert len(writes) == 1


# -- 8. histories recorded by the code before 7d4d11b, without any cancel, replay unchanged -------


async def test_a_ruled_history_of_the_old_code_with_updates_and_refund_children_replays(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator, game_backend: GameBackendServer, tmp_path: Path,
) -> None:
    """The code before 7d4d11b (``BEFORE``, its own worker process) bills a ruled subscription
    every 10 s: a pause update that reaches the workflow in its first workflow task (with the
    start: the new code's billing task starts one step later than the old code's run did),
    a resume, cycle 1 paid and delivered, an operator's refund of it (request_refund: a
    RefundWorkflow child the old code ran with ``execute_child_workflow``, the new code with
    ``start_child_workflow``), cycle 2 paid and its grant refused for good (revoked, refunded
    by another child), then the cancel update. Withstood: the history replays on today's
    code (no end_soon signal, no patch marker, no extra command)."""
    queue = f"tc2-old-{uuid.uuid4().hex[:8]}"
    client = SubscriptionClient(temporal_env.client, engine, only(CARRIER), queue,
                                settings.deployment_id, apply_rules=True,
                                rules_resolver=open_rules())
    request = priced(CARRIER, Period.INTERVAL)
    started = await client.start_subscription(request)
    sid = started.subscription_id
    handle = client.handle(sid)
    pausing = asyncio.create_task(client.pause(sid))  # (before any worker polls the queue)
    await asyncio.sleep(0.3)
    async with old_worker(temporal_env, settings, tmp_path, queue, CARRIER):
        try:
            assert (await asyncio.wait_for(pausing, 15)).paused
            await client.resume(sid)
            await eventually(lambda: ledger_of(engine, sid), 10)
            await waiting_for(lambda: grant_asked(game_backend, started.key_prefix), 5)
            record = await client.request_refund(sid, 1, None, "ticket-1")
            assert record.outcome == "succeeded"
            await game_backend.control("faults", {
                "kind": "refuse", "subscriber_ref": subscriber_ref(engine, settings, sid)})
            await temporal_env.sleep(timedelta(seconds=10))  # cycle 2 falls due

            async def cycle_2_refunded() -> bool:
                state: BillingState = await handle.query(SubscriptionWorkflow.state)
                return any(r.cycle == 2 and r.delivery == "refunded"
                           for r in state.recent_cycles)

            await waiting_for(cycle_2_refunded, 15)
            await client.cancel_subscription(sid)
            assert await ended(handle, 10) == WorkflowExecutionStatus.COMPLETED
            history = await handle.fetch_history()
        finally:
            await stop(handle)
    ours = await books_match(simulator, engine, CARRIER, request.msisdn, sid)
    assert sorted(kind for kind, _ in ours) == ["charge", "charge", "refund", "refund"]
    kinds = [e.event_type for e in history.events]
    assert kinds.count(EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED) == 2
    # the pause, accepted by the first workflow task (an update's events follow its task's)
    assert kinds[:5] == [EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
                         EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
                         EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
                         EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
                         EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED]
    try:
        await Replayer(workflows=WORKFLOWS).replay_workflow(history)
    except NondeterminismError as exc:
        raise NondeterministicUpgrade(str(exc)[:400]) from None
