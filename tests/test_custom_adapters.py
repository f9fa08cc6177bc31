"""A carrier-specific adapter named by the registry is the one built, and is needed."""

from __future__ import annotations

import random

import httpx
import pytest

from carriers.base import ChargeRequest, Outcome
from carriers.factory import CarrierConfigError, adapter_class, build_adapter
from carriers.http import HttpTransport, discard_interaction
from carriers.loader import default_registry
from carriers.numbers import sample_msisdn
from carriers.oneapi import OneApiAdapter
from settings import Settings
from tests.conftest import Simulator


async def test_tejo_charges_need_its_metadata(settings: Settings, simulator: Simulator) -> None:
    registry = default_registry()
    carrier = registry.carriers["pt-tejo-movel"]
    assert adapter_class(carrier).__name__ == "PtTejoMovelAdapter"
    msisdn = sample_msisdn(carrier, registry, random.Random(5))
    request = ChargeRequest(idempotency_key="tejo-1", msisdn=msisdn, amount_minor=499,
                            currency="EUR", description="Game Pass", reference_code="T1")
    secret = settings.carrier_secrets["pt-tejo-movel"].get_secret_value()
    plain = OneApiAdapter(HttpTransport(
        carrier_id=carrier.id, base_url=f"{simulator.url}/pt-tejo-movel/payment/v1",
        auth=httpx.BasicAuth(carrier.auth.username, secret), timeout_seconds=2,
        secrets=[secret], sink=discard_interaction))
    custom = build_adapter(carrier, settings, discard_interaction)
    try:
        refused = await plain.charge(request)
        assert (refused.outcome, refused.carrier_code) == (Outcome.REJECTED, "SVC0002")
        assert (await custom.charge(request)).outcome is Outcome.SUCCEEDED
    finally:
        await plain.aclose()
        await custom.aclose()


def test_an_adapter_outside_the_family_is_refused() -> None:
    carrier = default_registry().carriers["fr-azur"].model_copy(
        update={"adapter": "carriers.parlayx:ParlayXAdapter"})
    with pytest.raises(CarrierConfigError, match="must subclass OneApiAdapter"):
        adapter_class(carrier)
    missing = carrier.model_copy(update={"adapter": "carriers.nowhere:Nothing"})
    with pytest.raises(CarrierConfigError, match="No module named"):
        adapter_class(missing)
