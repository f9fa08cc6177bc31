"""Aggregator with polling (in the style of DOCOMO Digital / Boku): HMAC-signed JSON requests,
answered 202 with a transaction id; the result is fetched later with GET until it is final.

POST {base}/charges, GET {base}/charges/{id}, GET {base}/charges?merchant_tx_id=KEY,
and the same under /refunds.
"""

from __future__ import annotations

from typing import Any

from carriers.aggregator import JsonAggregatorAdapter, json_reply
from carriers.base import (
    ChargeRequest,
    OperationResult,
    Outcome,
    RefundRequest,
)
from carriers.http import HttpReply
from models.money import format_major

_REASONS = {
    "INSUFFICIENT_FUNDS": Outcome.INSUFFICIENT_FUNDS,
    "ACCOUNT_BARRED": Outcome.REJECTED,
    "SPEND_LIMIT": Outcome.REJECTED,
    "REFUND_REFUSED": Outcome.REJECTED,
    "SERVICE_BLOCKED": Outcome.REJECTED,
}


def map_status(reply: HttpReply) -> OperationResult:
    body = json_reply(reply, (200, 201, 202))
    if isinstance(body, OperationResult):
        return body
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


class PollingAggregatorAdapter(JsonAggregatorAdapter):
    charge_path = "/charges"
    key_param = "merchant_tx_id"

    def read_reply(self, reply: HttpReply) -> OperationResult:
        return map_status(reply)

    def charge_body(self, request: ChargeRequest) -> dict[str, Any]:
        return {"merchant_tx_id": request.idempotency_key, "msisdn": request.msisdn,
                "amount": format_major(request.amount_minor, request.currency),
                "currency": request.currency, "description": request.description}

    def refund_body(self, request: RefundRequest) -> dict[str, Any]:
        return {"merchant_tx_id": request.idempotency_key,
                "charge_transaction_id": request.original_carrier_reference,
                "amount": format_major(request.amount_minor, request.currency),
                "currency": request.currency}
