"""Aggregator with polling (in the style of DOCOMO Digital / Boku): HMAC-signed JSON requests,
answered 202 with a transaction id; the result is fetched later with GET until it is final.

POST {base}/charges, GET {base}/charges/{id}, GET {base}/charges?merchant_tx_id=KEY,
and the same under /refunds.
"""

from __future__ import annotations

import json
from typing import Any

from carriers.base import (
    Capability,
    CarrierAdapter,
    ChargeRequest,
    OperationResult,
    Outcome,
    RefundRequest,
    StatusRequest,
)
from carriers.http import HttpReply, HttpTransport
from models.money import format_major

_REASONS = {
    "INSUFFICIENT_FUNDS": Outcome.INSUFFICIENT_FUNDS,
    "ACCOUNT_BARRED": Outcome.REJECTED,
    "SPEND_LIMIT": Outcome.REJECTED,
    "REFUND_REFUSED": Outcome.REJECTED,
    "SERVICE_BLOCKED": Outcome.REJECTED,
}


def map_status(reply: HttpReply) -> OperationResult:
    if reply.status_code in (429, 503):
        retry_after = reply.headers.get("Retry-After")
        return OperationResult(outcome=Outcome.TRANSIENT, carrier_code=str(reply.status_code),
                               message="aggregator busy",
                               retry_after_seconds=float(retry_after) if retry_after else None)
    if reply.status_code in (401, 403):
        return OperationResult(outcome=Outcome.REJECTED, carrier_code=str(reply.status_code),
                               message="signature or key refused")
    try:
        body: Any = json.loads(reply.text)
    except json.JSONDecodeError:
        body = None
    if not isinstance(body, dict) or reply.status_code not in (200, 201, 202):
        return OperationResult(outcome=Outcome.UNKNOWN, carrier_code=str(reply.status_code),
                               message=f"malformed response (HTTP {reply.status_code})")
    status, reference = body.get("status"), body.get("transaction_id")
    if status == "success" and reference:
        return OperationResult(outcome=Outcome.SUCCEEDED, carrier_reference=str(reference))
    if status == "pending" and reference:
        return OperationResult(outcome=Outcome.PENDING, carrier_reference=str(reference))
    if status == "failed":
        reason = str(body.get("reason_code", ""))
        return OperationResult(outcome=_REASONS.get(reason, Outcome.REJECTED),
                               carrier_code=reason, message=str(body.get("message", "")))
    return OperationResult(outcome=Outcome.UNKNOWN, message=f"status {status!r}")


def map_lookup(reply: HttpReply) -> OperationResult | None:
    return None if reply.status_code == 404 else map_status(reply)


class PollingAggregatorAdapter(CarrierAdapter):
    capabilities = frozenset({Capability.CHARGE, Capability.REFUND, Capability.STATUS})

    def __init__(self, transport: HttpTransport) -> None:
        self.carrier_id = transport.carrier_id
        self._transport = transport

    async def charge(self, request: ChargeRequest) -> OperationResult:
        body = {"merchant_tx_id": request.idempotency_key, "msisdn": request.msisdn,
                "amount": format_major(request.amount_minor, request.currency),
                "currency": request.currency, "description": request.description}
        return await self._transport.send(operation="charge", idempotency_key=request.idempotency_key,
                                          method="POST", path="/charges", json=body,
                                          mapper=map_status)

    async def refund(self, request: RefundRequest) -> OperationResult:
        body = {"merchant_tx_id": request.idempotency_key,
                "charge_transaction_id": request.original_carrier_reference,
                "amount": format_major(request.amount_minor, request.currency),
                "currency": request.currency}
        return await self._transport.send(operation="refund", idempotency_key=request.idempotency_key,
                                          method="POST", path="/refunds", json=body,
                                          mapper=map_status)

    async def status(self, request: StatusRequest) -> OperationResult | None:
        path = "/charges" if request.operation == "charge" else "/refunds"
        return await self._transport.lookup(operation="status", idempotency_key=request.idempotency_key,
                                            method="GET", path=path,
                                            params={"merchant_tx_id": request.idempotency_key},
                                            mapper=map_lookup)

    async def aclose(self) -> None:
        await self._transport.aclose()
