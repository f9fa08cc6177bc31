"""Attacks on a Temporal cancellation (the UI's Cancel, ``temporal workflow cancel``) of a
subscription or refund workflow while money is moving. The workflow catches it at its top and
ends as the cancel update does (workflows/subscription.py, workflows/refund.py): nothing in
flight is interrupted, a paid cycle is delivered or refunded, an operation with no final answer
is listed as unsettled and looked up once (``OperationSettler.end_soon``), the row says
cancelled, and the subscription closes CANCELED; a refund workflow returns what happened.
Histories recorded before (``BEFORE``) replay the older behaviour (``workflow.patched``).

Every test drives the real components: the time-skipping Temporal server (time is skipped only
where a test says so; otherwise timers run in real time), workers built by
``worker.build_worker``, the carrier simulator and the game backend over their sockets, the
SQLite database; one test needs a real dev server (``temporal server start-dev``, beside the
interpreter), since the test server does not apply parent close policies. Charges go through
the carrier's queue (``Settings.local_charges`` False, the default): a cancellation then
reaches the workflow at once (a local activity holds it until the workflow task's heartbeat).

Each test asserts the safe outcome; the named AssertionError subclasses say which loss an
attack would have caused (each succeeded against the code before the fix)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowHistory,
)
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

from activities.billing import BillingActivities
from carriers.base import CarrierAdapter, OperationResult
from carriers.loader import CarrierPromises, Registry, carrier_task_queue
from carriers.numbers import sample_msisdn
from models.tables import LedgerKind, OperationState, Period, Subscription
from settings import PROJECT_ROOT, Settings, venv_binary
from starter import StartSubscriptionRequest, SubscriptionClient, SubscriptionRequestError
from tests.conftest import GameBackendServer, Simulator
from tests.test_attacks_flows import grants_of, subscriber_ref
from tests.test_attacks_local_charge import (
    _WORKER_SCRIPT,
    CARRIER,
    REGISTRY,
    LostCharge,
    Running,
    _plain_settings,
    books_match,
    eventually,
    ledger_of,
    one_off,
    only,
    operations_of,
    own_worker,
)
from tests.workflow_helpers import rules_with
from worker import WORKFLOWS, WorkerGroup
from workflows import search_attributes as sa
from workflows.refund import RefundWorkflow, refund_workflow_id
from workflows.subscription import SubscriptionWorkflow
from workflows.types import BillingState, RefundRequestInput

# the last commit whose workflows let a Temporal cancellation reach whatever they awaited
BEFORE = "c2b7f99"

class UndeliveredPayment(AssertionError):
    """The subscriber paid; nothing was delivered, nothing refunded, nothing tells an
    operator."""


class CancelSwallowed(AssertionError):
    """The operator cancelled the workflow in Temporal; it went on (and billed again)."""


class RefundMisreported(AssertionError):
    """The carrier refunded and our ledger says so; the subscription says the refund is owed."""


class LostRefund(AssertionError):
    """The carrier credited the subscriber back; the ledger does not say so and nothing lists
    the refund as unsettled."""


class LeftLive(AssertionError):
    """A subscription whose workflow ended still counts as live in the database."""


class NondeterministicUpgrade(AssertionError):
    """A history recorded by the code before 3c52462 does not replay on the code after it."""


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
async def clean_faults(simulator: Simulator, game_backend: GameBackendServer) -> Any:
    """Faults a test injected and did not use up never reach the next test."""
    yield
    simulator.core.faults.clear()
    simulator.core.unavailable_until.clear()
    await game_backend.control("faults", {"kind": "clear"})


# ruled, with nothing that would move a charge in time: no opt-in, a window open all day, no
# maintenance, no texts (so the only activities are the charge, the delivery and a refund)
OPEN_RULES = rules_with(opt_in="none", window_start_minute=0, window_end_minute=1440,
                        maintenance=[], preferred_minute=None, welcome_text=False,
                        receipt_after_charge=False, monthly_reminder=False,
                        renewal_reminder_days_before=None, balance_check=False)


def queued_client(run: Running, registry: Registry, **changes: Any) -> SubscriptionClient:
    """A client on the worker's task queue whose charges go through the carrier's queue
    (``Settings.local_charges`` False, the default)."""
    return SubscriptionClient(run.client.client, run.client.engine, registry,
                              run.settings.task_queue, run.settings.deployment_id,
                              local_charges=False, **changes)


def billing_of(group: WorkerGroup) -> BillingActivities:
    for fn in group.workers[0].config()["activities"]:
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, BillingActivities):
            return owner
    raise AssertionError("no billing activities in the workflow worker")


def adapter_of(run: Running, carrier_id: str) -> CarrierAdapter:
    return billing_of(run.group)._adapters.get(carrier_id)


async def ended(handle: WorkflowHandle[Any, Any], seconds: float) -> WorkflowExecutionStatus:
    """The workflow's status once it is no longer running, or after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        status = (await handle.describe()).status
        assert status is not None
        if status != WorkflowExecutionStatus.RUNNING or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.1)


async def stop(handle: WorkflowHandle[Any, Any]) -> None:
    """Ends a workflow an attack left running (so it bills no one after the test)."""
    if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
        await handle.terminate("attack over")


async def listed(client: SubscriptionClient, carrier_id: str) -> list[str]:
    return [u.idempotency_key for u in await client.unsettled(carrier_id)]


async def grant_asked(game_backend: GameBackendServer, key_prefix: str) -> bool:
    books = await game_backend.control("books")
    return any(g.startswith(key_prefix) for g in books["grant_requests"])


async def waiting(check: Callable[[], Awaitable[bool]], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {seconds} s")
        await asyncio.sleep(0.05)


def priced(carrier_id: str, period: Period) -> StartSubscriptionRequest:
    """A new subscriber's request for one of ``carrier_id``'s price points of ``period``."""
    carrier = REGISTRY.carriers[carrier_id]
    price = next(p for p in carrier.price_points if p.period is period)
    return StartSubscriptionRequest(
        msisdn=sample_msisdn(carrier, REGISTRY, random.Random(uuid.uuid4().hex)),
        product_id=price.product, period=price.period,
        amount_minor=REGISTRY.amount_minor(carrier_id, price),
        currency=REGISTRY.currency_of(carrier_id), carrier_id=carrier_id)


def refunds_in(entries: list[Any]) -> list[Any]:
    return [e for e in entries if e.kind == LedgerKind.REFUND]


# -- 1. a cancel while the carrier's refusal is waited out -------------------------------------


async def test_a_cancel_in_the_backoff_after_a_refusal_ends_it_and_sends_nothing_more(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """The carrier answers 503 (nothing happened; the workflow waits 5 s to send again); the
    operator cancels during that wait. Nothing moved, so nothing is listed; nothing is sent
    again; the workflow ends at once."""
    registry = only(CARRIER)
    async with own_worker(temporal_env, settings, engine, registry,
                          carrier_timeout_seconds=5.0) as run:
        client = queued_client(run, registry)
        request = one_off(CARRIER)
        await simulator.fault(CARRIER, "error_503", request.msisdn)
        sid = (await client.start_subscription(request)).subscription_id
        await eventually(lambda: [o for o in operations_of(engine, sid)
                                  if o.state == OperationState.RETRYABLE], 10)
        handle = client.handle(sid)
        await handle.cancel()
        assert await ended(handle, 3) == WorkflowExecutionStatus.CANCELED
        await asyncio.sleep(5.5)  # past the backoff: had anything survived, it would send now
        [operation] = operations_of(engine, sid)
        assert (operation.state, operation.sends) == (OperationState.RETRYABLE, 1)
        assert await simulator.transactions(CARRIER, request.msisdn) == []
        assert ledger_of(engine, sid) == []
        assert operation.idempotency_key not in await listed(client, CARRIER)
        assert [c[1] for c in run.calls.log] == ["charge"]


# -- 2. a cancel during a resend whose activity fails after the debit ----------------------------


async def test_a_cancel_during_a_resend_that_fails_after_the_debit_lists_the_charge(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """First send: 503 (the operation is RETRYABLE). Second send, 5 s later: the carrier
    debits and answers success without its reference, which our side refuses to book
    (ConfigurationError: not retried, the activity fails). The operator cancels while that
    second attempt is in flight. The debit must end in the ledger or among the operations
    listed as unsettled."""
    registry = only(CARRIER)
    async with own_worker(temporal_env, settings, engine, registry,
                          carrier_timeout_seconds=5.0) as run:
        client = queued_client(run, registry)
        adapter = adapter_of(run, CARRIER)
        sending = adapter.charge
        resent = asyncio.Event()

        async def charge(*args: Any, **kwargs: Any) -> OperationResult:
            answer: OperationResult = await sending(*args, **kwargs)
            if len(run.calls.of("charge")) == 2:  # the resend (the first was refused)
                resent.set()
                await asyncio.sleep(1.5)  # the cancel arrives meanwhile
                return answer.model_copy(update={"carrier_reference": None})
            return answer

        adapter.charge = charge  # type: ignore[method-assign]
        request = one_off(CARRIER)
        await simulator.fault(CARRIER, "error_503", request.msisdn)
        sid = (await client.start_subscription(request)).subscription_id
        handle = client.handle(sid)
        await asyncio.wait_for(resent.wait(), 15)
        await handle.cancel()
        status = await ended(handle, 10)
        [operation] = operations_of(engine, sid)
        debits = await simulator.transactions(CARRIER, request.msisdn)
        assert status == WorkflowExecutionStatus.CANCELED
        assert len(debits) == 1 and operation.sends == 2
        if not ledger_of(engine, sid) and operation.idempotency_key not in await listed(
                client, CARRIER):
            raise LostCharge(f"workflow {status.name}, operation {operation.state}, no ledger "
                             "entry, not listed as unsettled; the carrier debited")


# -- 3. a cancel before the operation is even recorded ---------------------------------------


async def test_a_cancel_while_the_queued_charge_waits_for_a_slot_books_what_it_then_sends(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """One slot for the carrier, held by another purchase's slow charge: the second purchase's
    charge waits in the carrier's queue, recorded nowhere yet. The operator cancels it. The
    attempt is awaited to its end: it is sent once the slot frees (after the cancel: nothing
    can stop an activity task already handed to the queue without a heartbeat), booked, never
    listed, and the workflow ends; both subscribers' books match the ledger."""
    registry = only(CARRIER)
    async with own_worker(temporal_env, settings, engine, registry,
                          max_concurrent_activities_per_carrier=1,
                          carrier_timeout_seconds=10.0) as run:
        client = queued_client(run, registry)
        first, second = one_off(CARRIER), one_off(CARRIER)
        await simulator.fault(CARRIER, "latency", first.msisdn, delay_seconds=3)
        first_id = (await client.start_subscription(first)).subscription_id
        await eventually(lambda: run.calls.in_flight.get(CARRIER) == 1, 5, step=0.02)
        second_id = (await client.start_subscription(second)).subscription_id
        await asyncio.sleep(0.5)
        assert operations_of(engine, second_id) == []  # not even recorded yet
        handle = client.handle(second_id)
        await handle.cancel()
        cancelled_at = time.monotonic()
        assert await ended(handle, 15) == WorkflowExecutionStatus.CANCELED
        for request, sid in ((first, first_id), (second, second_id)):
            assert len(await books_match(simulator, engine, CARRIER, request.msisdn, sid)) == 1
            [operation] = operations_of(engine, sid)
            assert (operation.state, operation.sends) == (OperationState.SETTLED, 1)
            assert operation.idempotency_key not in await listed(client, CARRIER)
        sends = sorted(c[2] for c in run.calls.of("charge"))
        assert len(sends) == 2 and sends[1] > cancelled_at  # sent after the operator's cancel


# -- 4. a cancel while a queued charge's answer is lost ---------------------------------------


async def test_a_cancel_while_a_queued_charge_loses_its_answer_books_it_by_one_look_up(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """The carrier debits and answers only after our 2 s timeout; the queued activity (no
    heartbeat) is in its call when the operator cancels. It finishes (unknown), the charge is
    listed, looked up once (found: booked) and the workflow ends: one send, one debit, one
    ledger entry, nothing left listed."""
    registry = only(CARRIER)
    async with own_worker(temporal_env, settings, engine, registry,
                          carrier_timeout_seconds=2.0) as run:
        client = queued_client(run, registry)
        request = one_off(CARRIER)
        await simulator.fault(CARRIER, "timeout_after_debit", request.msisdn, delay_seconds=4)
        sid = (await client.start_subscription(request)).subscription_id
        await eventually(lambda: run.calls.in_flight.get(CARRIER) == 1, 5, step=0.02)
        handle = client.handle(sid)
        await handle.cancel()
        assert await ended(handle, 15) == WorkflowExecutionStatus.CANCELED
        assert len(await books_match(simulator, engine, CARRIER, request.msisdn, sid)) == 1
        [operation] = operations_of(engine, sid)
        assert (operation.state, operation.sends) == (OperationState.SETTLED, 1)
        assert operation.idempotency_key not in await listed(client, CARRIER)
        assert [c[1] for c in run.calls.log] == ["charge", "status"]


async def test_a_cancel_at_a_carrier_without_look_up_lists_the_charge_and_never_resends(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """A carrier that deduplicates our key but has no look-up (registry data). It debits and
    drops the connection: the charge is PENDING. The operator cancels during the wait. The
    one look-up cannot ask the carrier and never resends: the charge stays listed, for a late
    result or reconciliation."""
    registry = only(CARRIER, promises=CarrierPromises(deduplicates_by_key="replay",
                                                      status_lookup=False))
    async with own_worker(temporal_env, settings, engine, registry,
                          carrier_timeout_seconds=5.0) as run:
        client = queued_client(run, registry)
        request = one_off(CARRIER)
        await simulator.fault(CARRIER, "reset_after_debit", request.msisdn)
        sid = (await client.start_subscription(request)).subscription_id
        await eventually(lambda: [o for o in operations_of(engine, sid)
                                  if o.state == OperationState.PENDING], 10)
        handle = client.handle(sid)
        await handle.cancel()
        assert await ended(handle, 10) == WorkflowExecutionStatus.CANCELED
        [operation] = operations_of(engine, sid)
        assert (operation.state, operation.sends) == (OperationState.UNSETTLED, 1)
        assert operation.idempotency_key in await listed(client, CARRIER)
        assert len(await simulator.transactions(CARRIER, request.msisdn)) == 1
        assert ledger_of(engine, sid) == []
        assert [c[1] for c in run.calls.log] == ["charge"]  # no resend, no look-up


async def test_a_cancel_twice_while_a_charge_settles_is_one_cancel_and_lists_it(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """The charge is PENDING (debited, connection dropped) and look-ups fail; the operator
    presses Cancel twice. The second is a no-op on the server (one cancel request in the
    history), so the listing and the look-up run to their end: listed, nothing resent."""
    registry = only(CARRIER)
    async with own_worker(temporal_env, settings, engine, registry,
                          carrier_timeout_seconds=5.0) as run:
        client = queued_client(run, registry)
        request = one_off(CARRIER)
        await simulator.fault(CARRIER, "reset_after_debit", request.msisdn)
        sid = (await client.start_subscription(request)).subscription_id
        await eventually(lambda: [o for o in operations_of(engine, sid)
                                  if o.state == OperationState.PENDING], 10)
        await simulator.fault(CARRIER, "lookup_error", count=5)
        handle = client.handle(sid)
        await asyncio.gather(handle.cancel(), handle.cancel())
        assert await ended(handle, 10) == WorkflowExecutionStatus.CANCELED
        requests = [e async for e in handle.fetch_history_events() if e.event_type ==
                    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED]
        assert len(requests) == 1
        [operation] = operations_of(engine, sid)
        assert (operation.state, operation.sends) == (OperationState.UNSETTLED, 1)
        assert operation.idempotency_key in await listed(client, CARRIER)
        assert len(await simulator.transactions(CARRIER, request.msisdn)) == 1
        assert ledger_of(engine, sid) == []
        assert [c[1] for c in run.calls.log] == ["charge", "status"]  # looked up once


async def test_a_cancel_of_a_refund_whose_answer_was_lost_books_it_by_one_look_up(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """A one-off purchase is paid; an operator refunds it (RefundWorkflow, as ``starter.py
    refund`` starts it). The carrier credits and drops the connection: the refund is PENDING.
    The operator then cancels the refund's workflow in Temporal. The refund is listed, looked
    up once (found: booked), never sent again, and the workflow returns it; the books match
    the ledger."""
    registry = only(CARRIER)
    async with own_worker(temporal_env, settings, engine, registry,
                          carrier_timeout_seconds=5.0) as run:
        client = queued_client(run, registry)
        request = one_off(CARRIER)
        sid = (await client.start_subscription(request)).subscription_id
        await eventually(lambda: ledger_of(engine, sid), 5)
        await simulator.fault(CARRIER, "reset_after_debit", request.msisdn)
        carrier = registry.carriers[CARRIER]
        _, key = client._check_refundable(sid, 1)
        refund = await temporal_env.client.start_workflow(
            RefundWorkflow.run,
            RefundRequestInput(sid, 1, "attack", carrier.settle_delays(), CARRIER, key,
                               carrier.settle_deadline_seconds,
                               carrier_task_queue(run.settings.task_queue, carrier)),
            id=refund_workflow_id(sid, 1), task_queue=run.settings.task_queue)
        await eventually(lambda: [o for o in operations_of(engine, sid)
                                  if o.idempotency_key == key
                                  and o.state == OperationState.PENDING], 5)
        await refund.cancel()
        # (a refund that was made is returned to whoever asked, not hidden by the cancel)
        assert await ended(refund, 10) == WorkflowExecutionStatus.COMPLETED
        assert (await refund.result()).outcome == "succeeded"
        ours = await books_match(simulator, engine, CARRIER, request.msisdn, sid)
        assert sorted(kind for kind, _ in ours) == ["charge", "refund"]
        [operation] = [o for o in operations_of(engine, sid) if o.idempotency_key == key]
        assert (operation.state, operation.sends) == (OperationState.SETTLED, 1)
        assert key not in await listed(client, CARRIER)
        assert [c[1] for c in run.calls.log] == ["charge", "refund", "status"]


# -- 5. a subscription cancelled in Temporal and the database -----------------------------------


async def test_a_subscription_cancelled_in_temporal_frees_its_product_for_the_subscriber(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """A one-off purchase cancelled in Temporal while its charge waits to be sent again: the
    workflow ends CANCELED, nothing charged. The subscriber then buys the same gem pack."""
    registry = only(CARRIER)
    async with own_worker(temporal_env, settings, engine, registry,
                          carrier_timeout_seconds=5.0) as run:
        client = queued_client(run, registry)
        request = one_off(CARRIER)
        await simulator.fault(CARRIER, "error_503", request.msisdn)
        sid = (await client.start_subscription(request)).subscription_id
        await eventually(lambda: [o for o in operations_of(engine, sid)
                                  if o.state == OperationState.RETRYABLE], 10)
        handle = client.handle(sid)
        await handle.cancel()
        assert await ended(handle, 3) == WorkflowExecutionStatus.CANCELED
        assert ledger_of(engine, sid) == []
        with Session(engine) as session:
            row = session.get(Subscription, sid)
            assert row is not None
            status = row.status
        try:
            again = await client.start_subscription(request)
        except SubscriptionRequestError as exc:
            raise LeftLive(f"workflow CANCELED, row {status}: {exc}") from None
        await stop(client.handle(again.subscription_id))


# -- 6. ruled subscriptions: what was paid for after a cancel ------------------------------------


async def test_a_cancel_while_a_ruled_charge_runs_still_delivers_or_refunds_what_was_paid(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator, game_backend: GameBackendServer,
) -> None:
    """A ruled one-off purchase (delivered after payment). The carrier takes 2 s to take the
    payment; the operator cancels meanwhile. The payment succeeds. Paid must mean delivered,
    refunded, or at least shown to an operator."""
    registry = only(CARRIER)
    async with own_worker(temporal_env, settings, engine, registry,
                          carrier_timeout_seconds=10.0) as run:
        client = queued_client(run, registry, apply_rules=True, rules_resolver=OPEN_RULES)
        request = one_off(CARRIER)
        await simulator.fault(CARRIER, "latency", request.msisdn, delay_seconds=2)
        started = await client.start_subscription(request)
        sid = started.subscription_id
        await eventually(lambda: run.calls.in_flight.get(CARRIER) == 1, 10, step=0.02)
        handle = client.handle(sid)
        await handle.cancel()
        status = await ended(handle, 10)
        await asyncio.sleep(1)
        entries = ledger_of(engine, sid)
        await books_match(simulator, engine, CARRIER, request.msisdn, sid)
        grants = await grants_of(game_backend, started.key_prefix)
        [operation] = operations_of(engine, sid)
        assert status == WorkflowExecutionStatus.CANCELED
        assert [e.kind for e in entries] == [LedgerKind.CHARGE]
        if not grants and not refunds_in(entries) and operation.idempotency_key not in \
                await listed(client, CARRIER):
            raise UndeliveredPayment(
                f"charged {entries[0].amount_minor} {entries[0].currency}, operation "
                f"{operation.state}; no grant, no refund, nothing listed; workflow "
                f"{status.name}")


async def test_a_cancel_during_the_delivery_ends_the_subscription_and_bills_nothing_more(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator, game_backend: GameBackendServer,
) -> None:
    """A ruled subscription every 10 s. Cycle 1 is paid; the game backend takes 3 s to grant
    it; the operator cancels during the grant. Nothing may be charged after the cancel."""
    registry = only(CARRIER)
    async with own_worker(temporal_env, settings, engine, registry,
                          carrier_timeout_seconds=5.0) as run:
        client = queued_client(run, registry, apply_rules=True, rules_resolver=OPEN_RULES)
        request = priced(CARRIER, Period.INTERVAL)
        started = await client.start_subscription(request)
        sid = started.subscription_id
        handle = client.handle(sid)
        try:
            await game_backend.control("faults", {
                "kind": "slow", "operation": "grant", "count": 1, "delay_seconds": 3,
                "subscriber_ref": subscriber_ref(engine, run.settings, sid)})
            await waiting(lambda: grant_asked(game_backend, started.key_prefix), 10)
            await handle.cancel()
            await asyncio.sleep(3.5)  # the slow grant lands
            await temporal_env.sleep(timedelta(seconds=12))  # past cycle 2's due time
            await asyncio.sleep(2)
            status = (await handle.describe()).status
            assert status is not None
            debits = await simulator.transactions(CARRIER, request.msisdn)
            state: BillingState = await handle.query(SubscriptionWorkflow.state)
            grants = await grants_of(game_backend, started.key_prefix)
            await books_match(simulator, engine, CARRIER, request.msisdn, sid)
            charges = [d for d in debits if d["kind"] == "charge"]
            if status == WorkflowExecutionStatus.RUNNING or len(charges) > 1:
                raise CancelSwallowed(
                    f"workflow {status.name} after the cancel; carrier books "
                    f"{[d['kind'] for d in debits]}; cycle 1 delivery "
                    f"{state.recent_cycles[0].delivery!r}, grants "
                    f"{[(g['grant_id'][-6:], g['status']) for g in grants]}")
        finally:
            await stop(handle)


async def test_a_cancel_during_the_compensating_refund_reports_the_refund_it_made(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator, game_backend: GameBackendServer,
) -> None:
    """A ruled one-off purchase; the game refuses the grant for good, so the payment is
    refunded. The carrier takes 2 s to take the refund; the operator cancels the purchase's
    workflow meanwhile. The refund succeeds."""
    registry = only(CARRIER)
    async with own_worker(temporal_env, settings, engine, registry,
                          carrier_timeout_seconds=10.0) as run:
        client = queued_client(run, registry, apply_rules=True, rules_resolver=OPEN_RULES)
        request = one_off(CARRIER)
        started = await client.start_subscription(request)
        sid = started.subscription_id
        await game_backend.control("faults", {
            "kind": "refuse", "subscriber_ref": subscriber_ref(engine, run.settings, sid)})
        await simulator.fault(CARRIER, "latency", request.msisdn, delay_seconds=2, count=2)
        # (the charge takes the first latency; the refund the second)
        await eventually(lambda: [o for o in operations_of(engine, sid)
                                  if o.kind == LedgerKind.REFUND
                                  and o.state == OperationState.SENDING], 15, step=0.02)
        handle = client.handle(sid)
        await handle.cancel()
        status = await ended(handle, 15)
        entries = ledger_of(engine, sid)
        await books_match(simulator, engine, CARRIER, request.msisdn, sid)
        assert [e.kind for e in entries] == [LedgerKind.CHARGE, LedgerKind.REFUND]
        assert await grants_of(game_backend, started.key_prefix) == []
        state: BillingState = await handle.query(SubscriptionWorkflow.state)
        if state.refunds_owed or state.billing_issue == "refund_owed" or \
                status != WorkflowExecutionStatus.CANCELED:
            raise RefundMisreported(
                f"ledger {[e.kind for e in entries]}; workflow {status.name}, refunds_owed "
                f"{state.refunds_owed}, BillingIssue {state.billing_issue!r}, cycle 1 "
                f"delivery {state.recent_cycles[0].delivery!r}")


# -- 7. an operator's refund in flight when the subscription is cancelled in Temporal -----------


async def test_a_cancel_while_an_operators_refund_settles_keeps_the_refund_on_record(
    settings: Settings, engine: Engine, simulator: Simulator,
    game_backend: GameBackendServer,
) -> None:
    """A ruled subscription every 10 s, cycle 1 paid and delivered. An operator refunds it
    (request_refund, run by the subscription's workflow); the carrier credits and drops the
    connection, so the refund is PENDING. The operator then cancels the subscription in
    Temporal. (On a real dev server: the time-skipping test server does not apply parent
    close policies, so there the child lives on and settles the refund.)"""
    registry = only(CARRIER)
    real = await WorkflowEnvironment.start_local(
        dev_server_existing_path=venv_binary("temporal"), search_attributes=sa.ALL)
    async with real, own_worker(real, settings, engine, registry,
                                carrier_timeout_seconds=5.0) as run:
        client = queued_client(run, registry, apply_rules=True, rules_resolver=OPEN_RULES)
        request = priced(CARRIER, Period.INTERVAL)
        started = await client.start_subscription(request)
        sid = started.subscription_id
        handle = client.handle(sid)
        await eventually(lambda: ledger_of(engine, sid), 5)
        await waiting(lambda: grant_asked(game_backend, started.key_prefix), 5)
        await simulator.fault(CARRIER, "reset_after_debit", request.msisdn)
        refunding = asyncio.create_task(client.request_refund(sid, 1, None, "ticket-1"))
        await eventually(lambda: [o for o in operations_of(engine, sid)
                                  if o.kind == LedgerKind.REFUND
                                  and o.state == OperationState.PENDING], 5)
        await handle.cancel()
        assert await ended(handle, 5) == WorkflowExecutionStatus.CANCELED
        refunding.cancel()
        [refund] = [o for o in operations_of(engine, sid) if o.kind == LedgerKind.REFUND]
        child = real.client.get_workflow_handle(refund.workflow_id)
        # (its first look-up is due 5 s after the refund's answer was lost)
        child_status = await ended(child, 8)
        await asyncio.sleep(0.5)
        [refund] = [o for o in operations_of(engine, sid) if o.kind == LedgerKind.REFUND]
        debits = await simulator.transactions(CARRIER, request.msisdn)
        assert [d["kind"] for d in debits] == ["charge", "refund"]
        if not refunds_in(ledger_of(engine, sid)) and refund.idempotency_key not in \
                await listed(client, CARRIER):
            raise LostRefund(f"refund {refund.state}, its workflow {child_status.name}; "
                             "no ledger entry, not listed; the carrier credited")


# -- 8. histories recorded before 3c52462 --------------------------------------------------------


async def test_histories_cancelled_by_the_old_code_replay_on_the_new_code(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator, tmp_path: Path,
) -> None:
    """A worker running the code before 3c52462 (its own process: workflows/settle.py from
    3c52462^, everything else as today) charges two one-off purchases through the carrier's
    queue. (a) The carrier takes 1.5 s; the operator cancels meanwhile: the old code swallows
    the cancel and completes the purchase. (b) The carrier debits and drops the connection;
    the operator cancels during the wait: the old code ends CANCELED. Both histories are then
    replayed on today's code."""
    old = tmp_path / "old"
    (old / "workflows").mkdir(parents=True)
    for source in (PROJECT_ROOT / "workflows").glob("*.py"):
        (old / "workflows" / source.name).write_text(subprocess.run(
            ["git", "show", f"{BEFORE}:workflows/{source.name}"], cwd=PROJECT_ROOT, check=True,
            capture_output=True, text=True).stdout)
    queue = f"tc-old-{uuid.uuid4().hex[:8]}"
    mine = settings.model_copy(update={"task_queue": queue, "carrier_timeout_seconds": 5.0})
    config = temporal_env.client.service_client.config
    process = subprocess.Popen(
        [sys.executable, "-c", _WORKER_SCRIPT], cwd=old,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(old), str(PROJECT_ROOT)]),
             "LC_SETTINGS": json.dumps(_plain_settings(mine)),
             "LC_TARGET": config.target_host, "LC_NAMESPACE": temporal_env.client.namespace,
             "LC_CARRIERS": CARRIER},
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    client = SubscriptionClient(temporal_env.client, engine, only(CARRIER), queue,
                                mine.deployment_id)
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)
        assert line.strip() == "polling"
        mid_call, lost = one_off(CARRIER), one_off(CARRIER)
        await simulator.fault(CARRIER, "latency", mid_call.msisdn, delay_seconds=1.5)
        await simulator.fault(CARRIER, "reset_after_debit", lost.msisdn)
        mid_id = (await client.start_subscription(mid_call)).subscription_id
        lost_id = (await client.start_subscription(lost)).subscription_id
        await eventually(lambda: operations_of(engine, mid_id) and [
            o for o in operations_of(engine, lost_id) if o.state == OperationState.PENDING], 10,
            step=0.02)
        await asyncio.gather(client.handle(mid_id).cancel(), client.handle(lost_id).cancel())
        statuses = [await ended(client.handle(i), 20) for i in (mid_id, lost_id)]
        histories: list[WorkflowHistory] = [await client.handle(i).fetch_history()
                                            for i in (mid_id, lost_id)]
    finally:
        process.kill()
        process.wait(10)
    # (a) the old code's way: the activity cancelled, the cancel swallowed, the purchase booked
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED in [
        e.event_type for e in histories[0].events]
    assert statuses == [WorkflowExecutionStatus.COMPLETED, WorkflowExecutionStatus.CANCELED]
    assert len(await books_match(simulator, engine, CARRIER, mid_call.msisdn, mid_id)) == 1
    # (b) the old code's loss, which 3c52462 fixes for new histories
    assert [o.state for o in operations_of(engine, lost_id)] == [OperationState.PENDING]
    failures = []
    for name, history in zip(("cancelled mid-call", "cancelled while settling"), histories,
                             strict=True):
        try:
            await Replayer(workflows=WORKFLOWS).replay_workflow(history)
        except NondeterminismError as exc:
            failures.append(f"{name}: {str(exc)[:300]}")
    if failures:
        raise NondeterministicUpgrade("; ".join(failures))
