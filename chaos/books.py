"""The check: every debit in the carriers' own books against our ledger and operation records.

* **double**: more than one debit for one key, or debits under two keys for one subscription
  cycle (the extra ones are counted);
* **lost**: a debit with no ledger row whose operation is not listed as unsettled or still open
  (sending / pending): money taken that nobody will ever look at;
* **phantom**: a ledger charge with no debit at the carrier;
* **mismatch**: a ledger amount or currency that differs from the debit, to the minor unit.

HTTP carriers book our key as the client correlator. The SMSC books ``smpp-<message id>``: a
debit is matched through our SMPP submission record (message id -> key) or the ledger's
carrier reference; one whose message id we never learnt (submit_sm_resp lost) is matched by
number to an operation of that subscriber still open or unsettled with no debit of its own.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from carriers.base import CREDENTIAL_CODES
from models.money import from_decimal
from models.tables import (
    CarrierInteraction,
    CarrierOperation,
    LedgerEntry,
    SmppSubmission,
    Subscriber,
    Subscription,
)

OPEN = ("sending", "pending")
UNSETTLED = "unsettled"
SMPP_PREFIX = "smpp-"


@dataclass(frozen=True)
class Debit:
    carrier_id: str
    correlator: str
    msisdn: str
    amount: Decimal
    currency: str
    server_reference: str
    created_at: str = ""


@dataclass(frozen=True)
class LedgerRow:
    key: str
    kind: str
    subscription_id: int
    cycle: int
    carrier_id: str
    amount_minor: int
    currency: str
    carrier_reference: str


@dataclass(frozen=True)
class OpRow:
    key: str
    kind: str
    carrier_id: str
    subscription_id: int
    cycle: int
    amount_minor: int
    currency: str
    state: str
    outcome: str | None
    sends: int
    created_at: str = ""
    carrier_code: str | None = None


@dataclass(frozen=True)
class SubmissionRow:
    carrier_id: str
    key: str
    message_id: str | None


@dataclass
class Snapshot:
    debits: list[Debit]
    ledger: list[LedgerRow]
    operations: list[OpRow]
    submissions: list[SubmissionRow]
    # (carrier, msisdn) -> the subscriptions of that subscriber
    subscribers: dict[tuple[str, str], list[int]]


@dataclass
class Check:
    charges: int = 0  # debits at the carriers (charge kind) in scope
    ledger_charges: int = 0
    double: int = 0
    lost: int = 0
    phantom: int = 0
    mismatch: int = 0
    unsettled: int = 0  # operations listed unsettled
    unsettled_with_debit: int = 0
    open: int = 0  # operations still sending or pending
    open_with_debit: int = 0
    # cycles settled as refused because the carrier refused our credentials (they must stay
    # transient: the carrier did nothing, and rotating them back must let billing go on)
    credentials_failed: int = 0
    problems: list[str] = field(default_factory=list)
    # keys behind the problems, and the operations still open or unsettled (for the evidence)
    problem_keys: set[str] = field(default_factory=set)
    waiting: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.double or self.lost or self.phantom or self.mismatch)


def _key_of_debit(debit: Debit, by_message: dict[tuple[str, str], str],
                  ledger_by_ref: dict[tuple[str, str], LedgerRow]) -> str | None:
    if not debit.correlator.startswith(SMPP_PREFIX):
        return debit.correlator
    message_id = debit.correlator.removeprefix(SMPP_PREFIX)
    key = by_message.get((debit.carrier_id, message_id))
    if key is not None:
        return key
    row = ledger_by_ref.get((debit.carrier_id, message_id))
    return row.key if row is not None else None


def reconcile(snapshot: Snapshot, scope: set[int] | None = None) -> Check:
    """Checks the books against our records for the subscriptions in ``scope`` (all: None)."""
    check = Check()

    def in_scope(subscription_id: int | None) -> bool:
        return scope is None or (subscription_id is not None and subscription_id in scope)

    ledger = {row.key: row for row in snapshot.ledger if row.kind in ("charge", "reconciled")}
    ledger_by_ref = {(row.carrier_id, row.carrier_reference): row for row in ledger.values()}
    ops = {op.key: op for op in snapshot.operations if op.kind == "charge"}
    by_message = {(s.carrier_id, s.message_id): s.key for s in snapshot.submissions
                  if s.message_id}

    keyed: dict[str, list[Debit]] = defaultdict(list)
    unkeyed: list[Debit] = []
    for debit in snapshot.debits:
        key = _key_of_debit(debit, by_message, ledger_by_ref)
        if key is None:
            unkeyed.append(debit)
        else:
            keyed[key].append(debit)

    # debits whose message id we never learnt: the subscriber's open operations without a debit
    orphans: dict[int, list[OpRow]] = defaultdict(list)
    for waiting in sorted(ops.values(), key=lambda o: o.created_at):
        if waiting.key not in keyed and waiting.key not in ledger and (
                waiting.state in OPEN or waiting.state == UNSETTLED):
            orphans[waiting.subscription_id].append(waiting)
    for debit in sorted(unkeyed, key=lambda d: d.created_at):
        subs = snapshot.subscribers.get((debit.carrier_id, debit.msisdn), [])
        target = next((orphans[s].pop(0) for s in subs if orphans.get(s)), None)
        if target is not None:
            keyed[target.key].append(debit)
            continue
        owner = subs[0] if subs else None
        if in_scope(owner):
            check.charges += 1
            check.lost += 1
            check.problems.append(
                f"lost: {debit.carrier_id} debit {debit.server_reference} "
                f"({debit.amount} {debit.currency}, {debit.correlator}) matches no operation "
                f"of subscription {owner}")

    per_cycle: dict[tuple[int, int], list[str]] = defaultdict(list)
    for key, debits in keyed.items():
        op, row = ops.get(key), ledger.get(key)
        subscription_id = op.subscription_id if op else row.subscription_id if row else None
        if not in_scope(subscription_id):
            continue
        check.charges += len(debits)
        if len(debits) > 1:
            check.double += len(debits) - 1
            check.problem_keys.add(key)
            check.problems.append(
                f"double: key {key} debited {len(debits)} times at {debits[0].carrier_id}: "
                + ", ".join(d.server_reference for d in debits))
        cycle = op.cycle if op else row.cycle if row else None
        if subscription_id is not None and cycle is not None:
            per_cycle[(subscription_id, cycle)].append(key)
        if row is not None:
            for debit in debits[:1]:
                if debit.currency != row.currency or from_decimal(
                        debit.amount, debit.currency) != row.amount_minor:
                    check.mismatch += 1
                    check.problem_keys.add(key)
                    check.problems.append(
                        f"mismatch: {key} ledger {row.amount_minor} {row.currency}, carrier "
                        f"{debit.amount} {debit.currency}")
            continue
        if op is not None and op.state in OPEN:
            check.open_with_debit += 1
            continue
        if op is not None and op.state == UNSETTLED:
            check.unsettled_with_debit += 1
            continue
        check.lost += 1
        check.problem_keys.add(key)
        state = f"operation {op.state}/{op.outcome} sends={op.sends}" if op else "no operation"
        check.problems.append(f"lost: {debits[0].carrier_id} debited key {key} "
                              f"({debits[0].amount} {debits[0].currency}), no ledger row, "
                              f"{state}")
    for (subscription_id, cycle), keys in per_cycle.items():
        if len(keys) > 1:
            check.double += len(keys) - 1
            check.problem_keys.update(keys)
            check.problems.append(f"double: subscription {subscription_id} cycle {cycle} "
                                  f"debited under {len(keys)} keys: {', '.join(sorted(keys))}")

    for key, row in ledger.items():
        if not in_scope(row.subscription_id):
            continue
        check.ledger_charges += 1
        if key not in keyed:
            check.phantom += 1
            check.problem_keys.add(key)
            check.problems.append(f"phantom: ledger {key} ({row.amount_minor} {row.currency} "
                                  f"at {row.carrier_id}, ref {row.carrier_reference}) has no "
                                  "debit at the carrier")
    for op in ops.values():
        if not in_scope(op.subscription_id):
            continue
        if op.state == "settled" and op.outcome == "rejected" and (
                op.carrier_code or "").upper() in CREDENTIAL_CODES:
            check.credentials_failed += 1
            check.problems.append(f"credentials: {op.key} at {op.carrier_id} settled as "
                                  f"rejected ({op.carrier_code}): a cycle failed on our "
                                  "credentials")
        if op.state == UNSETTLED:
            check.unsettled += 1
        elif op.state in OPEN:
            check.open += 1
        else:
            continue
        check.waiting.append(f"{op.state}: {op.carrier_id} {op.key} sends={op.sends} "
                             f"debited={'yes' if op.key in keyed else 'no'}")
    return check


# -- reading the books and our database -----------------------------------------------------


def debits_from_books(books: dict[str, Any]) -> list[Debit]:
    return [Debit(carrier_id, str(t["clientCorrelator"]), str(t["msisdn"]),
                  Decimal(str(t["amount"])), str(t["currency"]), str(t["serverReferenceCode"]),
                  str(t.get("createdAt", "")))
            for carrier_id, book in books.items() for t in book["transactions"]
            if t["kind"] == "charge"]


async def fetch_books(sim_url: str, timeout: float = 30.0) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=sim_url, timeout=timeout) as sim:
        reply = await sim.get("/_control/books")
        reply.raise_for_status()
        books: dict[str, Any] = reply.json()
        return books


def read_records(engine: Engine) -> tuple[list[LedgerRow], list[OpRow], list[SubmissionRow],
                                          dict[tuple[str, str], list[int]]]:
    with Session(engine) as session:
        ledger = [LedgerRow(e.idempotency_key, str(e.kind.value if hasattr(e.kind, "value")
                                                   else e.kind),
                            e.subscription_id, e.cycle, e.carrier_id, e.amount_minor, e.currency,
                            e.carrier_reference)
                  for e in session.exec(select(LedgerEntry)).all()]
        ops = [OpRow(o.idempotency_key, str(o.kind.value if hasattr(o.kind, "value") else o.kind),
                     o.carrier_id, o.subscription_id, o.cycle, o.amount_minor, o.currency,
                     str(o.state.value if hasattr(o.state, "value") else o.state), o.outcome,
                     o.sends, o.created_at.isoformat(), o.carrier_code)
               for o in session.exec(select(CarrierOperation)).all()]
        submissions = [SubmissionRow(s.carrier_id, s.idempotency_key, s.message_id)
                       for s in session.exec(select(SmppSubmission)).all()]
        subscribers: dict[tuple[str, str], list[int]] = defaultdict(list)
        rows = session.exec(select(Subscriber.carrier_id, Subscriber.msisdn, Subscription.id)
                            .join(Subscription,
                                  col(Subscription.subscriber_id) == col(Subscriber.id))).all()
        for carrier_id, msisdn, subscription_id in rows:
            if subscription_id is not None:
                subscribers[(carrier_id, msisdn)].append(subscription_id)
    return ledger, ops, submissions, dict(subscribers)


def open_operations(engine: Engine, scope: Iterable[int]) -> Counter[str]:
    """Operations of these subscriptions still sending or pending, counted per carrier."""
    wanted = set(scope)
    with Session(engine) as session:
        rows = session.exec(select(CarrierOperation.carrier_id, CarrierOperation.subscription_id,
                                   CarrierOperation.state)).all()
    return Counter(carrier for carrier, sub, state in rows
                   if sub in wanted and str(getattr(state, "value", state)) in OPEN)


def evidence(engine: Engine, keys: Iterable[str]) -> list[str]:
    """Our operation record and every recorded interaction for each key, oldest first."""
    lines: list[str] = []
    with Session(engine) as session:
        for key in sorted(keys):
            lines.append(f"== {key}")
            for op in session.exec(select(CarrierOperation)
                                   .where(CarrierOperation.idempotency_key == key)).all():
                lines.append(f"operation: state={op.state} outcome={op.outcome} sends={op.sends} "
                             f"ref={op.carrier_reference} code={op.carrier_code} "
                             f"reported={op.reported_outcome} msg={op.message!r} "
                             f"unsettled_reason={op.unsettled_reason!r}")
            for i in session.exec(select(CarrierInteraction)
                                  .where(CarrierInteraction.idempotency_key == key)
                                  .order_by(col(CarrierInteraction.id))).all():
                lines.append(f"{i.created_at.isoformat()} {i.operation} {i.method} {i.url} -> "
                             f"{i.status_code} {i.outcome} err={i.error!r} "
                             f"resp={i.response_body[:200]!r}")
    return lines
