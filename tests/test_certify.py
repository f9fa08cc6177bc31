"""carriers.certify against a second simulator of its own, as it would run against a carrier's
sandbox: the test prepares the assets (balances through the simulator's control API, a charge
to refund through an adapter); certify itself only talks to the carrier's endpoint."""

from __future__ import annotations

import asyncio
import json
import os
import random
import string
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
from aiohttp import web
from pydantic import SecretStr

from carriers.base import ChargeRequest, Outcome
from carriers.certify import CertifyAssets, CertifyError, Report, certify, load_assets, main
from carriers.factory import build_adapter
from carriers.http import discard_interaction
from carriers.loader import CarrierConfig, default_registry
from carriers.numbers import sample_msisdn
from settings import PROJECT_ROOT, Settings
from simulators.core import SimulatorCore
from simulators.server import sim_carriers, start_simulator
from tests.conftest import Simulator

REGISTRY = default_registry()
ASSETS_DIR = Path(__file__).resolve().parent / "certify_assets"
_rng = random.Random(7)
_taken: set[str] = set()


async def start_second(secrets: dict[str, str]) -> tuple[Simulator, web.AppRunner]:
    """A simulator of its own, nobody's number funded (balance 0 by default)."""
    core = SimulatorCore(sim_carriers(REGISTRY, secrets), Decimal("0"))
    runner, port = await start_simulator(core)
    return Simulator(core, f"http://127.0.0.1:{port}", ""), runner


@pytest.fixture(scope="module")
async def second_sim(carrier_secrets: dict[str, str]) -> AsyncIterator[Simulator]:
    sim, runner = await start_second(carrier_secrets)
    yield sim
    await runner.cleanup()


@pytest.fixture
def cert_settings(settings: Settings, second_sim: Simulator) -> Settings:
    """The suite's settings (its secrets), with {sim} meaning the second simulator (so an
    oauth2 entry's token URL is the second simulator's too)."""
    return settings.model_copy(update={"simulator_urls": {"sim": second_sim.url,
                                                          "smpp": "127.0.0.1:9"}})


def endpoint(carrier: CarrierConfig, sim: Simulator) -> str:
    return carrier.base_url.format(sim=sim.url)


async def prepare_assets(carrier: CarrierConfig, sim: Simulator, settings: Settings,
                         refundable: bool = True) -> CertifyAssets:
    """What a carrier's sandbox would hand over: a funded and an unfunded number, and a
    charge that may be refunded (made here, by an adapter of the test's own)."""
    funded = sample_msisdn(carrier, REGISTRY, _rng, _taken)
    unfunded = sample_msisdn(carrier, REGISTRY, _rng, _taken)
    await sim.set_balance(carrier.id, funded, "1000")
    await sim.set_balance(carrier.id, unfunded, "0")
    reference = None
    if refundable:
        adapter = build_adapter(carrier, settings, discard_interaction)
        try:
            charged = await adapter.charge(ChargeRequest(
                idempotency_key=f"prep-{_rng.getrandbits(48):x}", msisdn=funded,
                amount_minor=REGISTRY.amount_minor(carrier.id, carrier.price_points[0]),
                currency=REGISTRY.currency_of(carrier.id), description="to refund",
                reference_code="PREP"))
        finally:
            await adapter.aclose()
        assert charged.outcome is Outcome.SUCCEEDED, charged
        reference = charged.carrier_reference
    return CertifyAssets(funded_msisdn=funded, unfunded_msisdn=unfunded,
                         refundable_charge=reference)


def statuses(report: Report) -> dict[str, str]:
    return {c.name: c.status for c in report.clauses}


async def charges(sim: Simulator, carrier_id: str, msisdn: str | None) -> int:
    assert msisdn is not None
    return sum(1 for t in await sim.transactions(carrier_id, msisdn) if t["kind"] == "charge")


# -- the ordinary suite never reaches a real host ------------------------------------------------


def placeholder_first(address: str) -> bool:
    literal, field, _, _ = next(iter(string.Formatter().parse(address)))
    return literal == "" and bool(field)


def test_every_registry_address_is_a_placeholder() -> None:
    """pytest resolves every carrier address through CB_SIMULATOR_URLS: an entry with a
    literal address would send the conformance suite, with development secrets, to it.
    A real carrier is reached only by carriers.certify, with --base-url and real secrets."""
    assert not placeholder_first("https://billing.azur.example/{sim}")
    assert placeholder_first("{sim}/fr-azur/payment/v1")
    for carrier in REGISTRY.carriers.values():
        addresses = [carrier.base_url, carrier.auth.token_url, carrier.refund_base_url]
        for address in filter(None, addresses):
            assert placeholder_first(address), (
                f"{carrier.id}: {address!r} must start with a placeholder such as {{sim}}, "
                "resolved through CB_SIMULATOR_URLS")


# -- certified -----------------------------------------------------------------------------------


async def test_a_oneapi_carrier_is_certified(cert_settings: Settings,
                                             second_sim: Simulator) -> None:
    carrier = REGISTRY.carriers["fr-azur"]
    assets = await prepare_assets(carrier, second_sim, cert_settings)
    report = await certify(carrier, cert_settings, assets, endpoint(carrier, second_sim))
    print("\n".join(report.lines()))
    assert statuses(report) == {
        "charge": "pass", "repeat-replay": "pass", "lookup-charged": "pass",
        "lookup-unknown": "pass", "insufficient-funds": "pass", "barred": "not run",
        "refund": "pass", "bad-credentials": "pass"}
    assert report.exit_code == 0
    assert report.lines()[-1] == "certified: 7 of 8 clauses passed"
    assert "needs barred_msisdn" in "\n".join(report.lines())
    # the books agree: the test's charge and certify's one (its repeat was replayed, the
    # wrong credentials debited nothing)
    assert await charges(second_sim, carrier.id, assets.funded_msisdn) == 2


async def test_a_carrier_without_a_look_up_is_certified_expecting_failed_look_ups(
    cert_settings: Settings, second_sim: Simulator
) -> None:
    carrier = REGISTRY.carriers["mx-maya"]
    assert not carrier.promises.status_lookup and carrier.protocol == "parlayx"
    assets = await prepare_assets(carrier, second_sim, cert_settings)
    report = await certify(carrier, cert_settings, assets, endpoint(carrier, second_sim))
    print("\n".join(report.lines()))
    assert statuses(report) == {
        "charge": "pass", "lookup-charged": "pass", "lookup-unknown": "pass",
        "insufficient-funds": "pass", "barred": "not run", "refund": "pass",
        "bad-credentials": "pass", "balance": "pass"}
    titles = {c.name: c.title for c in report.clauses}
    assert "FAILED" in titles["lookup-unknown"] and "FAILED" in titles["lookup-charged"]
    assert report.exit_code == 0
    assert report.lines()[-1] == "certified: 7 of 8 clauses passed"


@pytest.mark.parametrize("carrier_id", ["de-alpen", "br-ipe", "fr-cote", "kw-dasman"])
async def test_every_http_family_is_certified(carrier_id: str, cert_settings: Settings,
                                             second_sim: Simulator) -> None:
    """Polling (settled by look-up), CAMARA (a repeat refused: the look-up finds the first),
    a callback aggregator (JWT), Parlay X with WS-Security and a balance."""
    carrier = REGISTRY.carriers[carrier_id]
    assets = await prepare_assets(carrier, second_sim, cert_settings, refundable=False)
    report = await certify(carrier, cert_settings, assets, endpoint(carrier, second_sim),
                           settle_timeout=20)
    print("\n".join(report.lines()))
    assert report.failed == 0, report.lines()
    assert {n for n, s in statuses(report).items() if s == "not run"} == {"barred", "refund"}


# -- not certified -------------------------------------------------------------------------------


async def test_wrong_credentials_fail_the_clauses_that_use_them(
    cert_settings: Settings, second_sim: Simulator
) -> None:
    carrier = REGISTRY.carriers["fr-azur"]
    assets = await prepare_assets(carrier, second_sim, cert_settings)
    wrong = "not-the-secret-" + os.urandom(4).hex()
    secrets = dict(cert_settings.carrier_secrets)
    secrets[carrier.auth.secret_ref] = SecretStr(wrong)
    settings = cert_settings.model_copy(update={"carrier_secrets": secrets})
    report = await certify(carrier, settings, assets, endpoint(carrier, second_sim))
    text = "\n".join(report.lines())
    print(text)
    assert statuses(report) == {
        "charge": "fail", "repeat-replay": "not run", "lookup-charged": "not run",
        "lookup-unknown": "fail", "insufficient-funds": "fail", "barred": "not run",
        "refund": "fail", "bad-credentials": "pass"}
    assert report.exit_code == 1
    assert report.lines()[-1] == "certified: 1 of 8 clauses passed"
    charge = report.clauses[0]
    assert "transient" in charge.detail and "401" in charge.detail
    assert charge.raw and all("-> 401" in raw for raw in charge.raw)
    assert "carrier answered: charge POST" in text
    assert assets.funded_msisdn is not None
    assert wrong not in text and assets.funded_msisdn not in text  # redacted
    assert await charges(second_sim, carrier.id, assets.funded_msisdn) == 1  # the test's own


# -- the command -----------------------------------------------------------------------------


async def run_certify(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "carriers.certify", *args, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout=90)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def clean_env() -> dict[str, str]:
    """No CB_* settings leak in from the developer's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CB_")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    return env


async def test_the_command_certifies_a_local_simulator_with_dev_secrets(
    tmp_path: Path
) -> None:
    """The documented command, against a simulator started without CB_CARRIER_SECRETS (as
    `python -m simulators.server` is), with the assets file in the repository."""
    sim, runner = await start_second({})
    try:
        assets_file = ASSETS_DIR / "fr-azur.toml"
        assets = load_assets(assets_file)
        assert assets.funded_msisdn and assets.unfunded_msisdn
        await sim.set_balance("fr-azur", assets.funded_msisdn, "100")
        await sim.set_balance("fr-azur", assets.unfunded_msisdn, "0")
        code, out, err = await run_certify(
            "fr-azur", "--base-url", f"{sim.url}/fr-azur/payment/v1", "--assets",
            str(assets_file), "--dev-secrets", env=clean_env(), cwd=tmp_path)
        print(out, err)
        assert code == 0, (out, err)
        assert out.strip().splitlines()[-1] == "certified: 6 of 8 clauses passed"
        assert "NOT RUN barred" in out and "NOT RUN refund" in out
        assert await charges(sim, "fr-azur", assets.funded_msisdn) == 1
    finally:
        await runner.cleanup()


async def test_the_command_exits_non_zero_and_prints_the_answer_on_failure(
    second_sim: Simulator, tmp_path: Path
) -> None:
    carrier = REGISTRY.carriers["fr-azur"]
    funded = sample_msisdn(carrier, REGISTRY, _rng, _taken)
    await second_sim.set_balance(carrier.id, funded, "100")
    assets_file = tmp_path / "assets.toml"
    assets_file.write_text(f'funded_msisdn = "{funded}"\n')
    env = clean_env()
    env["CB_CARRIER_SECRETS"] = json.dumps({carrier.auth.secret_ref: "rotated-away-1234"})
    code, out, _ = await run_certify(
        carrier.id, "--base-url", endpoint(carrier, second_sim), "--assets", str(assets_file),
        env=env, cwd=tmp_path)
    print(out)
    assert code == 1
    assert "FAIL    charge" in out and "carrier answered: charge POST" in out and "-> 401" in out
    assert "rotated-away-1234" not in out
    assert out.strip().splitlines()[-1].startswith("certified: ")


def test_dev_secrets_are_never_sent_beyond_this_machine(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CB_CARRIER_SECRETS", raising=False)
    code = main(["fr-azur", "--base-url", "https://billing.azur.example/payment/v1",
                 "--dev-secrets"])
    assert code == 2
    assert "not a loopback address" in capsys.readouterr().err


def test_without_dev_secrets_a_missing_secret_stops_certification(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CB_CARRIER_SECRETS", "{}")
    code = main(["fr-azur", "--base-url", "http://127.0.0.1:9/fr-azur/payment/v1"])
    assert code == 2
    assert "CB_CARRIER_SECRETS" in capsys.readouterr().err


def test_an_assets_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('funded_msisdn = "0612345678"\nfunded = "x"\n')
    with pytest.raises(CertifyError, match="funded_msisdn"):
        load_assets(path)
    for shipped in ASSETS_DIR.glob("*.toml"):
        assets = load_assets(shipped)
        carrier = REGISTRY.carriers[shipped.stem]
        for msisdn in (assets.funded_msisdn, assets.unfunded_msisdn, assets.barred_msisdn):
            assert msisdn is None or REGISTRY.route(msisdn) is carrier
