"""Records the workflow histories tests/test_replay.py replays: one JSON file per workflow run,
for representative paths of every workflow (docs/versioning.md says when to record).

    .venv/bin/python -m tests.histories.record              # every path not yet recorded
    .venv/bin/python -m tests.histories.record --only NAME  # one path (by name or file stem)
    .venv/bin/python -m tests.histories.record --list

It runs what the tests run: the time-skipping test server, the carrier simulators, the callback
receiver, a scratch SQLite database and the worker group. It never overwrites a recorded file:
an old history is what proves that the workflows still running on old code keep replaying. A
path re-recorded after a ``workflow.patched`` change gets new file names (a suffix), and the
old names go to ``KEPT``.

Unsettled paths are bounded by a short settle deadline in the workflow input (a copy of the
registry with ``settle_deadline_seconds`` lowered), not by patching ``MAX_SETTLE_ATTEMPTS``:
a history must replay with the code as it is, without the recorder's patches.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import phonenumbers
from aiohttp import web
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.testing import WorkflowEnvironment

from activities.messages import LateSettlementOutput
from callback_receiver import CallbackReceiver
from carriers.dev_secrets import generate_dev_secrets
from carriers.loader import Registry, default_registry
from carriers.numbers import sample_msisdn
from models import operations
from models.interactions import InteractionStore
from models.tables import OperationState, Period, Subscription
from reconciliation.schedule import reconcile_now
from settings import Settings, venv_binary
from simulators.core import SimulatorCore
from simulators.game_backend import GameBackend, start_game_backend
from simulators.server import sim_carriers, smsc_tariffs, start_simulator
from simulators.smsc import Smsc
from starter import (
    StartedSubscription,
    StartSubscriptionRequest,
    SubscriptionClient,
)
from tests.conftest import GAME_BACKEND_TOKEN, Simulator
from tests.postgres import free_port
from tests.workflow_helpers import next_weekday, rules_with
from worker import build_worker, make_adapter_pool, prepare_database
from workflows import search_attributes as sa
from workflows.late_settlement import late_settlement_id
from workflows.reconciliation import (
    DailyReconciliationInput,
    DailyReconciliationWorkflow,
    reconciliation_id,
)
from workflows.refund import refund_workflow_id
from workflows.subscription import SubscriptionWorkflow
from workflows.types import BillingState, Plan, SubscriptionInput

HISTORIES = Path(__file__).resolve().parent
# Files recorded by earlier workflow code and kept after their path was re-recorded under a new
# name: each is what running workflows of that code replay through (docs/versioning.md).
KEPT: tuple[str, ...] = ()
# the settle deadline of the carriers whose operations the unsettled paths leave unsettled
SHORT_DEADLINE_SECONDS = 600.0
SHORT_DEADLINE_CARRIERS = ("mx-maya", "fr-cote")
PATH_TIMEOUT_SECONDS = 60.0

# a workflow run to record: (workflow id, run id or None for the latest run)
Run = tuple[str, str | None]


@dataclass
class Stack:
    env: WorkflowEnvironment
    client: SubscriptionClient
    # the same client over a registry whose SHORT_DEADLINE_CARRIERS settle for 10 minutes only
    short: SubscriptionClient
    # the same client under the rules (workflows/ruled_cycle.py), opt-in off
    ruled: SubscriptionClient
    sim: Simulator
    engine: Engine
    settings: Settings
    # what no history may hold: every MSISDN used and every carrier secret
    msisdns: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RecordedPath:
    name: str
    files: tuple[str, ...]
    run: Callable[[Stack], Awaitable[dict[str, Run]]]


PATHS: list[RecordedPath] = []


def path(*files: str) -> Callable[[Callable[[Stack], Awaitable[dict[str, Run]]]],
                                  Callable[[Stack], Awaitable[dict[str, Run]]]]:
    """Registers a path that records ``files`` (stems of tests/histories/<stem>.json)."""

    def register(run: Callable[[Stack], Awaitable[dict[str, Run]]]
                 ) -> Callable[[Stack], Awaitable[dict[str, Run]]]:
        PATHS.append(RecordedPath(run.__name__, files, run))
        return run

    return register


def recorded_files() -> list[str]:
    """Every file stem tests/histories/ must hold: the current paths' and the kept ones."""
    return [stem for p in PATHS for stem in p.files] + list(KEPT)


# -- helpers (the small bits of tests/test_money_safety.py this needs, copied) ---------------


async def next_jan_31(env: WorkflowEnvironment) -> datetime:
    year = (await env.get_current_time()).year + 1
    return datetime(year, 1, 31, 9, 30, tzinfo=UTC)


async def subscribe(s: Stack, carrier_id: str, seed: str, first: datetime | None = None,
                    period: Period | None = None, cycles_per_run: int = 24,
                    client: SubscriptionClient | None = None, balance: str | None = None,
                    fault: str | None = None) -> tuple[str, StartedSubscription]:
    client = client or s.client
    registry = client.registry
    carrier = registry.carriers[carrier_id]
    msisdn = sample_msisdn(carrier, registry, random.Random(f"history-{seed}"))
    s.msisdns.append(msisdn)
    if balance is not None:
        await s.sim.set_balance(carrier_id, msisdn, balance)
    if fault is not None:
        await s.sim.fault(carrier_id, fault, msisdn)
    price = next(p for p in carrier.price_points if period in (None, p.period))
    started = await client.start_subscription(StartSubscriptionRequest(
        msisdn=msisdn, product_id=price.product, period=price.period,
        amount_minor=registry.amount_minor(carrier_id, price),
        currency=registry.currency_of(carrier_id), first_charge_at=first,
        cycles_per_run=cycles_per_run))
    return msisdn, started


async def until(s: Stack, handle: WorkflowHandle[Any, Any], done: Callable[[BillingState], bool],
                step: timedelta = timedelta(minutes=10), rounds: int = 400) -> BillingState:
    """Moves time on (to the next charge first, then in steps) until ``done(state)``."""
    state: BillingState = await handle.query(SubscriptionWorkflow.state)
    ahead = state.next_charge_at - await s.env.get_current_time()
    if ahead > timedelta(0):
        await s.env.sleep(ahead)
    for _ in range(rounds):
        state = await handle.query(SubscriptionWorkflow.state)
        if done(state):
            return state
        await s.env.sleep(step)
    raise AssertionError(f"not reached: {state}")


async def soon(handle: WorkflowHandle[Any, Any], done: Callable[[BillingState], bool]
               ) -> BillingState:
    """Waits in real time (callbacks and receipts arrive on sockets) until ``done(state)``."""
    for _ in range(200):
        state: BillingState = await handle.query(SubscriptionWorkflow.state)
        if done(state):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"not reached: {state}")






def cycles(state: BillingState) -> list[tuple[int, str]]:
    return [(c.cycle, c.outcome) for c in state.recent_cycles]


def operation_state(engine: Engine, key: str) -> OperationState | None:
    with Session(engine) as session:
        found = operations.find(session, key)
        return found.state if found is not None else None


async def pending_charge(s: Stack, carrier_id: str, seed: str,
                         client: SubscriptionClient | None = None
                         ) -> tuple[StartedSubscription, str]:
    """A charge the carrier has taken but whose callback never comes."""
    _msisdn, started = await subscribe(s, carrier_id, seed, period=Period.MONTHLY,
                                       client=client, fault="no_callback")
    key = f"{started.key_prefix}-c1-a0"
    for _ in range(200):
        if operation_state(s.engine, key) == OperationState.PENDING:
            return started, key
        await asyncio.sleep(0.05)
    raise AssertionError("the charge never became pending")


async def ended(s: Stack, handle: WorkflowHandle[Any, Any],
                step: timedelta = timedelta(seconds=30)) -> None:
    for _ in range(200):
        if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            return
        await s.env.sleep(step)
    raise AssertionError(f"{handle.id} still running")


async def cancelled(s: Stack, started: StartedSubscription,
                    client: SubscriptionClient | None = None) -> Run:
    """Cancels (the update), waits for the end, and names the run to record."""
    client = client or s.client
    await client.cancel_subscription(started.subscription_id)
    handle = client.handle(started.subscription_id)
    await handle.result()
    return (handle.id, None)


# -- SubscriptionWorkflow ---------------------------------------------------------------------


@path("subscription_monthly_cancelled")
async def monthly_charges_then_cancel(s: Stack) -> dict[str, Run]:
    first = await next_jan_31(s.env)
    _msisdn, started = await subscribe(s, "fr-azur", "monthly", first, Period.MONTHLY)
    handle = s.client.handle(started.subscription_id)
    await s.env.sleep(first + timedelta(days=70) - await s.env.get_current_time())
    run = await cancelled(s, started)
    state = await handle.result()
    assert cycles(state) == [(1, "succeeded"), (2, "succeeded"), (3, "succeeded")], state
    assert state.status == "cancelled", state
    return {"subscription_monthly_cancelled": run}


@path("subscription_insufficient_funds_failed")
async def insufficient_funds_retried_then_failed(s: Stack) -> dict[str, Run]:
    first = await next_jan_31(s.env)
    msisdn, started = await subscribe(s, "fr-azur", "insufficient", first, Period.MONTHLY,
                                      balance="1.00")
    handle = s.client.handle(started.subscription_id)
    await s.env.sleep(first + timedelta(days=3) - await s.env.get_current_time())
    state = await handle.query(SubscriptionWorkflow.state)
    assert cycles(state) == [(1, "failed")] and state.insufficient_funds_retries == 3, state
    await s.sim.set_balance("fr-azur", msisdn, "10.00")  # cycle 2 goes through
    state = await until(s, handle, lambda st: st.charges_succeeded == 1)
    assert cycles(state) == [(1, "failed"), (2, "succeeded")], state
    return {"subscription_insufficient_funds_failed": await cancelled(s, started)}


@path("subscription_polling_settled_by_lookup")
async def polling_carrier_settled_by_lookup(s: Stack) -> dict[str, Run]:
    first = await next_jan_31(s.env)
    _msisdn, started = await subscribe(s, "it-pagamobile", "polling", first)
    handle = s.client.handle(started.subscription_id)
    state = await until(s, handle, lambda st: bool(st.recent_cycles), step=timedelta(minutes=1))
    assert cycles(state) == [(1, "succeeded")], state
    return {"subscription_polling_settled_by_lookup": await cancelled(s, started)}


@path("subscription_callback_settled_by_callback")
async def callback_carrier_settled_by_callback(s: Stack) -> dict[str, Run]:
    _msisdn, started = await subscribe(s, "es-cobromovil", "callback",
                                       fault="duplicate_callback")
    state = await soon(s.client.handle(started.subscription_id),
                       lambda st: bool(st.recent_cycles))
    assert cycles(state) == [(1, "succeeded")], state
    return {"subscription_callback_settled_by_callback": await cancelled(s, started)}


@path("subscription_reply_lost_settled_by_lookup")
async def reply_lost_then_settled_by_lookup(s: Stack) -> dict[str, Run]:
    first = await next_jan_31(s.env)
    _msisdn, started = await subscribe(s, "fr-azur", "reply-lost", first, Period.MONTHLY,
                                       fault="reset_after_debit")
    handle = s.client.handle(started.subscription_id)
    state = await until(s, handle, lambda st: bool(st.recent_cycles), step=timedelta(minutes=1))
    assert cycles(state) == [(1, "succeeded")], state
    return {"subscription_reply_lost_settled_by_lookup": await cancelled(s, started)}


@path("subscription_charge_unsettled")
async def charge_left_unsettled(s: Stack) -> dict[str, Run]:
    # mx-maya promises neither a look-up nor deduplication: a lost reply stays ambiguous
    first = await next_jan_31(s.env)
    _msisdn, started = await subscribe(s, "mx-maya", "unsettled", first, Period.MONTHLY,
                                       client=s.short, fault="reset_after_debit")
    handle = s.client.handle(started.subscription_id)
    state = await until(s, handle, lambda st: bool(st.recent_cycles), step=timedelta(minutes=10))
    assert cycles(state) == [(1, "unsettled")] and state.billing_issue == "unsettled", state
    return {"subscription_charge_unsettled": await cancelled(s, started)}


@path("subscription_credentials_rejected_then_restored")
async def credentials_rejected_then_restored(s: Stack) -> dict[str, Run]:
    carrier = s.client.registry.carriers["de-rheinfunk"]
    assert carrier.auth.secret_ref is not None
    password = s.settings.carrier_secrets[carrier.auth.secret_ref].get_secret_value()
    first = await next_jan_31(s.env)
    _msisdn, started = await subscribe(s, carrier.id, "credentials", first, Period.MONTHLY)
    handle = s.client.handle(started.subscription_id)
    await s.sim.control("credentials", {"carrier": carrier.id, "password": "rotated"})
    try:
        await s.env.sleep(first + timedelta(minutes=20) - await s.env.get_current_time())
        state = await handle.query(SubscriptionWorkflow.state)
        assert not state.recent_cycles and state.billing_issue == "credentials_rejected", state
    finally:
        await s.sim.control("credentials", {"carrier": carrier.id, "password": password})
    state = await until(s, handle, lambda st: bool(st.recent_cycles))
    assert cycles(state) == [(1, "succeeded")] and state.billing_issue is None, state
    return {"subscription_credentials_rejected_then_restored": await cancelled(s, started)}


@path("subscription_cancelled_before_first_charge", "subscription_configuration_error")
async def configuration_error(s: Stack) -> dict[str, Run]:
    """A carrier the worker does not know: our error, not retried, visible (BillingIssue)."""
    later = await s.env.get_current_time() + timedelta(days=3650)
    _msisdn, started = await subscribe(s, "fr-azur", "configuration", later)
    before = await cancelled(s, started)
    with Session(s.engine) as session:
        row = session.get(Subscription, started.subscription_id)
        assert row is not None
        subscriber_id = row.subscriber_id
    broken = SubscriptionInput(
        subscription_id=started.subscription_id, subscriber_id=subscriber_id,
        carrier_id="xx-nowhere", country_code="FR", product_id="game-pass",
        price_point_id=started.price_point_id,
        plan=Plan("monthly", 499, "EUR", []), key_prefix=f"{started.key_prefix}x")
    handle = await s.env.client.start_workflow(
        SubscriptionWorkflow.run, broken, id=f"config-error-{started.subscription_id}",
        task_queue=s.settings.task_queue)
    state = await soon(handle, lambda st: bool(st.recent_cycles))
    assert cycles(state) == [(1, "error")] and state.billing_issue == "configuration", state
    await handle.signal(SubscriptionWorkflow.request_cancel)
    await handle.result()
    return {"subscription_cancelled_before_first_charge": before,
            "subscription_configuration_error": (handle.id, None)}


@path("subscription_cancelled_while_settling")
async def cancel_while_a_charge_is_settling(s: Stack) -> dict[str, Run]:
    started, key = await pending_charge(s, "fr-cote", "cancel-settling")
    handle = s.client.handle(started.subscription_id)
    state = await asyncio.wait_for(s.client.cancel_subscription(started.subscription_id), 10)
    assert state.status == "cancelled" and operation_state(s.engine, key) == OperationState.PENDING
    await ended(s, handle)
    state = await handle.result()
    assert cycles(state) == [(1, "succeeded")], state
    return {"subscription_cancelled_while_settling": (handle.id, None)}


@path("subscription_continue_as_new_run1", "subscription_continue_as_new_run2")
async def continue_as_new(s: Stack) -> dict[str, Run]:
    first = await next_jan_31(s.env)
    _msisdn, started = await subscribe(s, "fr-azur", "continue-as-new", first, Period.MONTHLY,
                                       cycles_per_run=2)
    handle = s.client.handle(started.subscription_id)
    await s.env.sleep(first + timedelta(days=70) - await s.env.get_current_time())
    state = await handle.query(SubscriptionWorkflow.state)
    assert state.runs == 2 and state.charges_succeeded == 3, state
    described = await handle.describe()
    first_run = described.raw_description.workflow_execution_info.first_run_id
    assert first_run and first_run != described.run_id
    return {"subscription_continue_as_new_run1": (handle.id, first_run),
            "subscription_continue_as_new_run2": await cancelled(s, started)}


@path("subscription_one_off_purchase")
async def one_off_purchase(s: Stack) -> dict[str, Run]:
    _msisdn, started = await subscribe(s, "fr-azur", "one-off", period=Period.ONE_OFF)
    handle = s.client.handle(started.subscription_id)
    state = await handle.result()
    assert cycles(state) == [(1, "succeeded")] and state.status == "completed", state
    return {"subscription_one_off_purchase": (handle.id, None)}


# -- RefundWorkflow ---------------------------------------------------------------------------


async def charged_once(s: Stack, carrier_id: str, seed: str, client: SubscriptionClient
                       ) -> tuple[str, StartedSubscription]:
    first = await next_jan_31(s.env)
    msisdn, started = await subscribe(s, carrier_id, seed, first, Period.MONTHLY, client=client)
    await until(s, client.handle(started.subscription_id), lambda st: st.charges_succeeded == 1)
    return msisdn, started


@path("refund_succeeded")
async def refund_succeeded(s: Stack) -> dict[str, Run]:
    _msisdn, started = await charged_once(s, "fr-azur", "refund", s.client)
    refunded = await s.client.refund(started.subscription_id, 1)
    assert refunded.outcome == "succeeded", refunded
    await cancelled(s, started)
    return {"refund_succeeded": (refund_workflow_id(started.subscription_id, 1), None)}


@path("refund_unsettled")
async def refund_left_unsettled(s: Stack) -> dict[str, Run]:
    msisdn, started = await charged_once(s, "mx-maya", "refund-unsettled", s.short)
    await s.sim.fault("mx-maya", "reset_after_debit", msisdn)
    refunded = await s.short.refund(started.subscription_id, 1)
    assert refunded.outcome == "unsettled", refunded
    await cancelled(s, started)
    return {"refund_unsettled": (refund_workflow_id(started.subscription_id, 1), None)}


# -- LateSettlementWorkflow -------------------------------------------------------------------


@path("late_settlement_by_callback", "subscription_unsettled_then_settled_late")
async def late_callback_settles_an_unsettled_charge(s: Stack) -> dict[str, Run]:
    started, key = await pending_charge(s, "fr-cote", "late", client=s.short)
    # every look-up until the deadline fails: the charge is left unsettled
    await s.sim.control("faults", {"carrier": "fr-cote", "kind": "lookup_error", "count": 3})
    handle = s.client.handle(started.subscription_id)
    state = await until(s, handle, lambda st: bool(st.recent_cycles), step=timedelta(minutes=10))
    assert cycles(state) == [(1, "unsettled")], state
    answer = await s.sim.control("callback", {"carrier": "fr-cote", "key": key,
                                              "outcome": "success"})
    assert answer["status"] == 200, answer
    late: WorkflowHandle[Any, LateSettlementOutput] = s.env.client.get_workflow_handle(
        late_settlement_id(key), result_type=LateSettlementOutput)
    settled = await late.result()
    assert settled.state == "settled", settled
    await soon(handle, lambda st: not st.unsettled_keys and st.billing_issue is None)
    return {"late_settlement_by_callback": (late.id, None),
            "subscription_unsettled_then_settled_late": await cancelled(s, started)}


# -- SubscriptionWorkflow under rules (workflows/ruled_cycle.py) -----------------------------


@path("ruled_monthly_delivered")
async def ruled_monthly_delivered(s: Stack) -> dict[str, Run]:
    first = (await next_weekday(s.env, "Europe/Paris", 10)).astimezone(UTC)
    _msisdn, started = await subscribe(s, "fr-azur", "ruled-monthly", first, Period.MONTHLY,
                                       client=s.ruled)
    handle = s.ruled.handle(started.subscription_id)
    await until(s, handle, lambda st: st.charges_succeeded == 1 and st.deliveries == 1,
                step=timedelta(hours=1), rounds=48)
    state = await until(s, handle, lambda st: st.charges_succeeded == 2 and st.deliveries == 2,
                        step=timedelta(hours=1), rounds=48)
    assert [c.delivery for c in state.recent_cycles] == ["delivered", "delivered"], state
    assert cycles(state) == [(1, "succeeded"), (2, "succeeded")], state
    return {"ruled_monthly_delivered": await cancelled(s, started, s.ruled)}


@path("ruled_ladder_partial_then_refund_request")
async def ruled_ladder_partial_then_refund_request(s: Stack) -> dict[str, Run]:
    """mx-maya: a balance short of the price is charged down the ladder (a partial payment),
    delivered, then part of it refunded on request (the ``request_refund`` update)."""
    due = (await next_weekday(s.env, "America/Mexico_City", 12)).astimezone(UTC)
    _msisdn, started = await subscribe(s, "mx-maya", "ruled-ladder", due, Period.MONTHLY,
                                       client=s.ruled, balance="50.00")
    handle = s.ruled.handle(started.subscription_id)
    state = await until(s, handle, lambda st: st.charges_succeeded == 1 and st.deliveries == 1,
                        step=timedelta(hours=1), rounds=48)
    cycle = state.recent_cycles[-1]
    assert state.partial_payments == 1 and cycle.partial and cycle.delivery == "delivered", state
    refunded = await s.ruled.request_refund(started.subscription_id, 1,
                                            amount_minor=cycle.amount_minor // 4,
                                            request_id="history-ladder-refund")
    assert refunded.outcome == "succeeded", refunded
    return {"ruled_ladder_partial_then_refund_request": await cancelled(s, started, s.ruled)}


# -- ReconciliationWorkflow, DailyReconciliationWorkflow ---------------------------------------


async def close_report(s: Stack, carrier_id: str, day: date) -> None:
    await s.sim.control("reports/close", {"carrier": carrier_id, "date": day.isoformat()})


@path("reconciliation_day", "reconciliation_daily")
async def reconciliation_day(s: Stack) -> dict[str, Run]:
    """A charge left unsettled (mx-maya: a lost reply after the debit), then reconciled on the
    carrier's final report for the (real, UTC) day, which signals its subscription; and the
    daily workflow, started directly (the time-skipping server has no schedules)."""
    first = await next_jan_31(s.env)
    _msisdn, started = await subscribe(s, "mx-maya", "recon-unsettled", first, Period.MONTHLY,
                                       client=s.short, fault="reset_after_debit")
    handle = s.short.handle(started.subscription_id)
    state = await until(s, handle, lambda st: bool(st.recent_cycles), step=timedelta(minutes=10))
    assert cycles(state) == [(1, "unsettled")], state
    day = datetime.now(UTC).date()
    await close_report(s, "mx-maya", day)
    result = await reconcile_now(s.env.client, s.settings.task_queue, day, "mx-maya")
    key = f"{started.key_prefix}-c1-a0"
    assert result.final and [(x.idempotency_key, x.resolution) for x in result.settled] == [
        (key, "reconciled")], result
    await soon(handle, lambda st: st.unsettled_count == 0)
    await cancelled(s, started, s.short)

    carriers = ["ke-kilima", "ng-niger"]
    for carrier_id in carriers:
        await close_report(s, carrier_id, day)
    daily = await s.env.client.start_workflow(
        DailyReconciliationWorkflow.run, DailyReconciliationInput(carriers, day.isoformat()),
        id=f"reconcile-daily-{day.isoformat()}", task_queue=s.settings.task_queue)
    out = await daily.result()
    assert out.failed == [] and [(r.carrier_id, r.final) for r in out.results] == [
        (c, True) for c in carriers], out
    return {"reconciliation_day": (reconciliation_id("mx-maya", day.isoformat()), None),
            "reconciliation_daily": (daily.id, None)}


# -- recording --------------------------------------------------------------------------------


def payload_text(node: Any) -> Iterator[str]:
    """Every string of a history's JSON, payloads (base64 in JSON) decoded."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "data" and isinstance(value, str) and "metadata" in node:
                yield base64.b64decode(value).decode("utf-8", "replace")
            else:
                yield from payload_text(value)
    elif isinstance(node, list):
        for item in node:
            yield from payload_text(item)
    elif isinstance(node, str):
        yield node


def msisdn_forms(msisdn: str) -> list[str]:
    """The international and national digits of a number, as a history could carry them."""
    parsed = phonenumbers.parse(msisdn)
    return [msisdn.lstrip("+"), str(parsed.national_number)]


def leaked(text: str, msisdns: list[str]) -> list[str]:
    return [m for m in msisdns if any(form in text for form in msisdn_forms(m))]


async def record(s: Stack, recorded: RecordedPath) -> list[Path]:
    runs = await asyncio.wait_for(recorded.run(s), PATH_TIMEOUT_SECONDS)
    assert set(runs) == set(recorded.files), (recorded.name, sorted(runs))
    written = []
    for stem in recorded.files:
        workflow_id, run_id = runs[stem]
        handle = s.env.client.get_workflow_handle(workflow_id, run_id=run_id)
        described = await handle.describe()
        assert described.status != WorkflowExecutionStatus.RUNNING, f"{stem} still running"
        history = await handle.fetch_history()
        text = history.to_json()
        plain = "\n".join(payload_text(json.loads(text)))
        found = leaked(plain, s.msisdns)
        if found:
            raise SystemExit(f"{stem}: the history holds the MSISDN(s) {found}; not written")
        if any(secret in plain for secret in s.secrets):
            raise SystemExit(f"{stem}: the history holds a carrier secret; not written")
        target = HISTORIES / f"{stem}.json"
        target.write_text(text + "\n")
        written.append(target)
    return written


def short_deadlines(registry: Registry) -> Registry:
    carriers = dict(registry.carriers)
    for carrier_id in SHORT_DEADLINE_CARRIERS:
        carriers[carrier_id] = carriers[carrier_id].model_copy(
            update={"settle_deadline_seconds": SHORT_DEADLINE_SECONDS})
    return registry.model_copy(update={"carriers": carriers})


async def run(selected: list[RecordedPath]) -> None:
    registry = default_registry()
    secrets = generate_dev_secrets(registry)
    async with AsyncExitStack() as stack:
        core = SimulatorCore(sim_carriers(registry, secrets), Decimal("1000"))
        smsc = Smsc(core, smsc_tariffs(registry))
        runner, port = await start_simulator(core, smsc=smsc)
        stack.push_async_callback(runner.cleanup)
        smpp_port = await smsc.start()
        stack.push_async_callback(smsc.stop)
        # the game backend ruled subscriptions deliver to (tests/conftest.py's ``game_backend``)
        game_runner, game_port = await start_game_backend(GameBackend(GAME_BACKEND_TOKEN))
        stack.push_async_callback(game_runner.cleanup)
        sim = Simulator(core, f"http://127.0.0.1:{port}", f"127.0.0.1:{smpp_port}")

        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        callback_port = free_port()
        settings = Settings(
            game_backend_url=f"http://127.0.0.1:{game_port}",
            game_backend_token=SecretStr(GAME_BACKEND_TOKEN),
            # notices (opt-in codes, receipts) to numbers of carriers without an SMSC
            notice_carrier_id="ng-lagoon",
            database_url=f"sqlite:///{scratch / 'billing.db'}",
            task_queue="histories",
            callback_base_url=f"http://127.0.0.1:{callback_port}",
            callback_port=callback_port,
            simulator_urls={"sim": sim.url, "smpp": sim.smpp_endpoint},
            carrier_secrets={k: SecretStr(v) for k, v in secrets.items()},
            carrier_timeout_seconds=1.0,
            _env_file=None,
        )
        engine = prepare_database(settings, registry)
        stack.callback(engine.dispose)

        quiet = Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(
            filter=TelemetryFilter(core_level="ERROR", other_level="ERROR"))))
        env = await WorkflowEnvironment.start_time_skipping(
            test_server_existing_path=venv_binary("temporal-test-server"), runtime=quiet)
        stack.push_async_callback(env.shutdown)
        await env.client.operator_service.add_search_attributes(AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={k.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
                               for k in sa.ALL}))

        adapters = make_adapter_pool(registry, settings, engine, env.client)
        stack.push_async_callback(adapters.aclose)
        receiver = CallbackReceiver(env.client, registry, settings,
                                    InteractionStore(engine, lane="callbacks").record, engine)
        receiver_runner = web.AppRunner(receiver.app(), access_log=None, handle_signals=False)
        await receiver_runner.setup()
        stack.push_async_callback(receiver_runner.cleanup)
        await web.TCPSite(receiver_runner, "127.0.0.1", callback_port).start()
        await stack.enter_async_context(build_worker(env.client, settings, engine, adapters,
                                                     registry))

        s = Stack(env=env,
                  client=SubscriptionClient(env.client, engine, registry, settings.task_queue,
                                            settings.deployment_id),
                  short=SubscriptionClient(env.client, engine, short_deadlines(registry),
                                           settings.task_queue, settings.deployment_id),
                  ruled=SubscriptionClient(env.client, engine, registry, settings.task_queue,
                                           settings.deployment_id, apply_rules=True,
                                           rules_resolver=rules_with(opt_in="none")),
                  sim=sim, engine=engine, settings=settings,
                  secrets=[v for v in [*secrets.values(), GAME_BACKEND_TOKEN] if len(v) >= 8])
        for recorded in selected:
            began = time.monotonic()
            written = await record(s, recorded)
            sizes = ", ".join(f"{p.name} {p.stat().st_size // 1024} KiB" for p in written)
            print(f"{recorded.name}: {time.monotonic() - began:.1f} s: {sizes}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[],
                        help="a path name or one of its file stems (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the paths and their files")
    parser.add_argument("-v", "--verbose", action="store_true", help="the workers' warnings too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR)
    if args.list:
        for recorded in PATHS:
            present = ["+" if (HISTORIES / f"{f}.json").exists() else "-" for f in recorded.files]
            print(recorded.name, " ".join(f"{p}{f}" for p, f in zip(present, recorded.files,
                                                                    strict=True)))
        return
    chosen = [p for p in PATHS
              if not args.only or p.name in args.only or set(p.files) & set(args.only)]
    unknown = set(args.only) - {p.name for p in PATHS} - {f for p in PATHS for f in p.files}
    if unknown:
        raise SystemExit(f"no such path: {sorted(unknown)}")
    existing = [f for p in chosen for f in p.files if (HISTORIES / f"{f}.json").exists()]
    if existing and args.only:
        raise SystemExit(
            f"already recorded: {existing}. A recorded history is never overwritten: record "
            "the changed path under a new name and keep the old file (docs/versioning.md).")
    partial = [p.name for p in chosen
               if len({(HISTORIES / f"{f}.json").exists() for f in p.files}) > 1]
    if partial:
        raise SystemExit(f"partly recorded: {partial}; remove its new files and record it again")
    chosen = [p for p in chosen if not any((HISTORIES / f"{f}.json").exists() for f in p.files)]
    if not chosen:
        print("every path is recorded")
        return
    began = time.monotonic()
    asyncio.run(run(chosen))
    print(f"recorded {sum(len(p.files) for p in chosen)} histories in "
          f"{time.monotonic() - began:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
