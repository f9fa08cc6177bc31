"""The comparison itself, pure: one carrier's report for one day against our ledger and
operations, giving every mismatch and the decisions for the operations left unsettled.

Mismatches:

* **missing**: in the carrier's report, not in our ledger (a debit we never recorded);
* **extra**: in our ledger (an operation last sent that day), not in the report (only
  checked when the report is final; the next day's report is searched too, for a request
  sent just before midnight and booked just after);
* **amount_differs**: both have it, the amounts or currencies differ.

Rows are matched by our key (the client correlator), else the SMSC's message id through our
SMPP submissions, else the carrier's reference in our ledger. Each report row is money: a
second row for one key is a second debit, reported as missing, never folded into the first.

Decisions, for charges left UNSETTLED (refunds are only reported, never decided):

* the report shows the debit: **reconcile** it, a ledger entry of kind ``reconciled`` with the
  report's amount, currency and reference, under the operation's own key;
* the report is final and shows no debit for it that day (nor the next day so far), the
  carrier pushed no success for it, and no unmatched booking of the same number is in the
  report: **close** it as not charged;
* otherwise it stays unsettled, listed with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from reconciliation.formats import ReportRow


class ItemKind(StrEnum):
    MISSING = "missing"
    EXTRA = "extra"
    AMOUNT_DIFFERS = "amount_differs"
    # not a mismatch: an unsettled charge of that day, and what was decided for it
    UNSETTLED = "unsettled"


MISMATCH_KINDS = frozenset({ItemKind.MISSING, ItemKind.EXTRA, ItemKind.AMOUNT_DIFFERS})


class Resolution(StrEnum):
    RECONCILED = "reconciled"
    NOT_CHARGED = "not_charged"


@dataclass(frozen=True)
class LedgerSide:
    key: str
    kind: str
    amount_minor: int
    currency: str
    carrier_reference: str


@dataclass(frozen=True)
class OperationSide:
    key: str
    kind: str  # charge | refund
    state: str
    outcome: str | None
    amount_minor: int
    currency: str
    msisdn: str
    reported_outcome: str | None = None


@dataclass(frozen=True)
class Ours:
    """What we hold that the report may concern: ledger rows and operations by key (those the
    report names and those last sent that day), SMPP message ids, and the keys sent that day."""

    ledger: dict[str, LedgerSide]
    operations: dict[str, OperationSide]
    by_message_id: dict[str, str] = field(default_factory=dict)
    sent_that_day: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Item:
    kind: ItemKind
    # what identifies it within the day: our key, else "ref:<carrier reference>"
    match_key: str
    idempotency_key: str | None
    carrier_reference: str | None
    ledger_amount_minor: int | None
    report_amount_minor: int | None
    currency: str
    detail: str
    resolution: Resolution | None = None


@dataclass(frozen=True)
class Reconcile:
    key: str
    amount_minor: int
    currency: str
    carrier_reference: str


@dataclass
class Comparison:
    items: list[Item] = field(default_factory=list)
    reconcile: list[Reconcile] = field(default_factory=list)
    close: list[str] = field(default_factory=list)


def _digits(msisdn: str) -> str:
    return "".join(c for c in msisdn if c.isdigit()).lstrip("0")


def _book_kind(kind: str) -> str:
    return "charge" if kind == "reconciled" else kind


class _Matcher:
    def __init__(self, ours: Ours) -> None:
        self.ours = ours
        self.by_reference = {row.carrier_reference: row.key for row in ours.ledger.values()}

    def key_of(self, row: ReportRow) -> str | None:
        known = self.ours.ledger.keys() | self.ours.operations.keys()
        if row.key and row.key in known:
            return row.key
        if row.message_id and row.message_id in self.ours.by_message_id:
            return self.ours.by_message_id[row.message_id]
        for reference in (row.reference, row.message_id):
            if reference and reference in self.by_reference:
                return self.by_reference[reference]
        return None


def _missing(row: ReportRow, key: str | None, detail: str,
             resolution: Resolution | None = None) -> Item:
    return Item(ItemKind.MISSING, key if key else f"ref:{row.reference}", key, row.reference,
                None, row.amount_minor, row.currency, detail, resolution)


def _unmatched_row(row: ReportRow, key: str | None, ours: Ours, out: Comparison) -> None:
    """A report row whose key has no ledger row: decide or report it."""
    op = ours.operations.get(key) if key else None
    if op is None:
        name = row.key or row.message_id or row.reference
        out.items.append(_missing(row, key, f"{row.kind} {name}: none of our operations"))
        return
    if op.kind != row.kind:
        out.items.append(_missing(row, key, f"the carrier booked a {row.kind}, our operation "
                                  f"is a {op.kind}"))
    elif op.state == "unsettled" and op.kind == "charge" and op.currency == row.currency:
        # the reference our adapters record: the SMSC's message id, else the carrier's own
        out.reconcile.append(Reconcile(op.key, row.amount_minor, row.currency,
                                       row.message_id or row.reference))
        note = "" if op.amount_minor == row.amount_minor else (
            f" (the carrier took {row.amount_minor}, we asked {op.amount_minor})")
        out.items.append(_missing(row, key, f"unsettled charge the carrier debited: "
                                  f"reconciled{note}", Resolution.RECONCILED))
        if row.amount_minor > op.amount_minor:
            # booked as taken (it was), and shown: the carrier took more than we asked
            out.items.append(Item(ItemKind.AMOUNT_DIFFERS, key or f"ref:{row.reference}", key,
                                  row.reference, op.amount_minor, row.amount_minor,
                                  row.currency, f"the carrier took {row.amount_minor}, we asked "
                                  f"{op.amount_minor}: for an operator"))
    elif op.state == "unsettled":
        out.items.append(_missing(row, key, f"unsettled {op.kind} in {op.currency}, booked in "
                                  f"{row.currency}: for an operator"))
    elif op.state == "settled":
        out.items.append(_missing(row, key, f"our operation is settled as {op.outcome}"))
    else:
        out.items.append(_missing(row, key, f"our operation is still {op.state}: its workflow "
                                  "is settling it"))


def compare(rows: Iterable[ReportRow], final: bool, ours: Ours,
            next_day: Iterable[ReportRow] = ()) -> Comparison:
    """Compares one day's report (``final`` or preliminary) with ``ours``; ``next_day`` is the
    following day's report so far (evidence only: it decides nothing on its own)."""
    out = Comparison()
    matcher = _Matcher(ours)
    matched: set[str] = set()
    unmatched_numbers: set[str] = set()
    for row in rows:
        key = matcher.key_of(row)
        if key is None:
            unmatched_numbers.add(_digits(row.msisdn))
            _unmatched_row(row, None, ours, out)
            continue
        if key in matched:
            out.items.append(Item(ItemKind.MISSING, f"ref:{row.reference}", key, row.reference,
                                  None, row.amount_minor, row.currency,
                                  "a second booking under one key"))
            continue
        matched.add(key)
        entry = ours.ledger.get(key)
        if entry is None:
            _unmatched_row(row, key, ours, out)
        elif (entry.amount_minor, entry.currency, _book_kind(entry.kind)) != (
                row.amount_minor, row.currency, row.kind):
            out.items.append(Item(ItemKind.AMOUNT_DIFFERS, key, key, row.reference,
                                  entry.amount_minor, row.amount_minor, row.currency,
                                  f"ledger {entry.kind} {entry.amount_minor} {entry.currency}, "
                                  f"carrier {row.kind} {row.amount_minor} {row.currency}"))
    later: set[str] = set()
    for row in next_day:
        key = matcher.key_of(row)
        if key is None:
            unmatched_numbers.add(_digits(row.msisdn))
        else:
            later.add(key)
    for key in sorted(ours.sent_that_day):
        entry, op = ours.ledger.get(key), ours.operations.get(key)
        if key in matched or key in later:
            continue
        if entry is not None:
            if final:
                out.items.append(Item(ItemKind.EXTRA, key, key, entry.carrier_reference,
                                      entry.amount_minor, None, entry.currency,
                                      f"ledger {entry.kind} not in the carrier's report"))
            continue
        if op is not None and op.state == "unsettled" and op.kind == "refund" and final:
            # a refund is never decided here; one the final report lacks is for an operator
            out.items.append(Item(ItemKind.UNSETTLED, key, key, None, op.amount_minor, None,
                                  op.currency, "unsettled refund not in the carrier's final "
                                  "report: for an operator"))
            continue
        if op is None or op.state != "unsettled" or op.kind != "charge":
            continue
        reason = None
        if not final:
            reason = "the report is preliminary"
        elif op.reported_outcome == "succeeded":
            reason = "the carrier pushed a success the report does not show"
        elif _digits(op.msisdn) in unmatched_numbers:
            reason = "the report holds a booking of this number we cannot match"
        if reason is None:
            out.close.append(key)
        out.items.append(Item(
            ItemKind.UNSETTLED, key, key, None, None, None, op.currency,
            reason or "not in the carrier's final report: closed as not charged",
            None if reason else Resolution.NOT_CHARGED))
    return out
