"""The one interface every carrier adapter implements, and its typed requests and results."""

from __future__ import annotations

import abc
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


class StatusRequest(BaseModel):
    """Looks up an earlier charge or refund by the idempotency key we sent with it."""

    idempotency_key: str = Field(min_length=1, max_length=128)
    msisdn: str
    operation: Literal["charge", "refund"]
    # refunds: the carrier's reference of the charge refunded (some APIs file refunds under it)
    original_carrier_reference: str | None = None


class OperationResult(BaseModel):
    outcome: Outcome
    carrier_reference: str | None = None
    carrier_code: str | None = None
    message: str = ""
    retry_after_seconds: float | None = None


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

    @abc.abstractmethod
    async def charge(self, request: ChargeRequest) -> OperationResult: ...

    async def refund(self, request: RefundRequest) -> OperationResult:
        raise UnsupportedOperation(self.carrier_id, Capability.REFUND)

    async def status(self, request: StatusRequest) -> OperationResult | None:
        """The final or pending result of the earlier operation, or None when the carrier has
        no record of it (it never took effect, so sending it again is safe)."""
        raise UnsupportedOperation(self.carrier_id, Capability.STATUS)

    async def balance(self, msisdn: str, currency: str) -> BalanceResult:
        raise UnsupportedOperation(self.carrier_id, Capability.BALANCE)

    def supports(self, capability: Capability) -> bool:
        return capability in self.capabilities

    async def aclose(self) -> None:
        return None
