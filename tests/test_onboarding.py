"""A new carrier is a registry file: a Parlay X carrier whose fault codes, WS-Security variant,
service paths and (absent) status look-up differ from our simulator's defaults, and a OneAPI
carrier with no status endpoint, are added by one TOML file and nothing else, and certified by
carriers.certify against a simulator configured from that same data."""

from __future__ import annotations

import secrets as pysecrets
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
from aiohttp import web
from pydantic import SecretStr

from carriers.certify import CertifyAssets, Report, certify
from carriers.loader import Registry, load_registry
from settings import Settings
from simulators.core import SimulatorCore
from simulators.server import sim_carriers, start_simulator
from tests.conftest import Simulator

NEW_CARRIERS = """
[country]
code = "IE"
name = "Ireland"
currency = "EUR"
timezones = ["Europe/Dublin"]
default_locale = "en_IE"

# Parlay X with its own fault list, PasswordText, its own paths and no status operation
[[carriers]]
id = "ie-harbour"
name = "Harbour Mobile"
protocol = "parlayx"
base_url = "{sim}/ie-harbour/parlayx"
auth = { kind = "wsse", username = "games-ie-harbour", secret_ref = "ie-harbour", password_type = "text" }
service_paths = { payment = "/soap/v3/Charging", account = "/soap/v3/Account" }
faults = { "charge:SVC9101" = "insufficient_funds", "SVC9102" = "rejected" }
promises = { deduplicates_by_key = "replay" }
timezone = "Europe/Dublin"
locale = "en_IE"
number_prefixes = ["+35383"]
price_points = [
  { id = "ie-harbour-pass-monthly", product = "game-pass", amount = "4.99", period = "monthly" },
]

# OneAPI without a status endpoint (it replays a repeated clientCorrelator)
[[carriers]]
id = "ie-cliff"
name = "Cliff Telecom"
protocol = "oneapi"
base_url = "{sim}/ie-cliff/payment/v1"
auth = { kind = "basic", username = "games-ie-cliff", secret_ref = "ie-cliff" }
faults = { "charge:POL2001" = "insufficient_funds" }
promises = { deduplicates_by_key = "replay" }
timezone = "Europe/Dublin"
locale = "en_IE"
number_prefixes = ["+35386"]
price_points = [
  { id = "ie-cliff-pass-monthly", product = "game-pass", amount = "4.99", period = "monthly" },
]
"""

SECRETS = {"ie-harbour": pysecrets.token_urlsafe(12), "ie-cliff": pysecrets.token_urlsafe(12)}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    directory: Path = tmp_path_factory.mktemp("registry")
    (directory / "ie.toml").write_text(NEW_CARRIERS, encoding="utf-8")
    return load_registry(directory)


@pytest.fixture(scope="module")
async def their_server(registry: Registry) -> AsyncIterator[Simulator]:
    """The carriers' own servers, as their data describes them."""
    core = SimulatorCore(sim_carriers(registry, SECRETS), Decimal("0"))
    runner: web.AppRunner
    runner, port = await start_simulator(core, registry=registry)
    yield Simulator(core, f"http://127.0.0.1:{port}", "")
    await runner.cleanup()


@pytest.fixture
def their_settings(settings: Settings, their_server: Simulator) -> Settings:
    return settings.model_copy(update={
        "simulator_urls": {"sim": their_server.url},
        "carrier_secrets": {k: SecretStr(v) for k, v in SECRETS.items()}})


async def assets(sim: Simulator, carrier_id: str, prefix: str) -> CertifyAssets:
    funded, unfunded = f"{prefix}1234567", f"{prefix}7654321"
    await sim.set_balance(carrier_id, funded, "100")
    await sim.set_balance(carrier_id, unfunded, "0")
    return CertifyAssets(funded_msisdn=funded, unfunded_msisdn=unfunded)


def outcome_of(report: Report) -> dict[str, str]:
    return {c.name: c.status for c in report.clauses}


async def test_a_parlayx_carrier_that_differs_by_data_is_certified(
    registry: Registry, their_server: Simulator, their_settings: Settings,
) -> None:
    carrier = registry.carriers["ie-harbour"]
    report = await certify(carrier, their_settings, await assets(their_server, carrier.id,
                                                                "+35383"), registry=registry)
    print("\n".join(report.lines()))
    statuses = outcome_of(report)
    assert report.failed == 0, report.lines()
    # its own insufficient-funds code (SVC9101) read through its own fault list
    assert statuses["insufficient-funds"] == "pass"
    # no status operation: look-ups are FAILED, never "not found"
    assert statuses["lookup-unknown"] == statuses["lookup-charged"] == "pass"
    titles = {c.name: c.title for c in report.clauses}
    assert "FAILED" in titles["lookup-unknown"]
    assert report.exit_code == 0
    books = await their_server.transactions(carrier.id, "+353831234567")
    assert [t["kind"] for t in books] == ["charge"]  # one debit, the repeat replayed


async def test_a_oneapi_carrier_without_a_status_endpoint_is_certified(
    registry: Registry, their_server: Simulator, their_settings: Settings,
) -> None:
    carrier = registry.carriers["ie-cliff"]
    report = await certify(carrier, their_settings, await assets(their_server, carrier.id,
                                                                "+35386"), registry=registry)
    print("\n".join(report.lines()))
    assert report.failed == 0, report.lines()
    assert outcome_of(report)["insufficient-funds"] == "pass"
    assert "FAILED" in {c.name: c.title for c in report.clauses}["lookup-unknown"]
    assert report.exit_code == 0


async def test_a_wrong_password_type_fails_certification(
    registry: Registry, their_server: Simulator, their_settings: Settings,
) -> None:
    """The data is what certify checks: declare digest where the carrier wants text and the
    credential-using clauses fail."""
    entry = registry.carriers["ie-harbour"]
    digest = entry.model_copy(update={"auth": entry.auth.model_copy(
        update={"password_type": "digest"})})
    report = await certify(digest, their_settings, await assets(their_server, entry.id,
                                                               "+35383"), registry=registry)
    assert report.failed > 0 and report.exit_code != 0
