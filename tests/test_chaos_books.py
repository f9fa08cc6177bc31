"""The chaos check itself (no stack): doubles, lost debits, phantoms and SMPP matching."""

from __future__ import annotations

from decimal import Decimal

from chaos.books import Debit, LedgerRow, OpRow, Snapshot, SubmissionRow, reconcile


def _op(key: str, state: str, sub: int = 1, cycle: int = 1, carrier: str = "fr-azur",
        outcome: str | None = None) -> OpRow:
    return OpRow(key, "charge", carrier, sub, cycle, 99, "EUR", state, outcome, 1, key)


def _row(key: str, ref: str, sub: int = 1, cycle: int = 1, carrier: str = "fr-azur",
         amount: int = 99) -> LedgerRow:
    return LedgerRow(key, "charge", sub, cycle, carrier, amount, "EUR", ref)


def _debit(correlator: str, ref: str, carrier: str = "fr-azur", msisdn: str = "+33600000001",
           amount: str = "0.99") -> Debit:
    return Debit(carrier, correlator, msisdn, Decimal(amount), "EUR", ref, ref)


def test_clean_books_pass() -> None:
    snap = Snapshot([_debit("k1", "r1")], [_row("k1", "r1")], [_op("k1", "settled")], [], {})
    check = reconcile(snap)
    assert (check.charges, check.double, check.lost, check.phantom, check.failed) == (
        1, 0, 0, 0, False)


def test_double_by_key_and_by_cycle() -> None:
    snap = Snapshot(
        [_debit("k1", "r1"), _debit("k1", "r2"), _debit("k2", "r3")],
        [_row("k1", "r1")],
        [_op("k1", "settled"), _op("k2", "settled", outcome="insufficient_funds")], [], {})
    check = reconcile(snap)
    # k1 twice; k2 is a second key debited for the same cycle (and lost: settled as a failure)
    assert check.double == 2
    assert check.lost == 1
    assert check.failed


def test_unsettled_and_open_debits_are_not_lost_but_phantoms_are_failures() -> None:
    snap = Snapshot(
        [_debit("k1", "r1"), _debit("k2", "r2", msisdn="+33600000002")],
        [_row("k3", "r9", cycle=3)],
        [_op("k1", "unsettled"), _op("k2", "pending", cycle=2), _op("k3", "settled", cycle=3)],
        [], {})
    check = reconcile(snap)
    assert (check.lost, check.unsettled_with_debit, check.open_with_debit) == (0, 1, 1)
    assert check.phantom == 1 and check.failed


def test_amount_mismatch_to_the_minor_unit() -> None:
    snap = Snapshot([_debit("k1", "r1", amount="0.98")], [_row("k1", "r1")],
                    [_op("k1", "settled")], [], {})
    assert reconcile(snap).mismatch == 1


def test_smpp_debits_match_by_message_id_or_by_number() -> None:
    sms = "gb-mersey"
    snap = Snapshot(
        [_debit("smpp-m1", "s1", sms), _debit("smpp-m2", "s2", sms),
         _debit("smpp-m3", "s3", sms, msisdn="+447700900123")],
        [_row("k1", "m1", carrier=sms)],
        [_op("k1", "settled", carrier=sms), _op("k2", "unsettled", cycle=2, carrier=sms),
         _op("k3", "pending", sub=2, carrier=sms)],
        [SubmissionRow(sms, "k2", "m2"), SubmissionRow(sms, "k3", None)],
        {(sms, "+447700900123"): [2]})
    check = reconcile(snap)
    assert (check.charges, check.lost, check.double) == (3, 0, 0)
    assert (check.unsettled_with_debit, check.open_with_debit) == (1, 1)


def test_scope_limits_the_check_to_some_subscriptions() -> None:
    snap = Snapshot([_debit("k1", "r1"), _debit("k2", "r2")], [_row("k1", "r1")],
                    [_op("k1", "settled"), _op("k2", "settled", sub=2, outcome="rejected")],
                    [], {})
    assert reconcile(snap, {1}).lost == 0
    assert reconcile(snap, {2}).lost == 1
