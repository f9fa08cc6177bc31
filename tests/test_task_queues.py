"""Per-carrier task queues (finding 10): a slow carrier holds its own activity slots only."""

from __future__ import annotations

import asyncio
import random
import time
import uuid

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select
from temporalio.testing import WorkflowEnvironment

from carriers.loader import carrier_task_queue, default_registry
from carriers.numbers import sample_msisdn
from models.tables import CarrierOperation, LedgerEntry, OperationState, Period
from settings import Settings
from starter import StartSubscriptionRequest, SubscriptionClient
from tests.conftest import Simulator
from worker import build_worker, make_adapter_pool

REGISTRY = default_registry()


def first_charge_now(carrier_id: str, seed: str) -> StartSubscriptionRequest:
    """A one-off purchase, or else the carrier's short demo plan: charged at once."""
    carrier = REGISTRY.carriers[carrier_id]
    price = next((p for p in carrier.price_points if p.period is Period.ONE_OFF), None) or next(
        p for p in carrier.price_points if p.period is Period.INTERVAL)
    return StartSubscriptionRequest(
        msisdn=sample_msisdn(carrier, REGISTRY, random.Random(seed)), product_id=price.product,
        period=price.period, amount_minor=REGISTRY.amount_minor(carrier_id, price),
        currency=REGISTRY.currency_of(carrier_id), carrier_id=carrier_id)


def charged(engine: Engine, subscription_ids: list[int]) -> int:
    """How many of the subscriptions have had their first charge."""
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(LedgerEntry).where(
            col(LedgerEntry.subscription_id).in_(subscription_ids),
            LedgerEntry.cycle == 1)).one())


def in_flight(engine: Engine, subscription_ids: list[int]) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(CarrierOperation).where(
            col(CarrierOperation.subscription_id).in_(subscription_ids),
            CarrierOperation.state == OperationState.SENDING)).one())


async def test_a_slow_carrier_holds_only_its_own_slots(
    temporal_env: WorkflowEnvironment, settings: Settings, engine: Engine,
    simulator: Simulator,
) -> None:
    """Two activity slots per carrier queue. fr-azur answers after 5 s; eight of its charges
    queue behind each other. fr-lumiere's charges, on their own queue, are all taken at the
    carrier's normal pace meanwhile: none of them waits for fr-azur."""
    narrow = settings.model_copy(update={
        "task_queue": f"queues-{uuid.uuid4().hex[:8]}", "max_concurrent_activities_per_carrier": 2})
    assert (carrier_task_queue(narrow.task_queue, REGISTRY.carriers["fr-azur"])
            != carrier_task_queue(narrow.task_queue, REGISTRY.carriers["fr-lumiere"]))
    adapters = make_adapter_pool(REGISTRY, narrow, engine, temporal_env.client)
    client = SubscriptionClient(temporal_env.client, engine, REGISTRY, narrow.task_queue)
    await simulator.control("faults", {"carrier": "fr-azur", "kind": "latency", "count": 8,
                                       "delay_seconds": 5})
    try:
        async with build_worker(temporal_env.client, narrow, engine, adapters, REGISTRY):
            slow = [(await client.start_subscription(first_charge_now("fr-azur", f"q-slow-{i}")))
                    .subscription_id for i in range(8)]
            began = time.monotonic()
            fast = [(await client.start_subscription(first_charge_now("fr-lumiere", f"q-fast-{i}")))
                    .subscription_id for i in range(6)]
            while charged(engine, fast) < len(fast) and time.monotonic() - began < 30:
                await asyncio.sleep(0.1)
            fast_seconds = time.monotonic() - began
            assert charged(engine, fast) == len(fast)
            # fr-azur is still working through its queue, two at a time
            assert charged(engine, slow) < len(slow)
            assert in_flight(engine, slow) <= 2
            assert fast_seconds < 5, fast_seconds
            while charged(engine, slow) < len(slow) and time.monotonic() - began < 60:
                await asyncio.sleep(0.2)
            assert charged(engine, slow) == len(slow)
            for sid in fast:
                await client.cancel_subscription(sid)
    finally:
        await adapters.aclose()
