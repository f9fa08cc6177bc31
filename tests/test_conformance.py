"""The adapter contract: every carrier in the registry, against its simulator over real sockets.

A carrier joins this suite by being in the registry; nothing here names a carrier.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Literal

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from temporalio.client import Client

from carriers.base import (
    Capability,
    CarrierAdapter,
    ChargeRequest,
    OperationResult,
    Outcome,
    RefundRequest,
    StatusRequest,
)
from carriers.dev_secrets import rsa_private_pem
from carriers.factory import adapter_class, build_adapter
from carriers.http import InteractionRecord
from carriers.loader import CarrierConfig, default_registry
from carriers.numbers import sample_msisdn
from carriers.relay import ReportRelay
from models.money import to_decimal
from models.smpp_store import SubmissionStore
from models.tables import CarrierInteraction
from settings import Settings
from tests.conftest import Simulator

REGISTRY = default_registry()
CARRIERS = sorted(REGISTRY.carriers.values(), key=lambda c: c.id)
_rng = random.Random(42)
_taken: set[str] = set()


class Harness:
    def __init__(self, carrier: CarrierConfig, settings: Settings, simulator: Simulator,
                 engine: Engine, client: Client) -> None:
        self.carrier = carrier
        self.sim = simulator
        self.records: list[InteractionRecord] = []
        self.settings = settings
        self.smpp_store = SubmissionStore(engine)
        self.receipts = ReportRelay(client, self._record).relay
        self.adapter = self.build(settings)
        self.msisdn = sample_msisdn(carrier, REGISTRY, _rng, _taken)
        self.currency = REGISTRY.currency_of(carrier.id)
        self.amount_minor = REGISTRY.amount_minor(carrier.id, carrier.price_points[0])

    def build(self, settings: Settings) -> CarrierAdapter:
        return build_adapter(self.carrier, settings, self._record, smpp_store=self.smpp_store,
                             receipts=self.receipts)

    async def _record(self, record: InteractionRecord) -> None:
        self.records.append(record)

    def charge_request(self, key: str | None = None) -> ChargeRequest:
        return ChargeRequest(idempotency_key=key or f"conf-{uuid.uuid4().hex[:12]}",
                             msisdn=self.msisdn, amount_minor=self.amount_minor,
                             currency=self.currency, description="conformance",
                             reference_code="CONF")

    def refund_request(self, charged: OperationResult, key: str | None = None) -> RefundRequest:
        assert charged.carrier_reference
        return RefundRequest(idempotency_key=key or f"conf-r-{uuid.uuid4().hex[:12]}",
                             msisdn=self.msisdn, amount_minor=self.amount_minor,
                             currency=self.currency, description="conformance refund",
                             reference_code="CONFR",
                             original_carrier_reference=charged.carrier_reference)

    async def debits(self) -> int:
        return sum(1 for t in await self.sim.transactions(self.carrier.id, self.msisdn)
                   if t["kind"] == "charge")

    async def balance(self) -> Decimal:
        return await self.sim.balance(self.carrier.id, self.msisdn)

    def price(self) -> Decimal:
        return to_decimal(self.amount_minor, self.currency)

    async def settled(self, result: OperationResult, key: str,
                      operation: Literal["charge", "refund"] = "charge",
                      original: str | None = None, unknown_too: bool = False) -> OperationResult:
        """Settles a pending (or, after a lost answer, unknown) result by status look-ups, as
        the workflow and its activity retries do (bounded here)."""
        waiting = {Outcome.PENDING, Outcome.UNKNOWN} if unknown_too else {Outcome.PENDING}
        for _ in range(60):
            if result.outcome not in waiting:
                return result
            await asyncio.sleep(0.1)
            looked_up = await self.adapter.status(StatusRequest(
                idempotency_key=key, msisdn=self.msisdn, operation=operation,
                original_carrier_reference=original))
            assert looked_up is not None, "a pending operation must be known to the carrier"
            result = looked_up
        raise AssertionError(f"{key} still pending")

    async def charge(self, request: ChargeRequest) -> OperationResult:
        return await self.settled(await self.adapter.charge(request), request.idempotency_key)

    async def refund(self, request: RefundRequest) -> OperationResult:
        return await self.settled(await self.adapter.refund(request), request.idempotency_key,
                                  "refund", request.original_carrier_reference)


def carriers(where: Callable[[CarrierConfig], bool] = lambda _: True) -> pytest.MarkDecorator:
    """Runs the test against every registered carrier the contract clause applies to (by its
    declared capabilities or interaction model), so no carrier is skipped silently."""
    chosen = [c for c in CARRIERS if where(c)]
    return pytest.mark.parametrize("harness", chosen, ids=[f"{c.protocol}:{c.id}" for c in chosen],
                                   indirect=True)


def offers(capability: Capability) -> Callable[[CarrierConfig], bool]:
    return lambda carrier: capability in adapter_class(carrier).capabilities


def calls_back(carrier: CarrierConfig) -> bool:
    return carrier.interaction == "callback"


@pytest.fixture
async def harness(request: pytest.FixtureRequest, settings: Settings, simulator: Simulator,  # type: ignore[no-untyped-def]
                  engine: Engine, temporal_client: Client):
    h = Harness(request.param, settings, simulator, engine, temporal_client)
    await simulator.set_balance(h.carrier.id, h.msisdn, "1000")
    yield h
    await h.adapter.aclose()
    refs = [h.carrier.auth.secret_ref, h.carrier.auth.callback_secret_ref]
    secrets = [settings.carrier_secrets[r].get_secret_value() for r in refs if r]
    for record in h.records:  # nothing stored may carry a secret or the whole MSISDN
        for text in (record.url, record.request_body, record.response_body):
            assert h.msisdn.lstrip("+") not in text
            assert not any(secret in text for secret in secrets)


@carriers()
async def test_charge_succeeds_and_debits_once(harness: Harness) -> None:
    result = await harness.charge(harness.charge_request())
    assert result.outcome is Outcome.SUCCEEDED and result.carrier_reference
    assert await harness.debits() == 1
    assert await harness.balance() == Decimal("1000") - harness.price()
    operations = [r.operation for r in harness.records]
    assert operations[0] == "charge" and set(operations[1:]) <= {"status", "receipt"}


@carriers()
async def test_insufficient_funds(harness: Harness) -> None:
    await harness.sim.set_balance(harness.carrier.id, harness.msisdn, "0")
    result = await harness.charge(harness.charge_request())
    assert result.outcome is Outcome.INSUFFICIENT_FUNDS
    assert await harness.debits() == 0


@carriers()
async def test_repeating_a_key_never_debits_twice(harness: Harness) -> None:
    request = harness.charge_request()
    first = await harness.charge(request)
    again = await harness.charge(request)
    if again.outcome is Outcome.UNKNOWN:  # refused as a repeat (CAMARA): settled by status
        looked_up = await harness.adapter.status(StatusRequest(
            idempotency_key=request.idempotency_key, msisdn=harness.msisdn, operation="charge"))
        assert looked_up is not None
        again = await harness.settled(looked_up, request.idempotency_key)
    assert first.outcome is again.outcome is Outcome.SUCCEEDED
    assert first.carrier_reference == again.carrier_reference
    assert await harness.debits() == 1


@carriers(offers(Capability.REFUND))
async def test_refund_and_over_refund(harness: Harness) -> None:
    charged = await harness.charge(harness.charge_request())
    refunded = await harness.refund(harness.refund_request(charged))
    assert refunded.outcome is Outcome.SUCCEEDED
    assert await harness.balance() == Decimal("1000")
    over = await harness.refund(harness.refund_request(charged))
    assert over.outcome is Outcome.REJECTED
    assert await harness.balance() == Decimal("1000")


@carriers()
@pytest.mark.parametrize("fault", ["timeout_after_debit", "reset_after_debit"])
async def test_lost_answer_is_settled_by_status_without_a_second_debit(
    harness: Harness, fault: str
) -> None:
    await harness.sim.fault(harness.carrier.id, fault, harness.msisdn, delay_seconds=1.5)
    request = harness.charge_request()
    lost = await harness.adapter.charge(request)
    assert lost.outcome is Outcome.UNKNOWN
    assert harness.adapter.supports(Capability.STATUS)
    looked_up = await harness.adapter.status(StatusRequest(
        idempotency_key=request.idempotency_key, msisdn=harness.msisdn, operation="charge"))
    assert looked_up is not None
    settled = await harness.settled(looked_up, request.idempotency_key, unknown_too=True)
    assert settled.outcome is Outcome.SUCCEEDED
    assert await harness.debits() == 1


@carriers()
async def test_status_of_an_unknown_key_is_none(harness: Harness) -> None:
    assert await harness.adapter.status(StatusRequest(
        idempotency_key="never-sent", msisdn=harness.msisdn, operation="charge")) is None


@carriers()
async def test_malformed_response_is_unknown_with_a_clear_message(harness: Harness) -> None:
    await harness.sim.fault(harness.carrier.id, "malformed", harness.msisdn)
    result = await harness.charge(harness.charge_request())
    assert result.outcome is Outcome.UNKNOWN and "malformed" in result.message


@carriers()
async def test_throttling_is_transient_with_retry_after(harness: Harness) -> None:
    await harness.sim.fault(harness.carrier.id, "throttle", harness.msisdn, delay_seconds=7)
    result = await harness.charge(harness.charge_request())
    assert result.outcome is Outcome.TRANSIENT
    if harness.adapter.gives_retry_after:
        assert result.retry_after_seconds == 7.0
    assert await harness.debits() == 0


@carriers()
async def test_bad_credentials_are_a_permanent_rejection(harness: Harness) -> None:
    secrets = dict(harness.settings.carrier_secrets)
    wrong_secret = rsa_private_pem() if harness.carrier.auth.kind == "jwt-rs256" else "wrong"
    secrets[harness.carrier.auth.secret_ref] = SecretStr(wrong_secret)
    wrong = harness.settings.model_copy(update={"carrier_secrets": secrets})
    adapter = harness.build(wrong)
    try:
        result = await adapter.charge(harness.charge_request())
    finally:
        await adapter.aclose()
    assert result.outcome is Outcome.REJECTED
    assert await harness.debits() == 0


def pushed_results(harness: Harness, engine: Engine, key: str) -> list[str]:
    """Outcomes of what the carrier pushed for ``key``: HTTP callbacks (recorded by the
    receiver) and SMPP delivery receipts (recorded by the adapter's relay)."""
    with Session(engine) as session:
        callbacks = [r.outcome for r in session.exec(select(CarrierInteraction).where(
            CarrierInteraction.idempotency_key == key,
            CarrierInteraction.operation == "callback"))]
    receipts = [r.outcome for r in harness.records
                if r.operation == "receipt" and r.idempotency_key == key]
    return callbacks + receipts


@carriers(calls_back)
async def test_duplicated_callbacks_are_verified_and_change_nothing(
    harness: Harness, engine: Engine
) -> None:
    await harness.sim.fault(harness.carrier.id, "duplicate_callback", harness.msisdn)
    key = f"sub-{_rng.randint(10**8, 10**9)}-c1-a0"  # names a workflow that does not exist
    result = await harness.charge(harness.charge_request(key))
    assert result.outcome is Outcome.SUCCEEDED
    for _ in range(50):
        if len(pushed_results(harness, engine, key)) == 2:
            break
        await asyncio.sleep(0.1)
    assert pushed_results(harness, engine, key) == ["succeeded (late)"] * 2
    assert await harness.debits() == 1


@carriers(calls_back)
async def test_a_callback_that_never_comes_is_settled_by_status(
    harness: Harness, engine: Engine
) -> None:
    await harness.sim.fault(harness.carrier.id, "no_callback", harness.msisdn)
    request = harness.charge_request(f"sub-{_rng.randint(10**8, 10**9)}-c1-a0")
    first = await harness.adapter.charge(request)
    assert first.outcome is Outcome.PENDING
    await asyncio.sleep(0.6)
    assert pushed_results(harness, engine, request.idempotency_key) == []
    if harness.adapter.status_asks_carrier:
        settled = await harness.settled(first, request.idempotency_key)
        assert settled.outcome is Outcome.SUCCEEDED
    else:  # still pending, and never sent again: reconciliation settles it
        again = await harness.adapter.charge(request)
        assert again.outcome is Outcome.PENDING
    assert await harness.debits() == 1


@carriers(lambda c: c.auth.callback_secret_ref is not None)
async def test_forged_callbacks_are_refused(harness: Harness, settings: Settings) -> None:
    body = b'{"order_id": "sub-1-c1-a0", "status": "completed", "payment_id": "forged"}'
    async with httpx.AsyncClient() as client:
        reply = await client.post(
            f"{settings.callback_base_url}/callbacks/{harness.carrier.id}", content=body,
            headers={"X-Callback-Signature": "0" * 64})
    assert reply.status_code == 401


@carriers(offers(Capability.BALANCE))
async def test_balance_where_offered(harness: Harness) -> None:
    await harness.sim.set_balance(harness.carrier.id, harness.msisdn, "12.5")
    balance = await harness.adapter.balance(harness.msisdn, harness.currency)
    assert balance.outcome is Outcome.SUCCEEDED
    assert balance.currency == harness.currency
    assert to_decimal(balance.amount_minor or 0, harness.currency) == Decimal("12.5")
