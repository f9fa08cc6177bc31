"""The simulated carrier's own books: balances and transactions per MSISDN, in major units.

The books always record exactly what was debited, whatever the faults: a carrier that does not
deduplicate may hold two transactions for one key, and a transaction committed "after the
reply" is in the books at once, only hidden from look-ups until `visible_at`.
With a store, every change is written (and committed) before the caller answers anybody.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from simulators.store import StateStore


@dataclass
class Transaction:
    server_reference: str
    client_correlator: str
    msisdn: str
    kind: str  # "charge" | "refund"
    amount: Decimal
    currency: str
    reference_code: str
    original_reference: str | None = None
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    # wall-clock time from which look-ups (and deduplication) see it
    visible_at: float = 0.0

    def visible(self, now: float | None = None) -> bool:
        return self.visible_at <= (time.time() if now is None else now)


class Account:
    """A balance; setting it (also from outside, e.g. the control API) is written through."""

    def __init__(self, balance: Decimal, currency: str,
                 on_change: Callable[[Account], None] | None = None) -> None:
        self._balance = balance
        self.currency = currency
        self._on_change = on_change

    @property
    def balance(self) -> Decimal:
        return self._balance

    @balance.setter
    def balance(self, value: Decimal) -> None:
        self._balance = value
        if self._on_change is not None:
            self._on_change(self)


class InsufficientFunds(Exception):
    pass


class RefundRefused(Exception):
    pass


@dataclass
class CarrierBook:
    carrier_id: str
    currency: str
    default_balance: Decimal
    store: StateStore | None = None
    accounts: dict[str, Account] = field(default_factory=dict)
    # the first transaction recorded under each key (kept for callers that read it directly)
    by_correlator: dict[str, Transaction] = field(default_factory=dict)
    by_reference: dict[str, Transaction] = field(default_factory=dict)
    _all_by_correlator: dict[str, list[Transaction]] = field(default_factory=dict)
    _sequence: int = 0

    def __post_init__(self) -> None:
        if self.store is not None:
            self._load(self.store)

    def _load(self, store: StateStore) -> None:
        for msisdn, balance in store.accounts(self.carrier_id):
            self._new_account(msisdn, Decimal(balance))
        for row in store.transactions(self.carrier_id):
            self._sequence = max(self._sequence, int(row["seq"]))
            self._index(Transaction(
                row["server_reference"], row["client_correlator"], row["msisdn"], row["kind"],
                Decimal(row["amount"]), row["currency"], row["reference_code"],
                row["original_reference"], row["created_at"], float(row["visible_at"])))

    def _new_account(self, msisdn: str, balance: Decimal) -> Account:
        account = Account(balance, self.currency, self._saver(msisdn))
        self.accounts[msisdn] = account
        return account

    def _saver(self, msisdn: str) -> Callable[[Account], None] | None:
        store = self.store
        if store is None:
            return None
        carrier_id = self.carrier_id

        def save(account: Account) -> None:
            store.save_account(carrier_id, msisdn, str(account.balance))
        return save

    def account(self, msisdn: str) -> Account:
        if msisdn not in self.accounts:
            account = self._new_account(msisdn, self.default_balance)
            account.balance = self.default_balance  # written through, so it survives a restart
        return self.accounts[msisdn]

    def find(self, correlator: str, now: float | None = None) -> Transaction | None:
        """The first transaction under this key that look-ups can see, if any."""
        now = time.time() if now is None else now
        return next((t for t in self._all_by_correlator.get(correlator, ()) if t.visible(now)),
                    None)

    def all_for(self, correlator: str) -> list[Transaction]:
        return list(self._all_by_correlator.get(correlator, ()))

    def _index(self, txn: Transaction) -> Transaction:
        self.by_correlator.setdefault(txn.client_correlator, txn)
        self._all_by_correlator.setdefault(txn.client_correlator, []).append(txn)
        self.by_reference[txn.server_reference] = txn
        return txn

    def _record(self, txn: Transaction) -> Transaction:
        if self.store is not None:
            self.store.save_transaction({
                "server_reference": txn.server_reference, "carrier_id": self.carrier_id,
                "seq": self._sequence, "client_correlator": txn.client_correlator,
                "msisdn": txn.msisdn, "kind": txn.kind, "amount": str(txn.amount),
                "currency": txn.currency, "reference_code": txn.reference_code,
                "original_reference": txn.original_reference, "created_at": txn.created_at,
                "visible_at": txn.visible_at})
        return self._index(txn)

    def _next_reference(self) -> str:
        self._sequence += 1
        return f"{self.carrier_id}-{self._sequence:08d}"

    def _atomic(self) -> AbstractContextManager[None]:
        return self.store.atomic() if self.store is not None else nullcontext()

    def charge(self, msisdn: str, amount: Decimal, correlator: str, reference: str,
               visible_at: float = 0.0) -> Transaction:
        with self._atomic():
            account = self.account(msisdn)
            if account.balance < amount:
                raise InsufficientFunds()
            account.balance -= amount
            return self._record(
                Transaction(self._next_reference(), correlator, msisdn, "charge", amount,
                            self.currency, reference, visible_at=visible_at))

    def refunded(self, original: str) -> Decimal:
        return sum((t.amount for t in self.by_reference.values()
                    if t.kind == "refund" and t.original_reference == original), Decimal(0))

    def refund(
        self, msisdn: str, amount: Decimal, correlator: str, reference: str, original: str,
        visible_at: float = 0.0,
    ) -> Transaction:
        charge = self.by_reference.get(original)
        if charge is None or charge.kind != "charge" or charge.msisdn != msisdn:
            raise RefundRefused("unknown original transaction")
        if self.refunded(original) + amount > charge.amount:
            raise RefundRefused("refund exceeds the original charge")
        with self._atomic():
            self.account(msisdn).balance += amount
            return self._record(
                Transaction(self._next_reference(), correlator, msisdn, "refund", amount,
                            self.currency, reference, original, visible_at=visible_at))

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        return {
            "currency": self.currency,
            "accounts": {m: str(a.balance) for m, a in self.accounts.items()},
            "transactions": [
                {
                    "serverReferenceCode": t.server_reference,
                    "clientCorrelator": t.client_correlator,
                    "msisdn": t.msisdn,
                    "kind": t.kind,
                    "amount": str(t.amount),
                    "currency": t.currency,
                    "referenceCode": t.reference_code,
                    "originalServerReferenceCode": t.original_reference,
                    "createdAt": t.created_at,
                    "visible": t.visible(now),
                }
                for t in self.by_reference.values()
            ],
        }
