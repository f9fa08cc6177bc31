"""Look-ups have their own result, and settling trusts only what a carrier declared
(findings 1, 3 and 4 of the money-safety issue)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from activities.settlement import CarrierTerms, settle
from carriers.base import (
    Capability,
    CarrierAdapter,
    ChargeRequest,
    Lookup,
    LookupResult,
    OperationResult,
    Outcome,
    StatusRequest,
)
from carriers.camara import CamaraAdapter
from carriers.http import HttpReply, HttpTransport, discard_interaction
from carriers.oneapi import map_lookup
from carriers.reports import CarrierReport

LOOKUP = StatusRequest(idempotency_key="dev-abc-c1-a0", msisdn="+33612345678",
                       operation="charge")


class FakeCarrier(CarrierAdapter):
    """Answers look-ups from a script and counts what is sent."""

    carrier_id = "fake"
    capabilities = frozenset({Capability.CHARGE, Capability.STATUS})

    def __init__(self, *answers: LookupResult) -> None:
        self.answers = list(answers)
        self.lookups = 0

    async def charge(self, request: ChargeRequest) -> OperationResult:
        raise AssertionError("settle() never calls charge itself")

    async def status(self, request: StatusRequest) -> LookupResult:
        self.lookups += 1
        return self.answers.pop(0)


class Sends:
    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> OperationResult:
        self.count += 1
        return OperationResult(outcome=Outcome.SUCCEEDED, carrier_reference="resent")


FOUND = LookupResult.of(OperationResult(outcome=Outcome.SUCCEEDED, carrier_reference="r1"))
FAILED = LookupResult.failed("look-up refused: 401", "401")
NOT_FOUND = LookupResult.not_found()


@pytest.mark.parametrize(("terms", "answer", "outcome", "sent"), [
    # found: the carrier's record answers, whatever it promises
    (CarrierTerms(status_lookup=True, deduplicates=False), FOUND, Outcome.SUCCEEDED, 0),
    # a failed look-up is unknown, never an answer and never a reason to send
    (CarrierTerms(status_lookup=True, deduplicates=True), FAILED, Outcome.UNKNOWN, 0),
    (CarrierTerms(status_lookup=True, deduplicates=False), FAILED, Outcome.UNKNOWN, 0),
    # not found: sent again only where the carrier deduplicates our key
    (CarrierTerms(status_lookup=True, deduplicates=True), NOT_FOUND, Outcome.SUCCEEDED, 1),
    (CarrierTerms(status_lookup=True, deduplicates=False), NOT_FOUND, Outcome.UNKNOWN, 0),
])
async def test_what_a_lookup_allows(terms: CarrierTerms, answer: LookupResult,
                                    outcome: Outcome, sent: int) -> None:
    sends = Sends()
    result = await settle(FakeCarrier(answer), terms, LOOKUP, None, sends)
    assert (result.outcome, sends.count) == (outcome, sent)


@pytest.mark.parametrize(("deduplicates", "outcome", "sent"), [
    (True, Outcome.SUCCEEDED, 1),  # a repeat is answered with the first result
    (False, Outcome.UNKNOWN, 0),  # a repeat could debit again: wait for a pushed result
])
async def test_a_carrier_without_lookup_is_resent_only_if_it_deduplicates(
    deduplicates: bool, outcome: Outcome, sent: int
) -> None:
    sends = Sends()
    carrier = FakeCarrier()
    terms = CarrierTerms(status_lookup=False, deduplicates=deduplicates)
    result = await settle(carrier, terms, LOOKUP, None, sends)
    assert (result.outcome, sends.count, carrier.lookups) == (outcome, sent, 0)


async def test_a_late_settlement_never_sends() -> None:
    result = await settle(FakeCarrier(NOT_FOUND), CarrierTerms(True, True), LOOKUP, None, None)
    assert result.outcome is Outcome.UNKNOWN


@pytest.mark.parametrize(("lookup", "outcome"), [
    (FOUND, Outcome.SUCCEEDED),  # the report was wrong: the look-up found the debit
    (NOT_FOUND, Outcome.UNKNOWN),  # not confirmed: no new retry slot on its word
    (FAILED, Outcome.UNKNOWN),
])
async def test_a_reported_failure_is_confirmed_by_lookup(lookup: LookupResult,
                                                         outcome: Outcome) -> None:
    report = CarrierReport(idempotency_key=LOOKUP.idempotency_key,
                           outcome="insufficient_funds", carrier_id="fake")
    sends = Sends()
    result = await settle(FakeCarrier(lookup), CarrierTerms(True, True), LOOKUP, report, sends)
    assert (result.outcome, sends.count) == (outcome, 0)


async def test_a_reported_success_needs_no_lookup() -> None:
    report = CarrierReport(idempotency_key=LOOKUP.idempotency_key, outcome="succeeded",
                           carrier_reference="r9", carrier_id="fake")
    carrier = FakeCarrier()
    result = await settle(carrier, CarrierTerms(True, False), LOOKUP, report, None)
    assert (result.outcome, result.carrier_reference, carrier.lookups) == (
        Outcome.SUCCEEDED, "r9", 0)


@pytest.mark.parametrize(("status", "body", "lookup"), [
    (404, '{"requestError": {"serviceException": {"messageId": "SVC0004"}}}', Lookup.NOT_FOUND),
    (404, "<html>Not Found</html>", Lookup.FAILED),  # a gateway or a missing path
    (401, '{"message": "bad credentials"}', Lookup.FAILED),
    (403, "", Lookup.FAILED),
    (500, "oops", Lookup.FAILED),
    (200, '{"amountTransaction": {"transactionOperationStatus": "Processing"}}',
     Lookup.FAILED),
])
def test_oneapi_lookup_answers(status: int, body: str, lookup: Lookup) -> None:
    assert map_lookup(HttpReply(status, body, httpx.Headers()), "Charged").lookup is lookup


async def test_camara_searches_a_narrow_window_around_the_first_send() -> None:
    """Finding 3: a look-up over seven days oldest first could not reach a payment behind
    2 000 others; it now searches from just before we sent to a day after."""
    sent_at = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)
    seen: list[dict[str, str]] = []
    transport = HttpTransport(carrier_id="camara-fake", base_url="http://127.0.0.1:9",
                              auth=None, timeout_seconds=1, secrets=[],
                              sink=discard_interaction)
    adapter = CamaraAdapter(transport, "http://127.0.0.1:9/callbacks/x", "sink-secret")

    async def lookup(**request: Any) -> LookupResult:
        seen.append(request["params"])
        return LookupResult.not_found()

    transport.lookup = lookup  # type: ignore[method-assign]
    try:
        request = LOOKUP.model_copy(update={"sent_at": sent_at})
        found = await adapter.status(request)
    finally:
        await adapter.aclose()
    assert found.lookup is Lookup.NOT_FOUND
    gte = datetime.fromisoformat(seen[0]["paymentCreationDate.gte"])
    lte = datetime.fromisoformat(seen[0]["paymentCreationDate.lte"])
    assert sent_at - timedelta(hours=1) < gte < sent_at < lte <= sent_at + timedelta(days=1)
    assert seen[0]["order"] == "asc"


def test_a_lookup_promise_the_adapter_cannot_keep_stops_the_start() -> None:
    from carriers.factory import CarrierConfigError, check_promises
    from carriers.loader import default_registry

    class NoLookup(FakeCarrier):
        capabilities = frozenset({Capability.CHARGE})

    carrier = default_registry().carriers["fr-azur"]
    assert carrier.promises.status_lookup
    with pytest.raises(CarrierConfigError, match="promises a status look-up"):
        check_promises(carrier, NoLookup())


def test_smpp_cannot_promise_deduplication() -> None:
    from carriers.loader import CarrierConfig, default_registry

    smpp = default_registry().carriers["pl-wisla"].model_dump()
    smpp["promises"]["deduplicates_by_key"] = "replay"
    with pytest.raises(ValueError, match="SMPP carries no idempotency key"):
        CarrierConfig.model_validate(smpp)


@pytest.mark.parametrize(("state", "lookup"), [
    ("Charged", Lookup.FOUND),
    ("NotFound", Lookup.NOT_FOUND),
    ("Pending", Lookup.FAILED),  # a state we do not know is no answer (finding 3)
    ("Denied", Lookup.FAILED),
])
async def test_parlayx_lookup_states(state: str, lookup: Lookup) -> None:
    from carriers.parlayx import ParlayXAdapter
    from simulators.parlayx import PAYMENT_NS, envelope

    body = envelope(f'<ns0:getAmountTransactionStatusResponse xmlns:ns0="{PAYMENT_NS}">'
                    f"<ns0:result>{state}</ns0:result></ns0:getAmountTransactionStatusResponse>")

    def answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=body, headers={"Content-Type": "text/xml"})

    transport = HttpTransport(carrier_id="px-fake", base_url="http://px.invalid", auth=None,
                              timeout_seconds=1, secrets=[], sink=discard_interaction)
    transport._client = httpx.AsyncClient(base_url="http://px.invalid",
                                          transport=httpx.MockTransport(answer))
    adapter = ParlayXAdapter(transport, "wsse", "user", "secret")
    try:
        found = await adapter.status(LOOKUP)
    finally:
        await adapter.aclose()
    assert found.lookup is lookup
