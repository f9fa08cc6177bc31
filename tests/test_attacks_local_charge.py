"""Adversarial review of the local-first charge path: a charge attempt runs as a Temporal local
activity in the workflow's worker, paced by a per-worker ``CarrierGate`` (carriers/gate.py), and
overflows to the carrier's own task queue; the database calls queue on one thread per SQLite
engine (models/db.py); the carrier's exchanges are held in a context variable and committed with
the charge's conclusion (models/interactions.py, ``BillingActivities._conclude``).

Every test drives the real components: the time-skipping Temporal server, workers built by
``worker.build_worker``, the carrier simulator over its socket, the SQLite database. A test marked
``xfail(strict=True, raises=...)`` is an attack that succeeds (a real bug): it fails with the
named exception only, so a money-safety assertion that breaks in the same test still reports
as a failure. The others are attacks the code withstands, asserting the safe outcome."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from activities.billing import BillingActivities
from carriers.gate import CarrierGates
from carriers.loader import Registry, carrier_task_queue, default_registry
from carriers.numbers import sample_msisdn
from models.db import make_engine
from models.money import from_decimal
from models.tables import (
    CarrierInteraction,
    CarrierOperation,
    LedgerEntry,
    OperationState,
    Period,
)
from settings import PROJECT_ROOT, Settings
from starter import StartSubscriptionRequest, SubscriptionClient
from tests.conftest import GameBackendServer, Simulator
from worker import WORKFLOWS, WorkerGroup, build_worker, make_adapter_pool

REGISTRY = default_registry()
CARRIER = "fr-azur"  # oneapi; deduplicates by key ("replay"); has a status look-up; refunds


class LostInteraction(AssertionError):
    """A carrier exchange that reached the carrier has no CarrierInteraction row."""


class DuplicatedInteraction(AssertionError):
    """One carrier exchange written as two CarrierInteraction rows."""


class SlotLimitExceeded(AssertionError):
    """More calls in flight to one carrier from one worker than its slots."""


class RateLimitExceeded(AssertionError):
    """More calls started at a carrier than its declared rate limit allows."""


# -- helpers ------------------------------------------------------------------------------------


def only(*carrier_ids: str, **changes: Any) -> Registry:
    """The shipped registry reduced to some carriers (fewer task queues for the workers built
    here), each with ``changes`` to its registry data."""
    carriers = {cid: REGISTRY.carriers[cid].model_copy(update=changes) for cid in carrier_ids}
    return REGISTRY.model_copy(update={"carriers": carriers})


def one_off(carrier_id: str, registry: Registry = REGISTRY) -> StartSubscriptionRequest:
    """A one-off purchase: charged at once, once."""
    carrier = registry.carriers[carrier_id]
    price = next(p for p in carrier.price_points if p.period is Period.ONE_OFF)
    return StartSubscriptionRequest(
        msisdn=sample_msisdn(carrier, registry, random.Random(uuid.uuid4().hex)),
        product_id=price.product, period=price.period,
        amount_minor=registry.amount_minor(carrier_id, price),
        currency=registry.currency_of(carrier_id), carrier_id=carrier_id)


@dataclass
class Calls:
    """Every call a worker made to a carrier through its adapter (the HTTP exchange itself):
    (carrier, kind, started, ended, ran as a local activity)."""
    log: list[tuple[str, str, float, float, bool]] = field(default_factory=list)
    in_flight: dict[str, int] = field(default_factory=dict)
    most: dict[str, int] = field(default_factory=dict)

    def of(self, kind: str) -> list[tuple[str, str, float, float, bool]]:
        return [c for c in self.log if c[1] == kind]


def instrument(adapters: Any, carrier_id: str, calls: Calls) -> None:
    """Counts the carrier calls of one adapter instance (the class is left alone)."""
    adapter = adapters.get(carrier_id)
    for kind in ("charge", "refund", "status", "balance"):
        original = getattr(adapter, kind)

        def wrap(original: Any = original, kind: str = kind) -> Any:
            async def counted(*args: Any, **kwargs: Any) -> Any:
                try:
                    local = activity.info().is_local
                except RuntimeError:
                    local = False
                calls.in_flight[carrier_id] = calls.in_flight.get(carrier_id, 0) + 1
                calls.most[carrier_id] = max(calls.most.get(carrier_id, 0),
                                             calls.in_flight[carrier_id])
                began = time.monotonic()
                try:
                    return await original(*args, **kwargs)
                finally:
                    calls.in_flight[carrier_id] -= 1
                    calls.log.append((carrier_id, kind, began, time.monotonic(), local))
            return counted

        setattr(adapter, kind, wrap())


def gates_of(group: WorkerGroup) -> CarrierGates:
    for fn in group.workers[0].config()["activities"]:
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, BillingActivities):
            assert owner._gates is not None
            return owner._gates
    raise AssertionError("no billing activities in the workflow worker")


@dataclass
class Running:
    settings: Settings
    group: WorkerGroup
    calls: Calls
    client: SubscriptionClient


@asynccontextmanager
async def own_worker(env: WorkflowEnvironment, base: Settings, engine: Engine,
                     registry: Registry, calls: Calls | None = None,
                     task_queue: str | None = None, own_connection: bool = False,
                     temporal: Client | None = None, **changes: Any) -> AsyncIterator[Running]:
    """A worker group as worker.py builds it, on a task queue of its own (or ``task_queue``),
    with its own adapters (counted) and so its own carrier gates (``own_connection``: its own
    client connection too, as another worker process has)."""
    settings = base.model_copy(update={
        "task_queue": task_queue or f"lc-{uuid.uuid4().hex[:8]}", **changes})
    temporal = temporal or env.client
    if own_connection:
        temporal = await Client.connect(env.client.service_client.config.target_host,
                                        namespace=env.client.namespace)
    adapters = make_adapter_pool(registry, settings, engine, temporal)
    calls = calls if calls is not None else Calls()
    for carrier_id in registry.carriers:
        instrument(adapters, carrier_id, calls)
    client = SubscriptionClient(env.client, engine, registry, settings.task_queue,
                                settings.deployment_id, local_charges=True)
    try:
        async with build_worker(temporal, settings, engine, adapters, registry) as group:
            yield Running(settings, group, calls, client)
    finally:
        await adapters.aclose()


@pytest.fixture(autouse=True)
async def no_faults_left(simulator: Simulator, game_backend: GameBackendServer) -> Any:
    """Faults a test injected and did not use up never reach the next test."""
    yield
    simulator.core.faults.clear()
    simulator.core.unavailable_until.clear()


def operations_of(engine: Engine, subscription_id: int) -> list[CarrierOperation]:
    with Session(engine) as session:
        return list(session.exec(select(CarrierOperation).where(
            CarrierOperation.subscription_id == subscription_id).order_by(
                col(CarrierOperation.id))))


def ledger_of(engine: Engine, subscription_id: int) -> list[LedgerEntry]:
    with Session(engine) as session:
        return list(session.exec(select(LedgerEntry).where(
            LedgerEntry.subscription_id == subscription_id).order_by(col(LedgerEntry.id))))


def interactions_of(engine: Engine, key: str) -> list[CarrierInteraction]:
    with Session(engine) as session:
        return list(session.exec(select(CarrierInteraction).where(
            CarrierInteraction.idempotency_key == key).order_by(col(CarrierInteraction.id))))


async def books_match(simulator: Simulator, engine: Engine, carrier_id: str, msisdn: str,
                      subscription_id: int) -> list[tuple[str, int]]:
    """Our ledger for the subscription equals the carrier's own books for the subscriber, to
    the minor unit; returns them."""
    currency = REGISTRY.currency_of(carrier_id)
    theirs = sorted((t["kind"], from_decimal(Decimal(t["amount"]), currency))
                    for t in await simulator.transactions(carrier_id, msisdn))
    ours = sorted((str(getattr(e.kind, "value", e.kind)), e.amount_minor)
                  for e in ledger_of(engine, subscription_id))
    assert ours == theirs, f"ledger {ours} != carrier books {theirs}"
    return ours


async def eventually(check: Any, seconds: float, step: float = 0.1) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {seconds} s")
        await asyncio.sleep(step)


async def debited(simulator: Simulator, carrier_id: str, msisdn: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not await simulator.transactions(carrier_id, msisdn):
        if time.monotonic() > deadline:
            raise AssertionError("the carrier never debited")
        await asyncio.sleep(0.02)


def sqlite_path(settings: Settings) -> str:
    return settings.database_url.split("///", 1)[-1]


@contextmanager
def write_lock_held(settings: Settings) -> Iterator[None]:
    """Another connection (another process, a backup, a long transaction) holds SQLite's write
    lock: every writer waits in its busy handler (30 s) meanwhile."""
    conn = sqlite3.connect(sqlite_path(settings), isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


# -- 1. rate limits ------------------------------------------------------------------------------


def _manifest_docs(path: Path) -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def test_the_shipped_deployment_keeps_local_calls_within_each_carriers_rate() -> None:
    deploy = PROJECT_ROOT / "deploy"
    objects = [d for p in sorted((deploy / "k8s").glob("*.yaml")) for d in _manifest_docs(p)]
    config = next(d for d in objects if d["kind"] == "ConfigMap")["data"]
    most_pods = max([d["spec"]["replicas"] for d in objects if d["kind"] == "Deployment"
                     and d["metadata"]["name"] == "billing-worker"]
                    + [d["spec"]["maxReplicas"] for d in objects
                       if d["kind"] == "HorizontalPodAutoscaler"
                       and d["spec"]["scaleTargetRef"]["name"] == "billing-worker"])
    compose = _manifest_docs(deploy / "docker-compose.yml")[0]
    compose_workers = compose["services"]["worker"]["deploy"]["replicas"]
    compose_env = compose["services"]["worker"]["environment"]
    fields = Settings.model_fields
    for env, pods in ((config, most_pods), (compose_env, compose_workers)):
        share = float(env.get("CB_LOCAL_CALL_SHARE", fields["local_call_share"].default))
        processes = int(env.get("CB_WORKER_PROCESSES", fields["worker_processes"].default))
        gates = CarrierGates(REGISTRY, 20, share, processes)
        for carrier in REGISTRY.carriers.values():
            local_all_pods = gates.of(carrier.id).local_rate * pods
            queue = CarrierGates.queue_rate(carrier, share)
            declared = carrier.rate_limit_per_second
            if local_all_pods + queue > declared * 1.0001:
                raise RateLimitExceeded(
                    f"{pods} pods with worker_processes={processes}: {carrier.id} may be called "
                    f"{local_all_pods + queue:.1f}/s locally and by its queue, its declared "
                    f"rate is {declared}/s")


async def test_local_calls_of_several_workers_stay_within_the_carriers_rate(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """Five worker processes, configured as the settings ask (worker_processes=5), share a
    carrier that declared 2 calls/s; ten one-off purchases are started together."""
    workers = 5
    rate = 2.0
    registry = only(CARRIER, rate_limit_per_second=rate)
    calls = Calls()
    queue = f"lc-rate-{uuid.uuid4().hex[:8]}"
    async with AsyncExitStack() as stack:
        runs = [await stack.enter_async_context(own_worker(
            temporal_env, settings, engine, registry, calls, task_queue=queue,
            own_connection=True, worker_processes=workers)) for _ in range(workers)]
        client = runs[0].client
        requests = [one_off(CARRIER, registry) for _ in range(10)]
        started = await asyncio.gather(*(client.start_subscription(r) for r in requests))
        ids = [s.subscription_id for s in started]
        await eventually(lambda: all(ledger_of(engine, i) for i in ids), 30)
        # money first: each purchase charged exactly once, as the carrier's books say
        for request, sid in zip(requests, ids, strict=True):
            assert len(await books_match(simulator, engine, CARRIER, request.msisdn, sid)) == 1
            assert [o.sends for o in operations_of(engine, sid)] == [1]
    local = sorted(c[2] for c in calls.of("charge") if c[4])
    # (each worker's share here is 0.2 calls/s, under one a second: its local path is shut,
    # every charge went through the server-paced queue)
    assert local == []
    first_second = [t for t in local if t - local[0] < 1.0]
    # the whole local path may take rate*share per second, a second's worth at once
    allowed = rate * 0.5 * 2
    if len(first_second) > allowed:
        raise RateLimitExceeded(
            f"{len(first_second)} local charge calls within one second at a carrier that "
            f"declared {rate}/s (local share {rate * 0.5}/s)")


# -- 2. slot limits ------------------------------------------------------------------------------


async def test_a_carriers_calls_in_one_worker_stay_within_its_slots(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """Two slots per carrier. Two purchases are charged; then, the carrier slow, two new
    purchases (local charges) and refunds of the first two (on the carrier's queue) run
    together."""
    from workflows.refund import RefundWorkflow, refund_workflow_id
    from workflows.types import RefundRequestInput

    registry = only(CARRIER)
    async with own_worker(temporal_env, settings, engine, registry,
                          max_concurrent_activities_per_carrier=2,
                          carrier_timeout_seconds=10.0) as run:
        first = [one_off(CARRIER) for _ in range(2)]
        paid = [(await run.client.start_subscription(r)).subscription_id for r in first]
        await eventually(lambda: all(ledger_of(engine, i) for i in paid), 15)
        second = [one_off(CARRIER) for _ in range(2)]
        for request in (*first, *second):
            await simulator.fault(CARRIER, "latency", request.msisdn, delay_seconds=3)
        run.calls.most.clear()
        fresh = [(await run.client.start_subscription(r)).subscription_id for r in second]
        carrier = registry.carriers[CARRIER]
        for sid in paid:
            _, key = run.client._check_refundable(sid, 1)
            await temporal_env.client.start_workflow(
                RefundWorkflow.run,
                RefundRequestInput(sid, 1, "attack", carrier.settle_delays(), CARRIER, key,
                                   carrier.settle_deadline_seconds,
                                   carrier_task_queue(run.settings.task_queue, carrier)),
                id=refund_workflow_id(sid, 1), task_queue=run.settings.task_queue)
        await eventually(lambda: all(ledger_of(engine, i) for i in fresh)
                         and all(len(ledger_of(engine, i)) == 2 for i in paid), 30)
        for request, sid in zip((*first, *second), (*paid, *fresh), strict=True):
            await books_match(simulator, engine, CARRIER, request.msisdn, sid)
        assert gates_of(run.group).of(CARRIER).in_flight == 0
        most = run.calls.most[CARRIER]
        if most > 2:
            raise SlotLimitExceeded(f"{most} calls in flight at {CARRIER} with 2 slots")


class SlowCarrierSpills(AssertionError):
    """One carrier's slow calls delay another carrier's charges."""


async def test_a_slow_carrier_holds_only_its_own_local_slots(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """Scaled down: two slots per carrier, two local-activity slots in the worker. fr-azur
    answers after 6 s and has two charges in flight; a fr-lumiere charge started meanwhile
    must be taken at once (its carrier is healthy, and its gate and queue are free)."""
    registry = only(CARRIER, "fr-lumiere")
    async with own_worker(temporal_env, settings, engine, registry,
                          max_concurrent_activities_per_carrier=2,
                          max_concurrent_local_activities=2,
                          carrier_timeout_seconds=10.0) as run:
        slow = [one_off(CARRIER) for _ in range(2)]
        for request in slow:
            await simulator.fault(CARRIER, "latency", request.msisdn, delay_seconds=6)
        slow_ids = [(await run.client.start_subscription(r)).subscription_id for r in slow]
        await eventually(lambda: run.calls.in_flight.get(CARRIER) == 2, 5, step=0.02)
        lumiere = registry.carriers["fr-lumiere"]
        price = next(p for p in lumiere.price_points if p.period is Period.INTERVAL)
        fast = StartSubscriptionRequest(
            msisdn=sample_msisdn(lumiere, registry, random.Random(uuid.uuid4().hex)),
            product_id=price.product, period=price.period,
            amount_minor=registry.amount_minor("fr-lumiere", price),
            currency=registry.currency_of("fr-lumiere"), carrier_id="fr-lumiere")
        began = time.monotonic()
        fast_id = (await run.client.start_subscription(fast)).subscription_id
        await eventually(lambda: ledger_of(engine, fast_id), 20, step=0.02)
        waited = time.monotonic() - began
        await run.client.cancel_subscription(fast_id)
        await eventually(lambda: all(ledger_of(engine, i) for i in slow_ids), 20)
        for request, sid in zip(slow, slow_ids, strict=True):
            assert len(await books_match(simulator, engine, CARRIER, request.msisdn, sid)) == 1
        assert len(await books_match(simulator, engine, "fr-lumiere", fast.msisdn,
                                     fast_id)) == 1
        if waited > 3.0:
            raise SlowCarrierSpills(f"a fr-lumiere charge waited {waited:.1f} s for fr-azur's "
                                    "slow calls")


# -- 3. overflow to the carrier's queue ----------------------------------------------------------


async def test_an_overflowing_local_charge_records_and_sends_nothing(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """One slot for the carrier and a slow carrier: of three purchases started together, the
    local attempts that find the slot taken answer overflow, and their charges go through the
    carrier's queue, waiting for the slot. Each is recorded once, sent once, debited once; the
    gate ends empty, at most one call was in flight, and the histories (local marker, then the
    queued activity) replay."""
    registry = only(CARRIER)
    async with own_worker(temporal_env, settings, engine, registry,
                          max_concurrent_activities_per_carrier=1,
                          carrier_timeout_seconds=10.0) as run:
        requests = [one_off(CARRIER) for _ in range(3)]
        for request in requests:
            await simulator.fault(CARRIER, "latency", request.msisdn, delay_seconds=1)
        started = await asyncio.gather(*(run.client.start_subscription(r) for r in requests))
        ids = [s.subscription_id for s in started]
        await eventually(lambda: all(ledger_of(engine, i) for i in ids), 30)
        for request, sid in zip(requests, ids, strict=True):
            assert len(await books_match(simulator, engine, CARRIER, request.msisdn, sid)) == 1
            [operation] = operations_of(engine, sid)
            assert operation.state == OperationState.SETTLED and operation.sends == 1
            exchanges = [i for i in interactions_of(engine, operation.idempotency_key)
                         if i.operation == "charge"]
            assert len(exchanges) == 1
        charges = run.calls.of("charge")
        assert len(charges) == 3
        assert any(not c[4] for c in charges), "no charge overflowed to the carrier's queue"
        assert run.calls.most[CARRIER] == 1
        assert gates_of(run.group).of(CARRIER).in_flight == 0
        overflowed = 0
        for sid in ids:
            handle = run.client.handle(sid)
            history = await handle.fetch_history()
            types = [e.event_type for e in history.events]
            if EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED in types:
                scheduled = [e.activity_task_scheduled_event_attributes.activity_type.name
                             for e in history.events
                             if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED]
                overflowed += "charge_subscription" in scheduled
            await Replayer(workflows=WORKFLOWS).replay_workflow(history)
        assert overflowed >= 1


# -- 4. cancellation of a local attempt ----------------------------------------------------------


async def test_a_cancelled_local_charge_keeps_the_record_of_what_it_sent(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """The carrier debits, then answers after 9.5 s. An operator cancels the workflow (the UI's
    Cancel) meanwhile: the cancellation reaches the workflow at its next task (~8 s), the local
    charge is left to finish, the charge is listed, looked up once and booked, and the workflow
    ends. Money stays right; the exchange that moved it must be on record."""
    recorded = await _cancel_during_the_charge(temporal_env, settings, engine, simulator,
                                               local_call_share=0.5)
    if "charge" not in recorded:
        raise LostInteraction(f"exchanges on record: {recorded}; the charge that debited "
                              "the subscriber is not")


async def test_a_cancelled_queued_charge_keeps_the_record_of_what_it_sent(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """The same cancel with the local path closed (local_call_share=0: every charge overflows
    to the carrier's queue): the queued activity is not interrupted either, so its exchange is
    on record."""
    recorded = await _cancel_during_the_charge(temporal_env, settings, engine, simulator,
                                               local_call_share=0.0)
    assert "charge" in recorded, recorded


async def _cancel_during_the_charge(env: WorkflowEnvironment, settings: Settings,
                                    engine: Engine, simulator: Simulator,
                                    local_call_share: float) -> list[str]:
    registry = only(CARRIER)
    async with own_worker(env, settings, engine, registry, carrier_timeout_seconds=10.0,
                          local_call_share=local_call_share) as run:
        request = one_off(CARRIER)
        await simulator.fault(CARRIER, "timeout_after_debit", request.msisdn,
                              delay_seconds=9.5)
        sid = (await run.client.start_subscription(request)).subscription_id
        await debited(simulator, CARRIER, request.msisdn, 5)
        await run.client.handle(sid).cancel()
        await eventually(lambda: ledger_of(engine, sid), 30)
        assert len(await books_match(simulator, engine, CARRIER, request.msisdn, sid)) == 1
        [operation] = operations_of(engine, sid)
        assert operation.state == OperationState.SETTLED and operation.sends == 1
        # (a queued attempt is not interrupted: it is still waiting for the carrier's answer)
        await eventually(lambda: run.calls.in_flight.get(CARRIER) == 0
                         and gates_of(run.group).of(CARRIER).in_flight == 0, 12)
        await asyncio.sleep(0.5)  # its exchange written after its answer
        # booked by the charge's own answer, which the workflow waited for: never resent
        assert len(run.calls.of("charge")) == 1
        assert [c[4] for c in run.calls.of("charge")] == [local_call_share > 0]
        assert (await run.client.handle(sid).describe()).status == \
            WorkflowExecutionStatus.CANCELED
        return [i.operation for i in interactions_of(engine, operation.idempotency_key)]


async def test_a_local_charge_outliving_its_timeout_is_retried_safely(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """One slot for the carrier. Another connection holds SQLite's write lock for 32.5 s from
    the moment the charge is recorded: the carrier answers after 4 s, the conclusion waits for
    the lock, the local activity's 30 s start_to_close passes and it is retried while the first
    attempt is still in flight (its conclusion in the database's hands, its slot held): the
    retry finds no slot, overflows, and the carrier's queue runs the charge as soon as the
    first attempt lets go. Neither retry may send: one send, one debit, one ledger entry; and
    one record of the exchange."""
    registry = only(CARRIER)
    async with own_worker(temporal_env, settings, engine, registry,
                          max_concurrent_activities_per_carrier=1,
                          carrier_timeout_seconds=10.0) as run:
        request = one_off(CARRIER)
        await simulator.fault(CARRIER, "latency", request.msisdn, delay_seconds=4)
        sid = (await run.client.start_subscription(request)).subscription_id
        await eventually(lambda: operations_of(engine, sid), 10, step=0.005)
        recorded_at = time.monotonic()
        with write_lock_held(settings):
            while time.monotonic() - recorded_at < 32.5:
                await asyncio.sleep(0.1)
        await eventually(lambda: ledger_of(engine, sid), 20)
        assert len(await books_match(simulator, engine, CARRIER, request.msisdn, sid)) == 1
        [operation] = operations_of(engine, sid)
        assert operation.state == OperationState.SETTLED and operation.sends == 1
        assert [c[1] for c in run.calls.log] == ["charge"]  # the retries found it concluded
        await eventually(lambda: gates_of(run.group).of(CARRIER).in_flight == 0, 5)
        handle = run.client.handle(sid)
        history = await handle.fetch_history()
        queued = [e.activity_task_scheduled_event_attributes.activity_type.name
                  for e in history.events
                  if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED]
        assert "charge_subscription" in queued, "the retry did not overflow to the queue"
        await Replayer(workflows=WORKFLOWS).replay_workflow(history)
        recorded = [i.operation for i in interactions_of(engine, operation.idempotency_key)]
        if recorded.count("charge") != 1:
            raise DuplicatedInteraction(f"exchanges on record: {recorded}")


class LostCharge(AssertionError):
    """The carrier debited; the ledger does not say so and nothing lists it as unsettled."""


async def test_a_temporal_cancel_while_a_charge_settles_leaves_it_listed(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """The carrier debits and drops the connection: the charge is PENDING and the workflow
    waits to settle it. An operator cancels the workflow in Temporal meanwhile. The debit must
    end in the ledger, or at least among the operations listed as unsettled."""
    registry = only(CARRIER)
    async with own_worker(temporal_env, settings, engine, registry,
                          carrier_timeout_seconds=10.0) as run:
        request = one_off(CARRIER)
        await simulator.fault(CARRIER, "reset_after_debit", request.msisdn)
        sid = (await run.client.start_subscription(request)).subscription_id
        await eventually(lambda: [o for o in operations_of(engine, sid)
                                  if o.state == OperationState.PENDING], 10)
        handle = run.client.handle(sid)
        await handle.cancel()
        # settled meanwhile (the safe outcome), or the workflow gone
        for _ in range(150):
            if ledger_of(engine, sid) or (await handle.describe()).status != \
                    WorkflowExecutionStatus.RUNNING:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)
        assert len(await simulator.transactions(CARRIER, request.msisdn)) == 1
        [operation] = operations_of(engine, sid)
        listed = [u.idempotency_key for u in await run.client.unsettled(CARRIER)]
        status = (await handle.describe()).status
        if not ledger_of(engine, sid) and operation.idempotency_key not in listed:
            raise LostCharge(f"workflow {status}, operation {operation.state}, no ledger "
                             "entry, not listed as unsettled; the carrier debited")



async def test_a_temporal_cancel_while_the_carrier_call_runs_lets_it_finish_and_books_it(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """The carrier takes seconds to answer; an operator cancels the workflow in Temporal while
    the local charge is in its call. The call outlasts the workflow task's heartbeat (8 s of
    the default 10 s), so the cancellation reaches the workflow mid-call. Cancelling the call
    would leave a debit whose answer no one reads: the call finishes, its debit is in the
    ledger, then the workflow ends."""
    registry = only(CARRIER, timeout_seconds=25.0)
    async with own_worker(temporal_env, settings, engine, registry,
                          carrier_timeout_seconds=25.0) as run:
        request = one_off(CARRIER)
        await simulator.fault(CARRIER, "latency", request.msisdn, delay_seconds=14.0)
        sid = (await run.client.start_subscription(request)).subscription_id
        await eventually(lambda: [o for o in operations_of(engine, sid)
                                  if o.state == OperationState.SENDING], 10)
        handle = run.client.handle(sid)
        await handle.cancel()
        for _ in range(300):
            if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
                break
            await asyncio.sleep(0.1)
        assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
        [operation] = operations_of(engine, sid)
        debits = await simulator.transactions(CARRIER, request.msisdn)
        assert len(debits) == 1, (operation, interactions_of(engine, operation.idempotency_key))
        [debit] = debits
        [entry] = ledger_of(engine, sid)
        assert entry.carrier_reference == debit["serverReferenceCode"]
        operation = operations_of(engine, sid)[0]
        assert operation.state == OperationState.SETTLED
        assert operation.idempotency_key not in [
            u.idempotency_key for u in await run.client.unsettled(CARRIER)]

# -- 5. a worker killed, or cut off from the server, while its local charge is in flight -------

_WORKER_SCRIPT = """
import asyncio, json, os
from temporalio.client import Client
from carriers.loader import default_registry
from models.db import make_engine
from settings import Settings
from worker import build_worker, make_adapter_pool

async def main():
    settings = Settings(**json.loads(os.environ["LC_SETTINGS"]), _env_file=None)
    client = await Client.connect(os.environ["LC_TARGET"], namespace=os.environ["LC_NAMESPACE"])
    registry = default_registry()
    wanted = os.environ["LC_CARRIERS"].split(",")
    registry = registry.model_copy(update={"carriers": {
        k: v for k, v in registry.carriers.items() if k in wanted}})
    engine = make_engine(settings.database_url)
    adapters = make_adapter_pool(registry, settings, engine, client)
    async with build_worker(client, settings, engine, adapters, registry):
        print("polling", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


def _plain_settings(settings: Settings) -> dict[str, Any]:
    return {
        "database_url": settings.database_url, "task_queue": settings.task_queue,
        "simulator_urls": settings.simulator_urls,
        "carrier_secrets": {k: v.get_secret_value() for k, v in settings.carrier_secrets.items()},
        "callback_base_url": settings.callback_base_url, "callback_port": settings.callback_port,
        "carrier_timeout_seconds": settings.carrier_timeout_seconds,
        "game_backend_url": settings.game_backend_url,
        "game_backend_token": settings.game_backend_token.get_secret_value(),
        "notice_carrier_id": settings.notice_carrier_id,
        "deployment_id": settings.deployment_id,
    }


async def test_a_worker_killed_during_its_local_charge_is_settled_not_resent(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """Worker A (its own process) runs the local charge; the carrier debits and is slow to
    answer; A is SIGKILLed. The local activity never reached the history: after the workflow
    task times out, worker B replays the workflow and runs the local activity again, as attempt
    1. The operation is already SENDING, so B settles it by a look-up and never sends again."""
    registry = only(CARRIER)
    queue = f"lc-kill-{uuid.uuid4().hex[:8]}"
    mine = settings.model_copy(update={"task_queue": queue, "carrier_timeout_seconds": 10.0})
    request = one_off(CARRIER)
    await simulator.fault(CARRIER, "timeout_after_debit", request.msisdn, delay_seconds=8)
    config = temporal_env.client.service_client.config
    process = subprocess.Popen(
        [sys.executable, "-c", _WORKER_SCRIPT], cwd=PROJECT_ROOT,
        env={**os.environ, "LC_SETTINGS": json.dumps(_plain_settings(mine)),
             "LC_TARGET": config.target_host, "LC_NAMESPACE": temporal_env.client.namespace,
             "LC_CARRIERS": CARRIER},
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)
        assert line.strip() == "polling"
        client = SubscriptionClient(temporal_env.client, engine, registry, queue,
                                    mine.deployment_id, local_charges=True)
        sid = (await client.start_subscription(request)).subscription_id
        await debited(simulator, CARRIER, request.msisdn, 10)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        [operation] = operations_of(engine, sid)
        assert operation.state == OperationState.SENDING
        async with own_worker(temporal_env, settings, engine, registry, task_queue=queue,
                              carrier_timeout_seconds=10.0) as run:
            await eventually(lambda: ledger_of(engine, sid), 40)
            assert len(await books_match(simulator, engine, CARRIER, request.msisdn, sid)) == 1
            [operation] = operations_of(engine, sid)
            assert operation.state == OperationState.SETTLED and operation.sends == 1
            assert [c[1] for c in run.calls.log] == ["status"]  # B looked it up, never sent
            assert [i.operation for i in interactions_of(engine, operation.idempotency_key)
                    if i.operation == "status"]
            history = await client.handle(sid).fetch_history()
            types = [e.event_type for e in history.events]
            assert EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT in types
            await Replayer(workflows=WORKFLOWS).replay_workflow(history)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


class DoubleCharge(AssertionError):
    """The carrier debited one charge twice."""


class Partition:
    """A TCP hop between one worker and the Temporal server that can go silent (a network
    partition: the worker keeps its database and its carriers, loses the server)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._silent = False
        self._writers: list[asyncio.StreamWriter] = []
        self.address = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not self._silent:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self._silent:
            return
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers.append(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def go_silent(self) -> None:
        self._silent = True

    def heal(self) -> None:
        """The server is back: the silent connections are dropped, new ones get through."""
        self._silent = False
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def close(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()


async def test_a_partitioned_workers_local_attempt_and_its_rerun_send_once(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """fr-azur (deduplicates by key, has a look-up; here it declares that what it takes shows
    within 2 s, and settling waits 2 s). The first send fails with a 500 (nothing debited, the
    client cannot know): PENDING. Worker A settles it: the look-up finds nothing, the send is
    older than 2 s, so A claims a resend; the database is busy meanwhile (another connection
    holds SQLite's write lock: in production a slow look-up or a busy database opens the same
    window). A loses the Temporal server; its workflow task times out and worker B (another
    process: its own engine and database thread) replays and settles the same attempt the same
    way. The lock goes; A's claim is taken and A resends; the carrier takes 1.5 s to answer
    it. B's claim must fail (A is sending, its send 0 s old, within the 2 s the carrier
    declared): one debit."""
    promises = REGISTRY.carriers[CARRIER].promises.model_copy(
        update={"visible_within_seconds": 2.0})
    registry = only(CARRIER, promises=promises, settle_delays_seconds=[2.0])
    queue = f"lc-split-{uuid.uuid4().hex[:8]}"
    partition = Partition(temporal_env.client.service_client.config.target_host)
    await partition.start()
    through_partition = await Client.connect(partition.address,
                                             namespace=temporal_env.client.namespace)
    other_process = make_engine(settings.database_url)
    request = one_off(CARRIER)
    await simulator.fault(CARRIER, "error_500", request.msisdn)
    try:
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(own_worker(
                temporal_env, settings, engine, registry, task_queue=queue,
                temporal=through_partition, carrier_timeout_seconds=10.0))
            stack.callback(partition.heal)  # before A shuts down
            sid = (await a.client.start_subscription(request)).subscription_id
            await eventually(lambda: [o for o in operations_of(engine, sid)
                                      if o.state == OperationState.PENDING], 10, step=0.01)
            with write_lock_held(settings):
                await eventually(lambda: a.calls.of("status"), 15, step=0.02)
                await asyncio.sleep(0.3)  # A's claim waits for the lock now
                partition.go_silent()
                b = await stack.enter_async_context(own_worker(
                    temporal_env, settings, other_process, registry, task_queue=queue,
                    carrier_timeout_seconds=10.0))
                await eventually(lambda: b.calls.of("status"), 25, step=0.02)
                await asyncio.sleep(0.3)  # B's claim waits for the lock too
                await simulator.fault(CARRIER, "latency", request.msisdn, delay_seconds=1.5)
            await eventually(lambda: ledger_of(engine, sid), 20)
            await asyncio.sleep(3)  # every send answered and concluded
            resends = a.calls.of("charge")[1:] + b.calls.of("charge")
            [operation] = operations_of(engine, sid)
            debits = await simulator.transactions(CARRIER, request.msisdn)
            if len(debits) > 1:
                raise DoubleCharge(
                    f"{len(debits)} debits for one purchase; the ledger has "
                    f"{len(ledger_of(engine, sid))} entry; {operation.sends} sends recorded, "
                    f"{len(resends)} resends (A: {len(a.calls.of('charge')) - 1}, "
                    f"B: {len(b.calls.of('charge'))})")
            await books_match(simulator, engine, CARRIER, request.msisdn, sid)
    finally:
        await partition.close()
        other_process.dispose()


# -- 6. replay ------------------------------------------------------------------------------------


async def test_histories_recorded_before_the_change_replay() -> None:
    """Every history recorded by the queue-only code (tests/histories) replays on the
    local-first code: ``workflow.patched`` keeps their charges on the carrier's queue."""
    files = sorted((PROJECT_ROOT / "tests" / "histories").glob("*.json"))
    assert files
    replayer = Replayer(workflows=WORKFLOWS)
    for path in files:
        history = WorkflowHistory.from_json(path.stem, path.read_text())
        await replayer.replay_workflow(history)
