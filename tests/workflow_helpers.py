"""Helpers for tests that drive subscription workflows on the time-skipping server."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from carriers.loader import Registry, default_registry
from carriers.numbers import sample_msisdn
from models.money import from_decimal
from models.tables import LedgerEntry, LedgerKind
from rules.resolve import resolve_rules
from rules.types import ChargingRules
from settings import Settings
from starter import (
    RulesResolver,
    StartedSubscription,
    StartSubscriptionRequest,
    SubscriptionClient,
)
from tests.conftest import Simulator
from workflows.subscription import SubscriptionWorkflow
from workflows.types import BillingState

REGISTRY: Registry = default_registry()


def new_msisdn(carrier_id: str, seed: object) -> str:
    return sample_msisdn(REGISTRY.carriers[carrier_id], REGISTRY, random.Random(str(seed)))


async def subscribe_to(client: SubscriptionClient, price_point_id: str, msisdn: str,
                       **request: Any) -> StartedSubscription:
    """Starts a subscription to one of the registry's price points."""
    carrier = next(c for c in REGISTRY.carriers.values()
                   if any(p.id == price_point_id for p in c.price_points))
    price = next(p for p in carrier.price_points if p.id == price_point_id)
    return await client.start_subscription(StartSubscriptionRequest(
        msisdn=msisdn, product_id=price.product, period=price.period,
        amount_minor=REGISTRY.amount_minor(carrier.id, price),
        currency=REGISTRY.currency_of(carrier.id), carrier_id=carrier.id, **request))


async def until(env: WorkflowEnvironment, handle: WorkflowHandle[Any, Any],
                done: Callable[[BillingState], bool], step: timedelta = timedelta(minutes=10),
                rounds: int = 400) -> BillingState:
    """Moves time on (to the next charge first, then in steps) until ``done(state)``."""
    state: BillingState = await handle.query(SubscriptionWorkflow.state)
    ahead = state.next_charge_at - await env.get_current_time()
    if ahead > timedelta(0) and not done(state):
        await env.sleep(ahead)
        state = await handle.query(SubscriptionWorkflow.state)
    for _ in range(rounds):
        if done(state):
            return state
        await env.sleep(step)
        state = await handle.query(SubscriptionWorkflow.state)
    raise AssertionError(f"not reached: {state}")


def rules_with(**changes: Any) -> RulesResolver:
    """The shipped rules with some figures changed (opt-in off, a lower cap...)."""

    def resolve(country: str, carrier: str, product: str, price: int, period: str,
                zone: str | None) -> ChargingRules:
        return replace(resolve_rules(country, carrier, product, price, period, zone), **changes)

    return resolve


def ruled_client(temporal_env: WorkflowEnvironment, engine: Engine, settings: Settings,
                 resolver: RulesResolver = resolve_rules, registry: Registry | None = None
                 ) -> SubscriptionClient:
    """A client that bills its subscriptions under rules (``resolver``: which)."""
    return SubscriptionClient(temporal_env.client, engine, registry or default_registry(),
                              settings.task_queue, settings.deployment_id, apply_rules=True,
                              rules_resolver=resolver)


async def next_weekday(env: WorkflowEnvironment, zone: str, hour: int, minute: int = 0,
                       days_ahead: int = 2) -> datetime:
    """A Tuesday-to-Thursday local wall time a few days after the test server's clock."""
    now = (await env.get_current_time()).astimezone(ZoneInfo(zone))
    day = (now + timedelta(days=days_ahead)).date()
    while day.weekday() not in (1, 2, 3):
        day += timedelta(days=1)
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=ZoneInfo(zone))


def ledger_of(engine: Engine, subscription_id: int) -> list[LedgerEntry]:
    with Session(engine) as session:
        return list(session.exec(
            select(LedgerEntry).where(LedgerEntry.subscription_id == subscription_id)
            .order_by(col(LedgerEntry.id))))


def net_minor(entries: list[LedgerEntry]) -> int:
    return sum(-e.amount_minor if e.kind == LedgerKind.REFUND else e.amount_minor
               for e in entries)


async def assert_books_match(simulator: Simulator, engine: Engine, carrier_id: str, msisdn: str,
                             subscription_ids: list[int]) -> None:
    """Our ledger equals the carrier's own books for this subscriber, to the minor unit:
    the same charges and refunds, the same amounts."""
    currency = REGISTRY.currency_of(carrier_id)
    theirs = sorted((t["kind"], from_decimal(Decimal(t["amount"]), currency))
                    for t in await simulator.transactions(carrier_id, msisdn))
    ours = sorted((e.kind.value if isinstance(e.kind, LedgerKind) else str(e.kind),
                   e.amount_minor)
                  for sid in subscription_ids for e in ledger_of(engine, sid))
    assert ours == theirs, f"ledger {ours} != carrier books {theirs}"
