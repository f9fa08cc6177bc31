"""SMPP settlement against the real SMSC simulator over sockets: query_sm, receipts redelivered
after a dying session, submissions stuck in "sending", monotonic store transitions, and no
MSISDN in what aiosmpplib logs."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiosmpplib import PhoneNumber, SubmitSm
from sqlalchemy.engine import Engine

from carriers.base import ChargeRequest, Lookup, LookupResult, Outcome, StatusRequest
from carriers.factory import build_adapter
from carriers.http import InteractionRecord
from carriers.loader import CarrierConfig, default_registry
from carriers.numbers import sample_msisdn
from carriers.reports import CarrierReport
from carriers.smpp import QuerySm, QuerySmResp, SmppAdapter
from models.smpp_store import SubmissionStore
from models.tables import SmppSubmission
from settings import Settings
from tests.conftest import Simulator

REGISTRY = default_registry()
# one carrier per receipt wording: appendix B (gb-mersey) and key=value (bh-dilmun)
CARRIER = REGISTRY.carriers["gb-mersey"]
KV_CARRIER = REGISTRY.carriers["bh-dilmun"]
_rng = random.Random(3434)
_taken: set[str] = set()


class Collected:
    """What an adapter reported: interaction records and relayed receipts."""

    def __init__(self) -> None:
        self.records: list[InteractionRecord] = []
        self.reports: list[CarrierReport] = []

    async def record(self, record: InteractionRecord) -> None:
        self.records.append(record)

    async def relay(self, report: CarrierReport, record: InteractionRecord) -> str:
        self.reports.append(report)
        self.records.append(record)
        return "relayed"


AdapterFactory = Callable[..., SmppAdapter]


@pytest.fixture
async def make_adapter(settings: Settings, engine: Engine,
                       simulator: Simulator) -> AsyncIterator[AdapterFactory]:
    made: list[SmppAdapter] = []

    def make(carrier: CarrierConfig = CARRIER, store: SubmissionStore | None = None,
             collected: Collected | None = None) -> SmppAdapter:
        collected = collected or Collected()
        adapter = build_adapter(carrier, settings, collected.record,
                                smpp_store=store or SubmissionStore(engine),
                                receipts=collected.relay)
        assert isinstance(adapter, SmppAdapter)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        await adapter.aclose()


async def prepared(simulator: Simulator, carrier: CarrierConfig = CARRIER,
                   balance: str = "1000") -> tuple[str, ChargeRequest]:
    msisdn = sample_msisdn(carrier, REGISTRY, _rng, _taken)
    await simulator.set_balance(carrier.id, msisdn, balance)
    price = carrier.price_points[0]
    request = ChargeRequest(idempotency_key=f"smpp-{uuid.uuid4().hex[:12]}", msisdn=msisdn,
                            amount_minor=REGISTRY.amount_minor(carrier.id, price),
                            currency=REGISTRY.currency_of(carrier.id), description="test",
                            reference_code="T")
    return msisdn, request


def lookup_of(request: ChargeRequest) -> StatusRequest:
    return StatusRequest(idempotency_key=request.idempotency_key, msisdn=request.msisdn,
                         operation="charge")


async def debits(simulator: Simulator, carrier: CarrierConfig, msisdn: str) -> int:
    return sum(1 for t in await simulator.transactions(carrier.id, msisdn) if t["kind"] == "charge")


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 6.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition never met"
        await asyncio.sleep(0.05)


# -- 1. query_sm settles what no receipt did --------------------------------------------------------

def test_query_sm_pdus_round_trip() -> None:
    """The adapter's PDUs against the simulator's own encoding, written separately."""
    from aiosmpplib import SmppCommandStatus

    from simulators.smsc import parse_query_sm, query_sm_resp
    pdu = QuerySm(message_id="abc123", source="84422", sequence_num=7).pdu()
    assert pdu[4:8] == b"\x00\x00\x00\x03" and parse_query_sm(pdu) == ("abc123", "84422")
    answer = QuerySmResp.read(query_sm_resp(7, SmppCommandStatus.ESME_ROK, "abc123",
                                            "260101120000000+", 5, 88))
    assert (answer.sequence_num, answer.message_id, answer.message_state, answer.error_code) == (
        7, "abc123", 5, 88)
    failed = QuerySmResp.read(query_sm_resp(8, SmppCommandStatus.ESME_RQUERYFAIL))
    assert failed.command_status is SmppCommandStatus.ESME_RQUERYFAIL
    assert failed.message_state is None


@pytest.mark.parametrize(("carrier", "balance", "outcome"), [
    (CARRIER, "1000", Outcome.SUCCEEDED),
    (KV_CARRIER, "1000", Outcome.SUCCEEDED),
    (CARRIER, "0", Outcome.INSUFFICIENT_FUNDS),
], ids=["delivered", "delivered-kv", "insufficient-funds"])
async def test_query_sm_settles_a_charge_whose_receipt_never_came(
    make_adapter: AdapterFactory, simulator: Simulator, engine: Engine,
    carrier: CarrierConfig, balance: str, outcome: Outcome,
) -> None:
    msisdn, request = await prepared(simulator, carrier, balance)
    collected = Collected()
    adapter = make_adapter(carrier, collected=collected)
    await simulator.fault(carrier.id, "no_callback", msisdn)
    first = await adapter.charge(request)
    assert first.outcome is Outcome.PENDING and first.carrier_reference

    async def settled() -> bool:
        looked_up = await adapter.status(lookup_of(request))
        assert looked_up.lookup is Lookup.FOUND and looked_up.found is not None
        return looked_up.found.outcome is outcome

    await eventually(settled)
    assert collected.reports == []  # no receipt: query_sm did it
    assert any(r.method == "query_sm" for r in collected.records)
    row = await SubmissionStore(engine).get(carrier.id, request.idempotency_key)
    assert row is not None and row.state == ("delivered" if outcome is Outcome.SUCCEEDED
                                             else "failed")
    assert await debits(simulator, carrier, msisdn) == (1 if outcome is Outcome.SUCCEEDED else 0)


async def test_query_sm_errors_are_failed_unless_the_id_is_unknown(
    make_adapter: AdapterFactory, simulator: Simulator, engine: Engine,
) -> None:
    msisdn, request = await prepared(simulator)
    adapter = make_adapter()
    taken = await adapter.charge(request)
    assert taken.carrier_reference
    epoch = taken.carrier_reference[:8]  # the simulator's ids start with its run's epoch
    store = SubmissionStore(engine)
    lookups: dict[str, LookupResult] = {}
    for name, message_id in [("unknown", epoch + "00ff00ff00ff"),
                             ("before-restart", "0000000000ff00ff00ff")]:
        key = f"smpp-{uuid.uuid4().hex[:12]}"
        await store.reserve(CARRIER.id, key, msisdn)
        await store.submitted(CARRIER.id, key, message_id)
        lookups[name] = await adapter.status(StatusRequest(idempotency_key=key, msisdn=msisdn,
                                                           operation="charge"))
    assert lookups["unknown"].lookup is Lookup.NOT_FOUND
    assert lookups["before-restart"].lookup is Lookup.FAILED
    assert lookups["before-restart"].carrier_code == "ESME_RQUERYFAIL"
    never = await adapter.status(StatusRequest(idempotency_key="never-sent", msisdn=msisdn,
                                               operation="charge"))
    assert never.lookup is Lookup.NOT_FOUND


# -- 2. a receipt the dying worker never acknowledged comes again -------------------------------------

class StalledStore(SubmissionStore):
    """A worker that takes the receipt for one number and dies before storing it: matching
    it never returns. (Receipts left over from other tests go through.)"""

    def __init__(self, engine: Engine, msisdn: str) -> None:
        super().__init__(engine)
        self.msisdn = msisdn
        self.entered = asyncio.Event()

    async def match_receipt(self, carrier_id: str, message_id: str | None,
                            user_reference: int | None, msisdn: str) -> SmppSubmission | None:
        if msisdn != self.msisdn:
            return await super().match_receipt(carrier_id, message_id, user_reference, msisdn)
        self.entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_receipt_unacknowledged_by_a_dying_session_is_redelivered_on_rebind(
    make_adapter: AdapterFactory, simulator: Simulator, engine: Engine,
) -> None:
    msisdn, request = await prepared(simulator)
    stalled = StalledStore(engine, msisdn)
    dying = make_adapter(store=stalled)
    assert (await dying.charge(request)).outcome is Outcome.PENDING
    await asyncio.wait_for(stalled.entered.wait(), 5)  # the receipt reached the worker...
    await dying.aclose()  # ...which died before storing (and so before acknowledging) it
    store = SubmissionStore(engine)
    row = await store.get(CARRIER.id, request.idempotency_key)
    assert row is not None and row.state == "submitted"

    collected = Collected()
    restarted = make_adapter(collected=collected)
    restarted.start()  # the new worker binds: the SMSC delivers what was never acknowledged

    async def delivered() -> bool:
        now = await store.get(CARRIER.id, request.idempotency_key)
        return now is not None and now.state == "delivered"

    await eventually(delivered)
    assert [(r.idempotency_key, r.outcome) for r in collected.reports] == [
        (request.idempotency_key, "succeeded")]
    looked_up = await restarted.status(lookup_of(request))
    assert looked_up.found is not None and looked_up.found.outcome is Outcome.SUCCEEDED
    assert await debits(simulator, CARRIER, msisdn) == 1


# -- 3. "sending": never resent, unknown until a receipt or a message id settles it -----------------

async def test_a_sending_row_is_never_resent_and_its_lookup_is_failed(
    make_adapter: AdapterFactory, simulator: Simulator, engine: Engine,
) -> None:
    msisdn, request = await prepared(simulator)
    store = SubmissionStore(engine)
    # a worker reserved the row and died before (or after) its submit_sm: nobody knows which
    _, may_send = await store.reserve(CARRIER.id, request.idempotency_key, msisdn)
    assert may_send
    collected = Collected()
    adapter = make_adapter(collected=collected)
    again = await adapter.charge(request)
    assert again.outcome is Outcome.UNKNOWN
    looked_up = await adapter.status(lookup_of(request))
    assert looked_up.lookup is Lookup.FAILED and looked_up.found is None
    assert collected.records == []  # not a single PDU sent
    assert await debits(simulator, CARRIER, msisdn) == 0
    row = await store.get(CARRIER.id, request.idempotency_key)
    assert row is not None and row.state == "sending"


async def test_a_late_submit_sm_resp_is_kept_and_never_undoes_the_receipt(
    make_adapter: AdapterFactory, simulator: Simulator, engine: Engine,
) -> None:
    msisdn, request = await prepared(simulator)
    adapter = make_adapter()
    # the SMSC debits, the receipt comes at once, the submit_sm_resp only after our timeout
    await simulator.fault(CARRIER.id, "timeout_after_debit", msisdn, delay_seconds=1.6)
    lost = await adapter.charge(request)
    assert lost.outcome is Outcome.UNKNOWN
    store = SubmissionStore(engine)

    async def answered_late() -> bool:
        row = await store.get(CARRIER.id, request.idempotency_key)
        return row is not None and row.message_id is not None and row.state == "delivered"

    await eventually(answered_late)  # matched by user_message_reference, then the id is kept
    looked_up = await adapter.status(lookup_of(request))
    assert looked_up.found is not None and looked_up.found.outcome is Outcome.SUCCEEDED
    assert (await adapter.charge(request)).outcome is Outcome.SUCCEEDED  # and never resent
    assert await debits(simulator, CARRIER, msisdn) == 1


# -- 4. monotonic transitions ---------------------------------------------------------------------

async def test_submitted_after_a_receipt_never_undoes_it(engine: Engine) -> None:
    store = SubmissionStore(engine)
    key = f"smpp-{uuid.uuid4().hex[:12]}"
    row, _ = await store.reserve(CARRIER.id, key, "+447100000001")
    assert row.id is not None
    # the bad order: the receipt is stored first, the submit_sm_resp's write comes after
    await store.settled(row.id, True, "m-1", "DELIVRD", "000")
    after = await store.submitted(CARRIER.id, key, "m-1")
    assert after is not None and after.state == "delivered" and after.message_id == "m-1"
    assert (await store.refused(row.id)).state == "delivered"
    # a second, different final answer changes nothing either
    assert (await store.settled(row.id, False, "m-1", "UNDELIV", "001")).receipt_status == "DELIVRD"


def test_a_racing_receipt_and_submit_sm_resp_always_end_delivered(engine: Engine) -> None:
    store = SubmissionStore(engine)
    rows = []
    for _ in range(30):
        row, _ = store._reserve(CARRIER.id, f"smpp-{uuid.uuid4().hex[:12]}", "+447100000002")
        rows.append(row)
    for row in rows:
        assert row.id is not None
        gate = threading.Barrier(2)
        row_id, key = row.id, row.idempotency_key

        def receipt(row_id: int = row_id, gate: threading.Barrier = gate) -> None:
            gate.wait()
            store._settled(row_id, True, "m-r", "DELIVRD", "000")

        def answer(key: str = key, gate: threading.Barrier = gate) -> None:
            gate.wait()
            store._submitted(CARRIER.id, key, "m-r")

        threads = [threading.Thread(target=receipt), threading.Thread(target=answer)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        final = store._get(CARRIER.id, key)
        assert final is not None and final.state == "delivered" and final.message_id == "m-r"


# -- 5. aiosmpplib never logs a number -----------------------------------------------------------

async def test_aiosmpplib_logs_carry_no_msisdn(
    make_adapter: AdapterFactory, simulator: Simulator, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    msisdn, request = await prepared(simulator)
    digits = msisdn.lstrip("+")
    adapter = make_adapter()
    caplog.set_level(logging.DEBUG)
    assert (await adapter.charge(request)).outcome is Outcome.PENDING
    library = adapter._esme._logger
    # what aiosmpplib logs when a PDU cannot be sent or read (esme.py), numbers and all
    submit = SubmitSm(short_message="x", source=PhoneNumber("84422"),
                      destination=PhoneNumber(digits), log_id="k")
    try:
        raise ValueError(f"bad destination {digits}")
    except ValueError:
        library.exception("SMPP message could not be sent", message=submit)
    library.error("Unable to parse PDU", smpp_command="DELIVER_SM", pdu=digits.encode().hex())
    library.warning("Could not get receipted message ID from delivery receipt",
                    receipt={"text": f"to {digits}"}, sequence_num=9)
    library.error(f"Connection lost sending to {digits}")
    await adapter.aclose()

    forwarded = [r for r in caplog.records if r.name == "carriers.smpp.aiosmpplib"]
    assert {"SMPP message could not be sent", "Unable to parse PDU",
            "Could not get receipted message ID from delivery receipt"} <= {
        r.getMessage().split(" {")[0].split(" (")[0] for r in forwarded}
    # the library's loggers sit outside the logging tree: ours is their only way out
    assert all(type(h).__name__ == "_RedactingHandler" for h in library.handlers)
    assert not any(name.startswith(("aiosmpplib", "esme"))
                   for name in logging.Logger.manager.loggerDict)
    captured = capfd.readouterr()
    everything = "\n".join([r.getMessage() for r in caplog.records]
                           + [str(r.args) for r in caplog.records]
                           + [captured.out, captured.err, caplog.text])
    assert digits not in everything
    assert digits.encode().hex() not in everything
    assert digits[2:9] not in everything  # not even a long part of it


class FlakyRelay(Collected):
    """A relay that cannot hand the first receipt on (Temporal out of reach), then can."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    async def relay(self, report: CarrierReport, record: InteractionRecord) -> str:
        if self.failures == 0:
            self.failures += 1
            raise ConnectionRefusedError("temporal unreachable")
        return await super().relay(report, record)


async def test_a_receipt_the_relay_could_not_take_is_delivered_again(
    make_adapter: AdapterFactory, simulator: Simulator, engine: Engine,
) -> None:
    msisdn, request = await prepared(simulator, KV_CARRIER)
    relay = FlakyRelay()
    adapter = make_adapter(KV_CARRIER, collected=relay)
    assert (await adapter.charge(request)).outcome is Outcome.PENDING

    async def relayed() -> bool:
        return any(r.idempotency_key == request.idempotency_key for r in relay.reports)

    # the session drops without acknowledging it, the adapter binds again, the SMSC resends
    await eventually(relayed, 10)
    assert relay.failures == 1
    row = await SubmissionStore(engine).get(KV_CARRIER.id, request.idempotency_key)
    assert row is not None and row.state == "delivered"
    assert await debits(simulator, KV_CARRIER, msisdn) == 1
