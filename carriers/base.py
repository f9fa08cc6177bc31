"""The one interface every carrier adapter implements, and its typed requests and results."""

from __future__ import annotations

import abc
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    PENDING = "pending"
    # barred number, spend limit, blocked service: retrying the same request cannot help
    REJECTED = "rejected"
    # nothing happened at the carrier; safe to retry later
    TRANSIENT = "transient"
    # the carrier may or may not have acted: settle with the same idempotency key, never blindly
    UNKNOWN = "unknown"


# carrier codes that mean our credentials were refused: HTTP 401/403, a refused token or
# WS-Security header ("AUTH"), an SMSC refusing our bind
CREDENTIAL_CODES = frozenset({"401", "403", "AUTH", "ESME_RINVPASWD", "ESME_RINVSYSID"})


class Capability(StrEnum):
    CHARGE = "charge"
    REFUND = "refund"
    BALANCE = "balance"
    SEND_SMS = "send_sms"
    STATUS = "status"


class ChargeRequest(BaseModel):
    idempotency_key: str = Field(min_length=1, max_length=128)
    msisdn: str
    amount_minor: int = Field(gt=0)
    currency: str = Field(min_length=3, max_length=3)
    description: str
    reference_code: str


class RefundRequest(BaseModel):
    idempotency_key: str = Field(min_length=1, max_length=128)
    msisdn: str
    amount_minor: int = Field(gt=0)
    currency: str = Field(min_length=3, max_length=3)
    description: str
    reference_code: str
    original_carrier_reference: str
    # what the refunded charge was: less than this is a partial refund (None: unknown, whole)
    original_amount_minor: int | None = Field(default=None, gt=0)


class StatusRequest(BaseModel):
    """Looks up an earlier charge or refund by the idempotency key we sent with it."""

    idempotency_key: str = Field(min_length=1, max_length=128)
    msisdn: str
    operation: Literal["charge", "refund"]
    # refunds: the carrier's reference of the charge refunded (some APIs file refunds under it)
    original_carrier_reference: str | None = None
    # when we first and last sent it: carriers searched by date look between the two
    sent_at: datetime | None = None
    last_sent_at: datetime | None = None


class OperationResult(BaseModel):
    outcome: Outcome
    carrier_reference: str | None = None
    carrier_code: str | None = None
    message: str = ""
    retry_after_seconds: float | None = None


class Lookup(StrEnum):
    # the carrier answered with its record of the operation (final or still pending)
    FOUND = "found"
    # the carrier answered that it has no record of our key
    NOT_FOUND = "not_found"
    # no usable answer: refused (401/403, a fault, a 4xx), unreadable, unreachable, or an
    # answer we do not understand. It says nothing about the operation: it is unknown.
    FAILED = "failed"


class LookupResult(BaseModel):
    """What a status look-up found. Only ``NOT_FOUND`` may ever lead to sending again, and
    only to a carrier that has declared it deduplicates by our key."""

    lookup: Lookup
    # the operation's result as the carrier recorded it, when FOUND
    found: OperationResult | None = None
    carrier_code: str | None = None
    message: str = ""
    retry_after_seconds: float | None = None

    @classmethod
    def of(cls, result: OperationResult) -> LookupResult:
        return cls(lookup=Lookup.FOUND, found=result, carrier_code=result.carrier_code,
                   message=result.message)

    @classmethod
    def not_found(cls, message: str = "") -> LookupResult:
        return cls(lookup=Lookup.NOT_FOUND, message=message)

    @classmethod
    def failed(cls, message: str, carrier_code: str | None = None,
               retry_after_seconds: float | None = None) -> LookupResult:
        return cls(lookup=Lookup.FAILED, message=message, carrier_code=carrier_code,
                   retry_after_seconds=retry_after_seconds)

    @classmethod
    def failure_of(cls, result: OperationResult) -> LookupResult:
        """A look-up request whose own answer was an error: the error is about the look-up,
        never about the operation looked up."""
        return cls.failed(f"look-up {result.outcome.value}: {result.message}".strip(),
                          result.carrier_code, result.retry_after_seconds)


class BalanceResult(BaseModel):
    """The subscriber's spendable balance, or why it could not be had."""

    outcome: Outcome
    amount_minor: int | None = None
    currency: str | None = None
    message: str = ""


class UnsupportedOperation(Exception):
    def __init__(self, carrier_id: str, capability: Capability) -> None:
        super().__init__(f"carrier {carrier_id} does not offer {capability.value}")


class CarrierAdapter(abc.ABC):
    """Transport and auth live in the adapter's transport; request/response mapping in its module."""

    carrier_id: str
    capabilities: frozenset[Capability]
    # whether the protocol can tell us when to retry (HTTP Retry-After); SMPP cannot
    gives_retry_after: bool = True
    # whether status() asks the carrier; SMPP's answers from the receipts received so far
    status_asks_carrier: bool = True
    # whether the adapter itself refuses to send a key twice (SMPP's submission store), so a
    # repeat is answered from its own record whatever the carrier promises
    deduplicates_locally: bool = False

    @abc.abstractmethod
    async def charge(self, request: ChargeRequest) -> OperationResult: ...

    async def refund(self, request: RefundRequest) -> OperationResult:
        raise UnsupportedOperation(self.carrier_id, Capability.REFUND)

    async def status(self, request: StatusRequest) -> LookupResult:
        """The carrier's record of the earlier operation. Implementations never raise for a
        carrier's answer: anything short of a clear record or a clear "no such key" is
        ``Lookup.FAILED``."""
        raise UnsupportedOperation(self.carrier_id, Capability.STATUS)

    async def balance(self, msisdn: str, currency: str) -> BalanceResult:
        raise UnsupportedOperation(self.carrier_id, Capability.BALANCE)

    def supports(self, capability: Capability) -> bool:
        return capability in self.capabilities

    async def aclose(self) -> None:
        return None
