"""The adapter contract: every carrier in the registry, against its simulator over real sockets.

A carrier joins this suite by being in the registry; nothing here names a carrier or a family.
Each clause runs against the carriers it applies to, chosen by what the carrier declares
(``promises`` in the registry, its adapter's capabilities and ``deduplicates_locally``, its
interaction model), and the clauses that split the registry by a declaration together cover
every carrier (``test_every_carrier_is_under_each_declared_clause``): none is skipped silently.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, select

import simulators.callback_aggregator
import simulators.camara
import simulators.polling_aggregator
import simulators.smsc
from carriers.base import (
    CREDENTIAL_CODES,
    Capability,
    CarrierAdapter,
    ChargeRequest,
    Lookup,
    LookupResult,
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
from carriers.reports import CarrierReport
from models import operations as ops
from models.db import make_engine
from models.money import to_decimal
from models.smpp_store import SubmissionStore
from models.tables import (
    CarrierInteraction,
    CarrierOperation,
    LedgerKind,
    OperationState,
)
from settings import Settings
from tests.conftest import Simulator, SimulatorControl

REGISTRY = default_registry()
CARRIERS = sorted(REGISTRY.carriers.values(), key=lambda c: c.id)
_rng = random.Random(42)
_taken: set[str] = set()

# what an adapter's carrier_code says when the carrier refused our credentials: HTTP 401/403,
# an OAuth2 token refused, an SMSC refusing the bind

# the simulators answer at once on loopback: a short timeout keeps the lost-answer clauses quick
TIMEOUT_SECONDS = 0.5

# Known adapter bugs this suite has found, (clause, protocol, auth kind) -> why. Strict: once a
# bug is fixed its clause passes, the xfail fails, and the entry must go. (None open.)
KNOWN_BUGS: dict[tuple[str, str, str], str] = {}


# -- which carriers a clause applies to ------------------------------------------------------

Where = Callable[[CarrierConfig], bool]


def carriers(where: Where = lambda _: True, clause: str = "") -> pytest.MarkDecorator:
    """Runs the test against every registered carrier the contract clause applies to (by its
    declarations), so no carrier is skipped silently; ids say protocol and carrier."""
    chosen = [pytest.param(c, id=f"{c.protocol}:{c.id}", marks=known_bug(clause, c))
              for c in CARRIERS if where(c)]
    if not chosen:  # a clause no carrier reaches is a failure, not a silent skip
        chosen = [pytest.param(None, id="no-carrier-declares-it")]
    return pytest.mark.parametrize("harness", chosen, indirect=True)


def known_bug(clause: str, carrier: CarrierConfig) -> list[pytest.MarkDecorator]:
    reason = (KNOWN_BUGS.get((clause, carrier.protocol, carrier.auth.kind))
              or KNOWN_BUGS.get((clause, carrier.protocol, "*")))
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


def offers(capability: Capability) -> Where:
    return lambda carrier: capability in adapter_class(carrier).capabilities


def dedup(value: Literal["no", "replay", "error"]) -> Where:
    return lambda carrier: carrier.promises.deduplicates_by_key == value


def dedups_locally(carrier: CarrierConfig) -> bool:
    return adapter_class(carrier).deduplicates_locally


def looks_up(carrier: CarrierConfig) -> bool:
    return carrier.promises.status_lookup


def no_lookup(carrier: CarrierConfig) -> bool:
    return not carrier.promises.status_lookup


def calls_back(carrier: CarrierConfig) -> bool:
    """Results are pushed to us: an HTTP callback or an SMPP delivery receipt."""
    return carrier.interaction == "callback"


def signs_callbacks(carrier: CarrierConfig) -> bool:
    """Results are POSTed to our callback receiver, authenticated by the carrier's own key."""
    return carrier.auth.callback_secret_ref is not None


# -- the harness -------------------------------------------------------------------------------


class SimControl(SimulatorControl):
    """The simulators' control API (as tests.conftest.Simulator) on one kept connection: a new
    HTTP client per call costs more than most clauses."""

    def __init__(self, url: str) -> None:
        self._client = httpx.AsyncClient(base_url=url)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        if body is None:
            response = await self._client.get(f"/_control/{path}")
        else:
            response = await self._client.post(f"/_control/{path}", json=body)
        response.raise_for_status()
        return response.json()



class Route:
    """Where a shared adapter's interactions and receipts go: the harness of the clause now
    running (one adapter per carrier serves the whole module, as one serves a worker)."""

    def __init__(self) -> None:
        self.harness: Harness | None = None

    async def record(self, record: InteractionRecord) -> None:
        if self.harness is not None:
            await self.harness._record(record)

    async def relay(self, report: CarrierReport, record: InteractionRecord) -> str:
        return await self.harness._relay(report, record) if self.harness is not None else "late"


Shared = dict[str, tuple[CarrierAdapter, Route]]


class Harness:
    def __init__(self, carrier: CarrierConfig, settings: Settings, simulator: SimControl,
                 engine: Engine, shared: Shared) -> None:
        self.carrier = carrier
        self.sim = simulator
        self.engine = engine
        self.shared = shared
        self.records: list[InteractionRecord] = []
        # what the adapter relayed as pushed results (SMPP receipts), in order
        self.reports: list[CarrierReport] = []
        self.settings = settings.model_copy(update={"carrier_timeout_seconds": TIMEOUT_SECONDS})
        self.smpp_store = SubmissionStore(engine)
        if carrier.id not in shared:
            route = Route()
            shared[carrier.id] = (build_adapter(
                carrier, self.settings, route.record, smpp_store=self.smpp_store,
                receipts=route.relay), route)
        self.adapter, route = shared[carrier.id]
        route.harness = self
        self.msisdn = sample_msisdn(carrier, REGISTRY, _rng, _taken)
        self.currency = REGISTRY.currency_of(carrier.id)
        self.amount_minor = REGISTRY.amount_minor(carrier.id, carrier.price_points[0])

    def build(self, settings: Settings, smpp_store: SubmissionStore | None = None
              ) -> CarrierAdapter:
        """An adapter of this test's own (its interactions are this harness's too)."""
        return build_adapter(self.carrier, settings, self._record,
                             smpp_store=smpp_store or self.smpp_store, receipts=self._relay)

    async def _record(self, record: InteractionRecord) -> None:
        self.records.append(record)

    async def _relay(self, report: CarrierReport, record: InteractionRecord) -> str:
        """Stands in for report_relay.ReportRelay: records what was pushed; nobody waits."""
        self.reports.append(report)
        self.records.append(record.model_copy(update={"outcome": f"{report.outcome} (late)"}))
        return "late"

    @staticmethod
    def key(prefix: str = "conf") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:12]}"

    def charge_request(self, key: str | None = None) -> ChargeRequest:
        return ChargeRequest(idempotency_key=key or self.key(),
                             msisdn=self.msisdn, amount_minor=self.amount_minor,
                             currency=self.currency, description="conformance",
                             reference_code="CONF")

    def refund_request(self, charged: OperationResult, key: str | None = None) -> RefundRequest:
        assert charged.carrier_reference
        return RefundRequest(idempotency_key=key or self.key("conf-r"),
                             msisdn=self.msisdn, amount_minor=self.amount_minor,
                             currency=self.currency, description="conformance refund",
                             reference_code="CONFR",
                             original_carrier_reference=charged.carrier_reference)

    def status_request(self, key: str, operation: Literal["charge", "refund"] = "charge",
                       original: str | None = None) -> StatusRequest:
        return StatusRequest(idempotency_key=key, msisdn=self.msisdn, operation=operation,
                             original_carrier_reference=original)

    async def status(self, key: str) -> LookupResult:
        return await self.adapter.status(self.status_request(key))

    async def drop_shared_adapter(self) -> None:
        """For a clause that binds its own SMPP session (the SMSC keeps the newest bind)."""
        adapter, route = self.shared.pop(self.carrier.id)
        route.harness = None
        await adapter.aclose()

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
        the workflow and its activity retries do (bounded here). A look-up that fails says
        nothing and is asked again; one that does not find an operation we sent is a breach."""
        waiting = {Outcome.PENDING, Outcome.UNKNOWN} if unknown_too else {Outcome.PENDING}
        for _ in range(120):
            if result.outcome not in waiting:
                return result
            await asyncio.sleep(0.05)
            looked_up = await self.adapter.status(self.status_request(key, operation, original))
            assert looked_up.lookup is not Lookup.NOT_FOUND, \
                f"{key} was sent and taken, yet the look-up says not found: {looked_up}"
            if looked_up.lookup is Lookup.FOUND:
                assert looked_up.found is not None
                result = looked_up.found
        raise AssertionError(f"{key} still {result.outcome.value}")

    async def charge(self, request: ChargeRequest) -> OperationResult:
        return await self.settled(await self.adapter.charge(request), request.idempotency_key)

    async def refund(self, request: RefundRequest) -> OperationResult:
        return await self.settled(await self.adapter.refund(request), request.idempotency_key,
                                  "refund", request.original_carrier_reference)

    # -- the operation record the callback receiver binds pushed results to -------------------

    def own_operation(self, key: str) -> None:
        """Records ``key`` as this carrier's charge, as the charge activity does before
        sending; its workflow does not exist, so a relayed result is 'late'."""
        with Session(self.engine) as session:
            ops.reserve(session, ops.OperationSpec(
                idempotency_key=key, kind=LedgerKind.CHARGE, carrier_id=self.carrier.id,
                workflow_id=f"conformance-{key}", subscription_id=0, cycle=1,
                amount_minor=self.amount_minor, currency=self.currency,
                due_at=datetime.now(UTC)))

    def operation(self, key: str) -> CarrierOperation:
        with Session(self.engine) as session:
            found = ops.find(session, key)
            assert found is not None
            return found


@pytest.fixture(scope="module", autouse=True)
def quick_carriers() -> Iterator[None]:
    """Pushed and polled results come after 50 ms instead of 200-300 ms: the same order of
    events, a quarter of the waiting (restored for the other modules)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(simulators.callback_aggregator, "CALLBACK_DELAY_SECONDS", 0.05)
        patch.setattr(simulators.camara, "EVENT_DELAY_SECONDS", 0.05)
        patch.setattr(simulators.polling_aggregator, "PROCESSING_SECONDS", 0.05)
        patch.setattr(simulators.smsc, "RECEIPT_DELAY_SECONDS", 0.05)
        yield


@pytest.fixture(scope="module")
async def sim_control(simulator: Simulator) -> AsyncIterator[SimControl]:
    control = SimControl(simulator.url)
    yield control
    await control.aclose()


@pytest.fixture(scope="module")
async def shared_adapters() -> AsyncIterator[Shared]:
    shared: Shared = {}
    yield shared
    for adapter, _ in shared.values():
        await adapter.aclose()


@pytest.fixture
async def harness(request: pytest.FixtureRequest, settings: Settings, simulator: Simulator,  # type: ignore[no-untyped-def]
                  engine: Engine, shared_adapters: Shared, sim_control: SimControl):
    if request.param is None:
        pytest.fail(f"no registered carrier declares what {request.node.originalname} needs")
    h = Harness(request.param, settings, sim_control, engine, shared_adapters)
    await sim_control.set_balance(h.carrier.id, h.msisdn, "1000")
    yield h
    if h.carrier.id in shared_adapters:
        shared_adapters[h.carrier.id][1].harness = None
    # a fault the clause did not use up must not strike the next one
    simulator.core.faults = [f for f in simulator.core.faults if f.carrier_id != h.carrier.id]
    simulator.core.unavailable_until.pop(h.carrier.id, None)
    refs = [h.carrier.auth.secret_ref, h.carrier.auth.callback_secret_ref]
    secrets = [settings.carrier_secrets[r].get_secret_value() for r in refs if r]
    for record in h.records:  # nothing stored may carry a secret or the whole MSISDN
        for text in (record.url, record.request_body, record.response_body):
            assert h.msisdn.lstrip("+") not in text
            assert not any(secret in text for secret in secrets)


def test_every_carrier_is_under_each_declared_clause() -> None:
    """The clauses that split the registry by a declaration leave no carrier out."""
    repeats = [lambda c: dedup("replay")(c) and not dedups_locally(c),
               lambda c: dedup("error")(c) and not dedups_locally(c),
               lambda c: dedup("no")(c) and not dedups_locally(c), dedups_locally]
    for split in ([dedup("replay"), dedup("error"), dedup("no")], repeats,
                  [looks_up, no_lookup]):
        for carrier in CARRIERS:
            assert sum(where(carrier) for where in split) == 1, carrier.id


# -- charging ----------------------------------------------------------------------------------


@carriers()
async def test_charge_succeeds_and_debits_once(harness: Harness) -> None:
    request = harness.charge_request()
    result = await harness.charge(request)
    assert result.outcome is Outcome.SUCCEEDED and result.carrier_reference
    assert await harness.debits() == 1
    assert await harness.balance() == Decimal("1000") - harness.price()
    # (an SMSC may hand any bind of the account a receipt of another bind's message: only
    # this charge's records count)
    operations = [r.operation for r in harness.records
                  if r.operation != "receipt" or r.idempotency_key == request.idempotency_key]
    assert operations[0] == "charge" and set(operations[1:]) <= {"status", "receipt"}


@carriers()
async def test_insufficient_funds(harness: Harness) -> None:
    await harness.sim.set_balance(harness.carrier.id, harness.msisdn, "0")
    result = await harness.charge(harness.charge_request())
    assert result.outcome is Outcome.INSUFFICIENT_FUNDS
    assert await harness.debits() == 0


# -- a repeated key, by what the carrier declares ----------------------------------------------


@carriers(lambda c: dedup("replay")(c) and not dedups_locally(c), "replay")
async def test_a_replaying_carrier_answers_a_repeat_with_the_first_result(
    harness: Harness
) -> None:
    request = harness.charge_request()
    first = await harness.charge(request)
    again = await harness.charge(request)
    assert first.outcome is again.outcome is Outcome.SUCCEEDED
    assert first.carrier_reference == again.carrier_reference
    assert await harness.debits() == 1


@carriers(lambda c: dedup("error")(c) and not dedups_locally(c), "error")
async def test_a_carrier_refusing_repeats_refuses_without_a_debit(harness: Harness) -> None:
    request = harness.charge_request()
    first = await harness.charge(request)
    assert first.outcome is Outcome.SUCCEEDED
    again = await harness.adapter.charge(request)
    # refused as a repeat: it says nothing about the first one, which a look-up settles
    assert again.outcome is Outcome.UNKNOWN, again
    assert await harness.debits() == 1
    looked_up = await harness.status(request.idempotency_key)
    assert looked_up.lookup is Lookup.FOUND and looked_up.found is not None, looked_up
    settled = await harness.settled(looked_up.found, request.idempotency_key)
    assert settled.outcome is Outcome.SUCCEEDED
    assert settled.carrier_reference == first.carrier_reference
    assert await harness.debits() == 1


@carriers(lambda c: dedup("no")(c) and not dedups_locally(c), "no")
async def test_a_carrier_declaring_no_deduplication_does_debit_a_repeat(
    harness: Harness
) -> None:
    """Not the contract the platform relies on, but the declaration it relies on to never send
    a key twice to this carrier: the adapter passes a repeat on, and the carrier debits it."""
    request = harness.charge_request()
    first = await harness.charge(request)
    again = await harness.charge(request)
    assert first.outcome is again.outcome is Outcome.SUCCEEDED
    assert await harness.debits() == 2, (
        "a carrier declared not to deduplicate took a repeat without a second debit: its "
        "declaration, or the adapter's deduplicates_locally, is wrong")


@carriers(dedups_locally, "local")
async def test_an_adapter_deduplicating_locally_never_sends_a_key_twice(
    harness: Harness, tmp_path: Path
) -> None:
    request = harness.charge_request()
    first = await harness.charge(request)
    again = await harness.charge(request)  # answered from the adapter's own record
    assert first.outcome is again.outcome is Outcome.SUCCEEDED
    assert first.carrier_reference == again.carrier_reference
    assert await harness.debits() == 1
    if harness.carrier.promises.deduplicates_by_key != "no":
        return
    # what the local record protects against: the carrier itself debits a repeat, as declared
    await harness.drop_shared_adapter()
    other = make_engine(f"sqlite:///{tmp_path / 'other.db'}")
    SQLModel.metadata.create_all(other)  # an empty record of what was sent
    amnesiac = harness.build(harness.settings, SubmissionStore(other))
    try:
        assert (await amnesiac.charge(request)).outcome in {Outcome.PENDING, Outcome.SUCCEEDED}
        for _ in range(30):
            if await harness.debits() == 2:
                break
            await asyncio.sleep(0.1)
        assert await harness.debits() == 2
    finally:
        await amnesiac.aclose()
        other.dispose()


# -- refunds -----------------------------------------------------------------------------------


@carriers(offers(Capability.REFUND))
async def test_refund_and_over_refund(harness: Harness) -> None:
    charged = await harness.charge(harness.charge_request())
    refunded = await harness.refund(harness.refund_request(charged))
    assert refunded.outcome is Outcome.SUCCEEDED
    assert await harness.balance() == Decimal("1000")
    over = await harness.refund(harness.refund_request(charged))
    assert over.outcome is Outcome.REJECTED
    assert await harness.balance() == Decimal("1000")


# -- look-ups ----------------------------------------------------------------------------------


@carriers(looks_up)
async def test_look_up_of_an_unknown_key_is_not_found(harness: Harness) -> None:
    looked_up = await harness.status(harness.key("never-sent"))
    assert looked_up.lookup is Lookup.NOT_FOUND and looked_up.found is None, looked_up


@carriers(no_lookup)
async def test_look_up_at_a_carrier_without_one_fails_and_never_says_not_found(
    harness: Harness
) -> None:
    looked_up = await harness.status(harness.key("never-sent"))
    assert looked_up.lookup is Lookup.FAILED and looked_up.found is None, looked_up
    charged = await harness.charge(harness.charge_request())
    assert charged.outcome is Outcome.SUCCEEDED
    looked_up = await harness.status(harness.key("never-sent"))
    assert looked_up.lookup is Lookup.FAILED, looked_up


@carriers(looks_up)
async def test_a_look_up_answered_with_an_error_fails(harness: Harness) -> None:
    """Whatever the error (a fault, the look-up refusing our credentials), the look-up failed:
    it is neither "not found" (which could lead to a resend) nor a result."""
    if calls_back(harness.carrier):  # hold the pushed result back: the look-up must ask
        await harness.sim.fault(harness.carrier.id, "late_callback", harness.msisdn,
                                delay_seconds=0.5)
    request = harness.charge_request()
    sent = await harness.adapter.charge(request)
    assert sent.outcome in {Outcome.SUCCEEDED, Outcome.PENDING}, sent
    for status in (500, 401):
        # twice: an adapter may fetch a new token and ask again after a 401, as it should
        await harness.sim.control("faults", {"carrier": harness.carrier.id,
                                             "kind": "lookup_error", "count": 2,
                                             "status": status})
        looked_up = await harness.status(request.idempotency_key)
        assert looked_up.lookup is Lookup.FAILED and looked_up.found is None, (status, looked_up)
    # it was about the look-up, not the operation: the next ones find the one debit
    settled = await harness.settled(OperationResult(outcome=Outcome.UNKNOWN),
                                    request.idempotency_key, unknown_too=True)
    assert settled.outcome is Outcome.SUCCEEDED
    assert await harness.debits() == 1


@carriers(looks_up)
async def test_a_look_up_of_an_unknown_key_answered_with_an_error_fails(
    harness: Harness
) -> None:
    await harness.sim.control("faults", {"carrier": harness.carrier.id, "kind": "lookup_error",
                                         "count": 1})
    looked_up = await harness.status(harness.key("never-sent"))
    if dedups_locally(harness.carrier):
        # never submitted: the adapter's own record says so without asking the carrier
        assert looked_up.lookup in {Lookup.FAILED, Lookup.NOT_FOUND}, looked_up
    else:
        assert looked_up.lookup is Lookup.FAILED and looked_up.found is None, looked_up


@carriers()
@pytest.mark.parametrize("fault", ["timeout_after_debit", "reset_after_debit"])
async def test_lost_answer_after_the_debit(harness: Harness, fault: str) -> None:
    """A charge whose answer is lost is unknown. A carrier with a look-up finds the one debit;
    at one without, the look-up fails (never "not found") and nothing was sent again."""
    await harness.sim.fault(harness.carrier.id, fault, harness.msisdn,
                            delay_seconds=2 * TIMEOUT_SECONDS)
    request = harness.charge_request()
    lost = await harness.adapter.charge(request)
    assert lost.outcome is Outcome.UNKNOWN, lost
    if looks_up(harness.carrier):
        settled = await harness.settled(lost, request.idempotency_key, unknown_too=True)
        assert settled.outcome is Outcome.SUCCEEDED
    else:
        looked_up = await harness.status(request.idempotency_key)
        assert looked_up.lookup is Lookup.FAILED and looked_up.found is None, looked_up
    assert await harness.debits() == 1
    assert [r.operation for r in harness.records].count("charge") == 1


# -- failures before any debit -----------------------------------------------------------------


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
async def test_an_unavailable_carrier_is_transient_and_its_look_up_fails(
    harness: Harness
) -> None:
    await harness.sim.fault(harness.carrier.id, "unavailable_for", delay_seconds=0.8)
    result = await harness.adapter.charge(harness.charge_request())
    assert result.outcome is Outcome.TRANSIENT, result
    looked_up = await harness.status(harness.key("never-sent"))
    if looks_up(harness.carrier) and dedups_locally(harness.carrier):
        assert looked_up.lookup is Lookup.NOT_FOUND  # never submitted: its own record says so
    else:
        assert looked_up.lookup is Lookup.FAILED, looked_up
    assert await harness.debits() == 0


def wrong_settings(harness: Harness) -> Settings:
    secrets = dict(harness.settings.carrier_secrets)
    wrong_secret = rsa_private_pem() if harness.carrier.auth.kind == "jwt-rs256" else "wrong"
    secrets[harness.carrier.auth.secret_ref] = SecretStr(wrong_secret)
    return harness.settings.model_copy(update={"carrier_secrets": secrets})


async def charge_with(harness: Harness, adapter: CarrierAdapter) -> OperationResult:
    try:
        return await adapter.charge(harness.charge_request())
    finally:
        await adapter.aclose()


@carriers(clause="credentials")
async def test_bad_credentials_are_transient_with_a_credential_code(harness: Harness) -> None:
    """Credentials refused are an operator's to fix, never the subscriber's: transient (the same
    request goes through once fixed), with a code that says so, and no debit."""
    result = await charge_with(harness, harness.build(wrong_settings(harness)))
    assert result.outcome is Outcome.TRANSIENT, result
    assert result.carrier_code in CREDENTIAL_CODES, result
    assert await harness.debits() == 0


@carriers(clause="rotation")
async def test_credentials_rotated_at_the_carrier_are_transient(harness: Harness) -> None:
    await harness.sim.set_balance(harness.carrier.id, harness.msisdn, "100000")
    charged = await harness.charge(harness.charge_request())
    assert charged.outcome is Outcome.SUCCEEDED
    ours = harness.settings.carrier_secrets[harness.carrier.auth.secret_ref].get_secret_value()
    rotated = rsa_private_pem() if harness.carrier.auth.kind == "jwt-rs256" else "rotated1"
    await harness.sim.control("credentials", {"carrier": harness.carrier.id,
                                              "password": rotated})
    try:
        # a new session (a new token, a new bind) with the credentials we still hold
        result = await charge_with(harness, harness.build(harness.settings))
        assert result.outcome is Outcome.TRANSIENT, result
        assert result.carrier_code in CREDENTIAL_CODES, result
        if harness.carrier.auth.kind != "smpp-bind":  # each request is authenticated anew
            again = await harness.adapter.charge(harness.charge_request())
            assert again.outcome is Outcome.TRANSIENT, again
            assert again.carrier_code in CREDENTIAL_CODES, again
        assert await harness.debits() == 1
    finally:
        await harness.sim.control("credentials", {"carrier": harness.carrier.id,
                                                  "password": ours})
    # fixed by the operator: the same adapter goes through again (a new token if it needs one)
    recovered = await harness.charge(harness.charge_request())
    assert recovered.outcome is Outcome.SUCCEEDED, recovered
    assert await harness.debits() == 2


# -- pushed results: callbacks and delivery receipts -------------------------------------------


def pushed_results(harness: Harness, key: str, carrier_id: str | None = None) -> list[str]:
    """Outcomes of what was pushed for ``key``: HTTP callbacks (recorded by the receiver, for
    ``carrier_id``'s URL, by default this carrier's) and SMPP delivery receipts (relayed by
    the adapter)."""
    with Session(harness.engine) as session:
        callbacks = [r.outcome for r in session.exec(select(CarrierInteraction).where(
            CarrierInteraction.idempotency_key == key,
            CarrierInteraction.carrier_id == (carrier_id or harness.carrier.id),
            CarrierInteraction.operation == "callback"))]
    receipts = [r.outcome for r in harness.records
                if r.operation == "receipt" and r.idempotency_key == key]
    return callbacks + receipts


async def wait_for_pushed(harness: Harness, key: str, count: int,
                          carrier_id: str | None = None) -> list[str]:
    for _ in range(50):
        if len(pushed_results(harness, key, carrier_id)) >= count:
            break
        await asyncio.sleep(0.1)
    return pushed_results(harness, key, carrier_id)


@carriers(calls_back)
async def test_duplicated_callbacks_are_verified_and_change_nothing(harness: Harness) -> None:
    await harness.sim.fault(harness.carrier.id, "duplicate_callback", harness.msisdn)
    key = harness.key()
    harness.own_operation(key)
    result = await harness.charge(harness.charge_request(key))
    assert result.outcome is Outcome.SUCCEEDED
    await wait_for_pushed(harness, key, 2)
    await asyncio.sleep(0.1)  # and no third
    assert pushed_results(harness, key) == ["succeeded (late)"] * 2
    assert await harness.debits() == 1
    if signs_callbacks(harness.carrier):  # kept on the operation, bound to its carrier
        assert harness.operation(key).reported_outcome == "succeeded"


@carriers(calls_back)
async def test_a_callback_that_never_comes_is_settled_by_status(harness: Harness) -> None:
    await harness.sim.fault(harness.carrier.id, "no_callback", harness.msisdn)
    key = harness.key()
    harness.own_operation(key)
    request = harness.charge_request(key)
    first = await harness.adapter.charge(request)
    assert first.outcome is Outcome.PENDING
    await asyncio.sleep(0.3)
    assert pushed_results(harness, key) == []
    if looks_up(harness.carrier):
        settled = await harness.settled(first, key)
        assert settled.outcome is Outcome.SUCCEEDED
    else:  # nothing to ask, and never sent again: reconciliation settles it
        looked_up = await harness.status(key)
        assert looked_up.lookup is Lookup.FAILED, looked_up
    assert await harness.debits() == 1


async def send_callback(harness: Harness, key: str, **extra: Any) -> int:
    """Has the simulator POST one callback for ``key`` now; the receiver's HTTP status."""
    sent = await harness.sim.control("callback", {"carrier": harness.carrier.id, "key": key,
                                                  **extra})
    return int(sent["status"])


def other_signer(carrier: CarrierConfig) -> CarrierConfig:
    """Another carrier of the same family whose callbacks we accept."""
    return next(c for c in CARRIERS if c.id != carrier.id and c.protocol == carrier.protocol
                and signs_callbacks(c))


@carriers(signs_callbacks)
async def test_forged_callbacks_are_refused(harness: Harness) -> None:
    key = harness.key()
    harness.own_operation(key)
    await harness.sim.fault(harness.carrier.id, "forged_callback", harness.msisdn)
    charged = await harness.charge(harness.charge_request(key))
    assert charged.outcome is Outcome.SUCCEEDED
    # the forged one (the opposite result, wrong key) comes first, then the true one
    assert await wait_for_pushed(harness, key, 1) == ["succeeded (late)"]
    assert await send_callback(harness, key, outcome="insufficient_funds",
                               secret=uuid.uuid4().hex) == 401
    await asyncio.sleep(0.2)
    assert pushed_results(harness, key) == ["succeeded (late)"]
    operation = harness.operation(key)
    assert operation.reported_outcome == "succeeded"
    assert operation.reported_reference == charged.carrier_reference
    assert await harness.debits() == 1


@carriers(signs_callbacks)
async def test_another_carriers_callback_for_our_key_settles_nothing(harness: Harness) -> None:
    """Validly signed by another carrier, posted to that carrier's own URL, naming this
    carrier's key: refused (403), kept nowhere on the operation."""
    other = other_signer(harness.carrier)
    key = harness.key()
    harness.own_operation(key)
    await harness.sim.fault(harness.carrier.id, "foreign_callback", harness.msisdn)
    sent = await harness.adapter.charge(harness.charge_request(key))
    assert sent.outcome is Outcome.PENDING
    assert await wait_for_pushed(harness, key, 1, other.id) == ["succeeded (refused)"]
    assert await send_callback(harness, key, outcome="insufficient_funds", sign_as=other.id,
                               to=other.id) == 403
    assert pushed_results(harness, key) == []
    operation = harness.operation(key)
    assert operation.state == OperationState.SENDING
    assert operation.reported_outcome is None and operation.reported_at is None
    # the carrier's own look-up still settles it, with the one debit
    settled = await harness.settled(sent, key)
    assert settled.outcome is Outcome.SUCCEEDED
    assert await harness.debits() == 1


@carriers(signs_callbacks)
async def test_a_signed_callback_for_a_key_we_never_sent_is_refused(harness: Harness) -> None:
    charged = await harness.charge(harness.charge_request())  # the carrier knows our URL
    assert charged.outcome is Outcome.SUCCEEDED
    key = harness.key("never-sent")
    assert await send_callback(harness, key, outcome="success") == 400
    with Session(harness.engine) as session:
        assert session.exec(select(CarrierOperation).where(
            CarrierOperation.idempotency_key == key)).first() is None


# -- balance -----------------------------------------------------------------------------------


@carriers(offers(Capability.BALANCE))
async def test_balance_where_offered(harness: Harness) -> None:
    await harness.sim.set_balance(harness.carrier.id, harness.msisdn, "12.5")
    balance = await harness.adapter.balance(harness.msisdn, harness.currency)
    assert balance.outcome is Outcome.SUCCEEDED
    assert balance.currency == harness.currency
    assert to_decimal(balance.amount_minor or 0, harness.currency) == Decimal("12.5")
