"""CAMARA two-step payments: prepare, validate with the SMS code, confirm."""

from __future__ import annotations

import random
from decimal import Decimal

from carriers.base import ChargeRequest, Outcome
from carriers.camara import CamaraAdapter
from carriers.factory import build_adapter
from carriers.http import discard_interaction
from carriers.loader import default_registry
from carriers.numbers import sample_msisdn
from settings import Settings
from tests.conftest import Simulator


async def test_prepare_validate_confirm(settings: Settings, simulator: Simulator) -> None:
    registry = default_registry()
    carrier = registry.carriers["br-ipe"]
    adapter = build_adapter(carrier, settings, discard_interaction)
    assert isinstance(adapter, CamaraAdapter)
    msisdn = sample_msisdn(carrier, registry, random.Random(11))
    await simulator.set_balance(carrier.id, msisdn, "100")
    request = ChargeRequest(idempotency_key="first-purchase-1", msisdn=msisdn, amount_minor=1990,
                            currency="BRL", description="Game Pass", reference_code="FP1")
    try:
        prepared = await adapter.prepare_payment(request)
        assert prepared.result.outcome is Outcome.PENDING
        assert prepared.payment_id and prepared.authorization_id
        assert await simulator.balance(carrier.id, msisdn) == Decimal("100")  # nothing taken yet

        wrong = await adapter.validate_payment("first-purchase-1", prepared.payment_id,
                                               prepared.authorization_id, "000000x")
        assert (wrong.outcome, wrong.carrier_code) == (Outcome.REJECTED,
                                                       "CARRIER_BILLING.INVALID_CODE")
        code = (await simulator.control(f"camara/otp?paymentId={prepared.payment_id}"))["code"]
        valid = await adapter.validate_payment("first-purchase-1", prepared.payment_id,
                                               prepared.authorization_id, code)
        assert valid.outcome is Outcome.PENDING

        # with a 2-legged token the body must name the number: without it nothing is charged
        unnamed = await adapter.confirm_payment("first-purchase-1", prepared.payment_id)
        assert (unnamed.outcome, unnamed.carrier_code) == (Outcome.REJECTED,
                                                           "MISSING_IDENTIFIER")
        assert await simulator.balance(carrier.id, msisdn) == Decimal("100")
        confirmed = await adapter.confirm_payment("first-purchase-1", prepared.payment_id, msisdn)
        # the spec's 202: accepted, the result comes by event or look-up
        assert (confirmed.outcome, confirmed.carrier_reference) == (Outcome.PENDING,
                                                                    prepared.payment_id)
        assert await simulator.balance(carrier.id, msisdn) == Decimal("80.10")
        again = await adapter.confirm_payment("first-purchase-1", prepared.payment_id, msisdn)
        # 409: confirmed once already; never taken as a refusal, it is settled by a look-up
        assert (again.outcome, again.carrier_code) == (Outcome.UNKNOWN,
                                                       "CARRIER_BILLING.PAYMENT_CONFIRMED")
        assert await simulator.balance(carrier.id, msisdn) == Decimal("80.10")
    finally:
        await adapter.aclose()


async def test_a_prepared_payment_can_be_cancelled(settings: Settings, simulator: Simulator
                                                   ) -> None:
    registry = default_registry()
    carrier = registry.carriers["br-ipe"]
    adapter = build_adapter(carrier, settings, discard_interaction)
    assert isinstance(adapter, CamaraAdapter)
    msisdn = sample_msisdn(carrier, registry, random.Random(12))
    await simulator.set_balance(carrier.id, msisdn, "100")
    request = ChargeRequest(idempotency_key="cancelled-purchase-1", msisdn=msisdn,
                            amount_minor=990, currency="BRL", description="Game Pass",
                            reference_code="CP1")
    try:
        prepared = await adapter.prepare_payment(request)
        assert prepared.payment_id and prepared.authorization_id
        cancelled = await adapter.cancel_payment("cancelled-purchase-1", prepared.payment_id,
                                                 msisdn)
        assert (cancelled.outcome, cancelled.carrier_reference) == (Outcome.PENDING,
                                                                    prepared.payment_id)
        again = await adapter.cancel_payment("cancelled-purchase-1", prepared.payment_id, msisdn)
        assert (again.outcome, again.carrier_code) == (Outcome.REJECTED,
                                                       "CARRIER_BILLING.PAYMENT_CANCELLED")
        late = await adapter.confirm_payment("cancelled-purchase-1", prepared.payment_id, msisdn)
        assert late.carrier_code == "CARRIER_BILLING.PAYMENT_CANCELLED"
        assert await simulator.balance(carrier.id, msisdn) == Decimal("100")
    finally:
        await adapter.aclose()
