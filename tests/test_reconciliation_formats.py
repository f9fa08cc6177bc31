"""Settlement reports: each family's CSV, as the simulator serves it from its books, reads
back to exactly the books' bookings; the comparison (pure) finds every kind of mismatch and
decides unsettled charges only on evidence."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest
from sqlalchemy.engine import Engine

from activities.reconciliation import ReconciliationActivities
from carriers.loader import default_registry
from models.money import from_decimal, to_decimal
from reconciliation.compare import (
    ItemKind,
    LedgerSide,
    OperationSide,
    Ours,
    Reconcile,
    Resolution,
    compare,
)
from reconciliation.formats import ReportFormatError, ReportRow, load_formats, parse
from settings import Settings
from tests.conftest import Simulator

REGISTRY = default_registry()
# one carrier of each family (no other test books at these on purpose)
BY_FAMILY = {"oneapi": "bh-pearl", "parlayx": "za-karoo", "camara": "jp-fuji",
             "smpp": "ng-lagoon", "polling-aggregator": "ke-kilima",
             "callback-aggregator": "ng-niger"}


@pytest.mark.parametrize(("family", "carrier_id"), sorted(BY_FAMILY.items()))
async def test_each_familys_report_reads_back_to_the_books(
    family: str, carrier_id: str, simulator: Simulator, settings: Settings,
    engine: Engine,
) -> None:
    assert REGISTRY.carriers[carrier_id].protocol == family
    currency = REGISTRY.currency_of(carrier_id)
    book = simulator.core.books[carrier_id]
    msisdn = f"+99{uuid.uuid4().int % 10**9:09d}"
    book.account(msisdn).balance = Decimal("100000")
    price = to_decimal(1250, currency)
    key = f"fmt-{uuid.uuid4().hex[:10]}"
    correlator = f"smpp-{key}" if family == "smpp" else key
    charge = book.charge(msisdn, price, correlator, f"pay-{key}")
    refund = book.refund(msisdn, to_decimal(250, currency), f"{correlator}-r", f"ref-{key}",
                         charge.server_reference)
    activities = ReconciliationActivities(engine, REGISTRY, settings.simulator_urls)
    rows, final = await activities.fetch_report(carrier_id, datetime.now(UTC).date())
    assert not final  # today's report is preliminary
    mine = [r for r in rows if r.msisdn == msisdn]
    assert [(r.kind, r.amount_minor, r.currency) for r in mine] == [
        ("charge", 1250, currency), ("refund", 250, currency)]
    for row, txn in zip(mine, (charge, refund), strict=True):
        reference = txn.reference_code if family == "camara" else txn.server_reference
        assert row.reference == reference
        if family == "smpp":
            assert (row.key, row.message_id) == (None, txn.client_correlator.removeprefix("smpp-"))
        else:
            assert row.key == txn.client_correlator
        booked = datetime.fromisoformat(txn.created_at)
        assert abs(row.booked_at - booked) < timedelta(seconds=1)
    # every booking of the day is there, none invented or dropped, to the minor unit
    expected = sorted(from_decimal(t.amount, t.currency) for t in book.by_reference.values()
                      if datetime.fromisoformat(t.created_at).date() == datetime.now(UTC).date())
    assert sorted(r.amount_minor for r in rows) == expected


async def test_a_closed_day_is_final(simulator: Simulator, settings: Settings,
                                     engine: Engine) -> None:
    activities = ReconciliationActivities(engine, REGISTRY, settings.simulator_urls)
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    assert (await activities.fetch_report("ke-kilima", yesterday))[1]
    async with httpx.AsyncClient(base_url=simulator.url) as http:
        response = await http.get("/_reports/ke-kilima/not-a-day.csv")
    assert response.status_code == 404


def test_a_report_that_does_not_read_is_refused_whole() -> None:
    formats = load_formats()
    oneapi = formats["oneapi-settlement"]
    header = ",".join(name for name, _ in oneapi.columns)
    good = "2026-01-02T03:04:05Z,r1,k1,+3361,charge,4.99,EUR"
    assert parse(oneapi, f"{header}\r\n{good}\r\n")[0].amount_minor == 499
    for bad in ("2026-01-02T03:04:05Z,r1,k1,+3361,charge,4.999,EUR",  # finer than EUR
                "2026-01-02T03:04:05Z,r1,k1,+3361,charge,-4.99,EUR",
                "2026-01-02T03:04:05Z,r1,k1,+3361,bonus,4.99,EUR",
                "2026-01-02,r1,k1,+3361,charge,4.99,EUR",
                "2026-01-02T03:04:05Z,r1,k1,+3361,charge,4.99"):
        with pytest.raises(ReportFormatError):
            parse(oneapi, f"{header}\r\n{good}\r\n{bad}\r\n")
    with pytest.raises(ReportFormatError):
        parse(oneapi, good)  # the header is missing
    parlayx = formats["parlayx-cdr"]
    assert parse(parlayx, "R;02/01/2026 03:04:05;+52;k;charge;MXN;12,50\n")[0].amount_minor \
        == 1250
    with pytest.raises(ReportFormatError):
        parse(parlayx, "R;02/01/2026 03:04:05;+52;k;charge;MXN;12.50\n")


# -- the comparison -----------------------------------------------------------------------

NOW = datetime(2026, 3, 4, 12, tzinfo=UTC)


def row(key: str | None, amount: int, reference: str = "", msisdn: str = "+441",
        kind: str = "charge") -> ReportRow:
    return ReportRow(NOW, reference or f"ref-{key}", msisdn, kind, amount, "GBP", key=key)


def op(key: str, state: str = "settled", msisdn: str = "+441", amount: int = 500,
       reported: str | None = None) -> OperationSide:
    return OperationSide(key, "charge", state, "succeeded" if state == "settled" else None,
                         amount, "GBP", msisdn, reported)


def entry(key: str, amount: int = 500, kind: str = "charge") -> LedgerSide:
    return LedgerSide(key, kind, amount, "GBP", f"ref-{key}")


def test_a_clean_day_has_no_mismatch() -> None:
    ours = Ours({"a": entry("a"), "b": entry("b", kind="reconciled")},
                {"a": op("a"), "b": op("b")}, sent_that_day=frozenset({"a", "b"}))
    found = compare([row("a", 500), row("b", 500)], True, ours)
    assert (found.items, found.reconcile, found.close) == ([], [], [])


def test_missing_extra_and_amount_differs_are_each_reported() -> None:
    ours = Ours({"a": entry("a"), "b": entry("b", 500), "c": entry("c")},
                {k: op(k) for k in "abc"}, sent_that_day=frozenset({"a", "b", "c"}))
    report = [row("a", 500), row("b", 450), row("zz", 300, "ref-unknown"),
              row("a", 500, "ref-again")]
    found = compare(report, True, ours)
    kinds = sorted((i.kind.value, i.match_key, i.resolution) for i in found.items)
    assert kinds == [("amount_differs", "b", None), ("extra", "c", None),
                     ("missing", "ref:ref-again", None), ("missing", "ref:ref-unknown", None)]
    differs = next(i for i in found.items if i.kind is ItemKind.AMOUNT_DIFFERS)
    assert (differs.ledger_amount_minor, differs.report_amount_minor) == (500, 450)
    assert (found.reconcile, found.close) == ([], [])
    # a preliminary report may still grow: nothing is extra yet
    assert all(i.kind is not ItemKind.EXTRA for i in compare(report, False, ours).items)


def test_a_request_booked_after_midnight_is_found_in_the_next_days_report() -> None:
    ours = Ours({"late": entry("late")}, {"late": op("late"), "u": op("u", "unsettled")},
                sent_that_day=frozenset({"late", "u"}))
    found = compare([], True, ours, next_day=[row("late", 500), row("u", 500)])
    assert (found.items, found.close, found.reconcile) == ([], [], [])


def test_unsettled_charges_are_decided_only_on_evidence() -> None:
    ours = Ours({}, {"debited": op("debited", "unsettled", amount=500),
                     "never": op("never", "unsettled", "+442"),
                     "pushed": op("pushed", "unsettled", "+443", reported="succeeded"),
                     "same-number": op("same-number", "unsettled", "+444")},
                sent_that_day=frozenset({"debited", "never", "pushed", "same-number"}))
    report = [row("debited", 400, "R1"), row(None, 500, "R9", msisdn="+444")]
    found = compare(report, True, ours)
    assert found.reconcile == [Reconcile("debited", 400, "GBP", "R1")]
    assert found.close == ["never"]
    decided = {i.match_key: (i.kind, i.resolution) for i in found.items}
    assert decided["debited"] == (ItemKind.MISSING, Resolution.RECONCILED)
    assert decided["never"] == (ItemKind.UNSETTLED, Resolution.NOT_CHARGED)
    assert decided["pushed"] == (ItemKind.UNSETTLED, None)
    assert decided["same-number"] == (ItemKind.UNSETTLED, None)
    assert decided["ref:R9"] == (ItemKind.MISSING, None)
    # on a preliminary report a debit is still taken, an absence proves nothing
    preliminary = compare(report, False, ours)
    assert preliminary.reconcile == found.reconcile and preliminary.close == []


def test_smpp_bookings_match_through_message_ids_and_references() -> None:
    ours = Ours({"k1": LedgerSide("k1", "charge", 150, "GBP", "MID1")},
                {"k1": op("k1", amount=150), "k2": op("k2", "unsettled", amount=150)},
                by_message_id={"MID2": "k2"}, sent_that_day=frozenset({"k1", "k2"}))
    rows = [ReportRow(NOW, "T1", "+441", "charge", 150, "GBP", message_id="MID1"),
            ReportRow(NOW, "T2", "+441", "charge", 150, "GBP", message_id="MID2")]
    found = compare(rows, True, ours)
    assert found.reconcile == [Reconcile("k2", 150, "GBP", "MID2")]
    assert [i.resolution for i in found.items] == [Resolution.RECONCILED]
