"""Carrier specifics are registry data: each carrier's own fault codes (per operation), its
WS-Security password type and its service paths, over real sockets against the simulators,
which read the same entries."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from carriers.base import ChargeRequest, Outcome, RefundRequest
from carriers.exceptions import FaultCodes
from carriers.factory import CarrierConfigError, build_adapter
from carriers.http import HttpTransport, InteractionRecord, discard_interaction
from carriers.loader import RegistryError, default_registry, load_registry
from carriers.parlayx import ParlayXAdapter
from models.money import from_decimal
from settings import Settings
from tests.conftest import Simulator

REGISTRY = default_registry()
KAROO = "za-karoo"  # Parlay X: SVC0270 on a charge is insufficient funds; own payment path
SPRINGBOK = "za-springbok"  # Parlay X, WS-Security digest, the family's defaults throughout
DASMAN = "kw-dasman"  # Parlay X, WS-Security PasswordText; own account-management path
LUMIERE = "fr-lumiere"  # OneAPI: POL0001 on a charge is insufficient funds
AZUR = "fr-azur"  # OneAPI, the family's defaults
PREFIX = {KAROO: "+2783", SPRINGBOK: "+2782", DASMAN: "+9659", LUMIERE: "+3364", AZUR: "+3361"}
_numbers = iter(range(3_100_000, 3_999_999))


def msisdn(carrier_id: str) -> str:
    return f"{PREFIX[carrier_id]}{next(_numbers):07d}"


def charge(carrier_id: str, number: str, key: str) -> ChargeRequest:
    currency = REGISTRY.currency_of(carrier_id)
    return ChargeRequest(idempotency_key=key, msisdn=number, currency=currency,
                         amount_minor=from_decimal(REGISTRY.carriers[carrier_id].price_points[0]
                                                   .amount, currency),
                         description="Game Pass", reference_code=key)


async def variant(sim: Simulator, carrier_id: str, number: str, code: str | None = None) -> None:
    """The carrier refuses the next charge for want of credit, in its own words."""
    body = {"carrier": carrier_id, "kind": "fault_code_variant", "msisdn": number, "count": 1}
    await sim.control("faults", body | ({"code": code} if code else {}))


async def charge_once(settings: Settings, carrier_id: str, request: ChargeRequest,
                      ) -> tuple[Outcome, str | None]:
    adapter = build_adapter(REGISTRY.carriers[carrier_id], settings, discard_interaction)
    try:
        result = await adapter.charge(request)
    finally:
        await adapter.aclose()
    return result.outcome, result.carrier_code


# -- fault codes -----------------------------------------------------------------------------


def test_a_carriers_own_meaning_wins_per_operation_then_code_then_family() -> None:
    codes = FaultCodes("x", {"charge:SVC0270": "insufficient_funds", "SVC0001": "rejected",
                             "refund:SVC0001": "unknown"})
    assert codes.outcome("charge", "SVC0270") is Outcome.INSUFFICIENT_FUNDS
    assert codes.outcome("refund", "SVC0270") is Outcome.REJECTED  # the family's
    assert codes.outcome("charge", "SVC0001") is Outcome.REJECTED
    assert codes.outcome("refund", "SVC0001") is Outcome.UNKNOWN
    assert codes.outcome("charge", "POL1000") is Outcome.INSUFFICIENT_FUNDS


@pytest.mark.parametrize(("own", "other", "code"), [
    (KAROO, SPRINGBOK, "SVC0270"),  # Parlay X
    (LUMIERE, AZUR, "POL0001"),  # OneAPI
])
async def test_a_code_means_insufficient_funds_only_where_the_carrier_says_so(
        simulator: Simulator, settings: Settings, own: str, other: str, code: str) -> None:
    number = msisdn(own)
    await variant(simulator, own, number)
    assert await charge_once(settings, own, charge(own, number, f"own-{number}")) == (
        Outcome.INSUFFICIENT_FUNDS, code)

    number = msisdn(other)
    await variant(simulator, other, number, code)
    assert await charge_once(settings, other, charge(other, number, f"other-{number}")) == (
        Outcome.REJECTED, code)  # the family's default: final, but not a lack of funds
    for carrier_id in (own, other):
        assert await simulator.transactions(carrier_id, number) == []


async def test_a_code_declared_for_charges_keeps_the_familys_meaning_for_refunds(
        simulator: Simulator, settings: Settings) -> None:
    number = msisdn(KAROO)
    adapter = build_adapter(REGISTRY.carriers[KAROO], settings, discard_interaction)
    try:
        refused = await adapter.refund(RefundRequest(
            idempotency_key=f"refund-{number}", msisdn=number, amount_minor=100,
            currency="ZAR", description="refund", reference_code="r",
            original_carrier_reference="never-charged"))
    finally:
        await adapter.aclose()
    assert (refused.outcome, refused.carrier_code) == (Outcome.REJECTED, "SVC0270")


@pytest.mark.parametrize("carrier_id", [SPRINGBOK, KAROO, AZUR])
async def test_a_code_nobody_lists_is_unknown_and_logged(
        simulator: Simulator, settings: Settings, caplog: pytest.LogCaptureFixture,
        carrier_id: str) -> None:
    number = msisdn(carrier_id)
    await variant(simulator, carrier_id, number, "SVC4711")
    with caplog.at_level(logging.WARNING, logger="carriers.exceptions"):
        outcome = await charge_once(settings, carrier_id, charge(carrier_id, number, number))
    assert outcome == (Outcome.UNKNOWN, "SVC4711")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(carrier_id in m and "charge" in m and "SVC4711" in m for m in warned), warned


# -- WS-Security password type ---------------------------------------------------------------


async def test_password_text_carrier_charges_and_sends_the_text_type(
        simulator: Simulator, settings: Settings) -> None:
    records: list[InteractionRecord] = []

    async def keep(record: InteractionRecord) -> None:
        records.append(record)

    number = msisdn(DASMAN)
    adapter = build_adapter(REGISTRY.carriers[DASMAN], settings, keep)
    try:
        result = await adapter.charge(charge(DASMAN, number, f"text-{number}"))
        balance = await adapter.balance(number, "KWD")  # at its own account path
    finally:
        await adapter.aclose()
    assert result.outcome is Outcome.SUCCEEDED, result
    assert balance.outcome is Outcome.SUCCEEDED and balance.amount_minor is not None, balance
    assert len(await simulator.transactions(DASMAN, number)) == 1
    sent = records[0].request_body
    assert "#PasswordText" in sent and "#PasswordDigest" not in sent
    secret = settings.carrier_secrets[REGISTRY.carriers[DASMAN].auth.secret_ref]
    assert secret.get_secret_value() not in sent  # recorded, but redacted
    assert records[1].url.endswith("/kw-dasman/parlayx/services/AccountMgmt")


def adapter_for(simulator: Simulator, carrier_id: str, secret: str,
                password_type: str | None, paths: dict[str, str] | None = None,
                ) -> ParlayXAdapter:
    carrier = REGISTRY.carriers[carrier_id]
    transport = HttpTransport(carrier_id=carrier_id,
                              base_url=f"{simulator.url}/{carrier_id}/parlayx", auth=None,
                              timeout_seconds=2, secrets=[secret], sink=discard_interaction)
    return ParlayXAdapter(transport, carrier.auth.kind, carrier.auth.username, secret,
                          password_type=password_type,
                          paths=carrier.service_paths if paths is None else paths)


@pytest.mark.parametrize(("carrier_id", "password_type", "right_secret"), [
    (DASMAN, "text", False),  # a wrong password
    (DASMAN, "digest", True),  # the right one, as a digest, which this carrier refuses
    (DASMAN, None, True),  # (the default is digest)
    (SPRINGBOK, "text", True),  # a digest carrier refuses the password in the clear
    (SPRINGBOK, "digest", False),
])
async def test_a_token_of_the_wrong_type_or_password_is_refused_without_a_debit(
        simulator: Simulator, settings: Settings, carrier_id: str, password_type: str | None,
        right_secret: bool) -> None:
    secret = settings.carrier_secrets[carrier_id].get_secret_value()
    adapter = adapter_for(simulator, carrier_id, secret if right_secret else secret + "x",
                          password_type)
    number = msisdn(carrier_id)
    try:
        result = await adapter.charge(charge(carrier_id, number, f"wrong-{number}"))
    finally:
        await adapter.aclose()
    assert (result.outcome, result.carrier_code) == (Outcome.TRANSIENT, "AUTH"), result
    assert await simulator.transactions(carrier_id, number) == []


async def test_the_right_type_goes_through_directly_too(simulator: Simulator,
                                                        settings: Settings) -> None:
    for carrier_id, password_type in ((DASMAN, "text"), (SPRINGBOK, "digest"), (SPRINGBOK, None)):
        secret = settings.carrier_secrets[carrier_id].get_secret_value()
        adapter = adapter_for(simulator, carrier_id, secret, password_type)
        number = msisdn(carrier_id)
        try:
            result = await adapter.charge(charge(carrier_id, number, f"right-{number}"))
        finally:
            await adapter.aclose()
        assert result.outcome is Outcome.SUCCEEDED, (carrier_id, password_type, result)


# -- service paths ---------------------------------------------------------------------------


async def test_a_carrier_is_served_at_its_own_paths_only(simulator: Simulator,
                                                         settings: Settings) -> None:
    number = msisdn(KAROO)
    assert await charge_once(settings, KAROO, charge(KAROO, number, f"path-{number}")) == (
        Outcome.SUCCEEDED, None)
    assert len(await simulator.transactions(KAROO, number)) == 1

    async with httpx.AsyncClient(base_url=simulator.url) as client:
        # the family's default path is not this carrier's: nothing answers there
        assert (await client.post("/za-karoo/parlayx/AmountChargingService",
                                  content="<x/>")).status_code == 404
        assert (await client.get("/za-karoo/parlayx/pxpay/v2/AmountCharging")).status_code == 200
        assert (await client.get("/kw-dasman/parlayx/services/AccountMgmt")).status_code == 200
        assert (await client.get("/kw-dasman/parlayx/AccountManagementService")
                ).status_code == 404
        # a carrier that declares nothing keeps the defaults
        assert (await client.get("/za-springbok/parlayx/AmountChargingService")
                ).status_code == 200

    # an adapter that ignored the entry's path reaches nothing, and debits nothing
    secret = settings.carrier_secrets[KAROO].get_secret_value()
    adapter = adapter_for(simulator, KAROO, secret, None, paths={})
    other = msisdn(KAROO)
    try:
        result = await adapter.charge(charge(KAROO, other, f"nopath-{other}"))
    finally:
        await adapter.aclose()
    assert result.outcome is not Outcome.SUCCEEDED
    assert await simulator.transactions(KAROO, other) == []


def test_an_unknown_service_name_stops_the_adapter_being_built(settings: Settings) -> None:
    carrier = REGISTRY.carriers[KAROO].model_copy(
        update={"service_paths": {"payments": "/pay"}})
    with pytest.raises(CarrierConfigError, match="za-karoo: service_paths.*payments"):
        build_adapter(carrier, settings, discard_interaction)


# -- validation at load ----------------------------------------------------------------------

GOOD = """
[country]
code = "ZA"
name = "South Africa"
currency = "ZAR"
timezones = ["Africa/Johannesburg"]
default_locale = "en_ZA"

[[carriers]]
id = "za-test"
name = "Test"
protocol = "parlayx"
base_url = "{sim}/za-test/parlayx"
auth = { kind = "wsse", username = "u", secret_ref = "za-test", password_type = "text" }
service_paths = { payment = "/pay" }
faults = { "charge:SVC0270" = "insufficient_funds", "SVC0001" = "unknown" }
timezone = "Africa/Johannesburg"
locale = "en_ZA"
number_prefixes = ["+2789"]
price_points = [{ id = "p1", product = "game-pass", amount = "45.00", period = "monthly" }]
"""


def test_the_example_entry_loads(tmp_path: Path) -> None:
    (tmp_path / "za.toml").write_text(GOOD)
    carrier = load_registry(tmp_path).carriers["za-test"]
    assert carrier.fault_outcome("charge", "SVC0270") == "insufficient_funds"
    assert carrier.fault_outcome("refund", "SVC0270") is None


@pytest.mark.parametrize(("change", "message"), [
    (('"charge:SVC0270"', '"capture:SVC0270"'), r"za.toml: carriers.0.faults: .*capture:SVC0270"),
    (('"charge:SVC0270"', '"SVC 0270"'), r"za.toml: carriers.0.faults: .*SVC 0270"),
    (('= "insufficient_funds"', '= "broke"'), r"za.toml: carriers.0.faults.charge:SVC0270"),
    (('"/pay"', '"pay"'), r"za.toml: carriers.0.service_paths: .*'payment' must start with '/'"),
    (('kind = "wsse"', 'kind = "parlayx-header"'),
     r"za.toml: carriers.0.auth: .*password_type is for wsse only"),
    (('password_type = "text"', 'password_type = "plain"'),
     r"za.toml: carriers.0.auth.password_type"),
])
def test_bad_carrier_data_names_file_and_field(tmp_path: Path, change: tuple[str, str],
                                               message: str) -> None:
    (tmp_path / "za.toml").write_text(GOOD.replace(*change))
    with pytest.raises(RegistryError, match=message):
        load_registry(tmp_path)
