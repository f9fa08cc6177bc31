"""The simulated carrier's own books: balances and transactions per MSISDN, in major units."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal


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


@dataclass
class Account:
    balance: Decimal
    currency: str


class InsufficientFunds(Exception):
    pass


class RefundRefused(Exception):
    pass


@dataclass
class CarrierBook:
    carrier_id: str
    currency: str
    default_balance: Decimal
    accounts: dict[str, Account] = field(default_factory=dict)
    by_correlator: dict[str, Transaction] = field(default_factory=dict)
    by_reference: dict[str, Transaction] = field(default_factory=dict)
    _sequence: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def account(self, msisdn: str) -> Account:
        if msisdn not in self.accounts:
            self.accounts[msisdn] = Account(self.default_balance, self.currency)
        return self.accounts[msisdn]

    def _record(self, txn: Transaction) -> Transaction:
        self.by_correlator[txn.client_correlator] = txn
        self.by_reference[txn.server_reference] = txn
        return txn

    def _next_reference(self) -> str:
        return f"{self.carrier_id}-{next(self._sequence):08d}"

    def charge(self, msisdn: str, amount: Decimal, correlator: str, reference: str) -> Transaction:
        account = self.account(msisdn)
        if account.balance < amount:
            raise InsufficientFunds()
        account.balance -= amount
        return self._record(
            Transaction(self._next_reference(), correlator, msisdn, "charge", amount,
                        self.currency, reference)
        )

    def refund(
        self, msisdn: str, amount: Decimal, correlator: str, reference: str, original: str
    ) -> Transaction:
        charge = self.by_reference.get(original)
        if charge is None or charge.kind != "charge" or charge.msisdn != msisdn:
            raise RefundRefused("unknown original transaction")
        refunded = sum(
            (t.amount for t in self.by_reference.values()
             if t.kind == "refund" and t.original_reference == original),
            Decimal(0),
        )
        if refunded + amount > charge.amount:
            raise RefundRefused("refund exceeds the original charge")
        self.account(msisdn).balance += amount
        return self._record(
            Transaction(self._next_reference(), correlator, msisdn, "refund", amount,
                        self.currency, reference, original)
        )

    def snapshot(self) -> dict[str, object]:
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
                }
                for t in self.by_reference.values()
            ],
        }
