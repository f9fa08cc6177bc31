"""Aggregator with callbacks (in the style of Fortumo): every request is only acknowledged;
the result arrives later as a signed callback to us. Requests carry an RS256 JWT binding the
body's SHA-256; callbacks carry an HMAC-SHA256 of their body and may repeat.

POST {base}/payments, POST {base}/refunds (202 + id); GET {base}/payments?order_id=KEY
(and /refunds) for the fallback when a callback never comes.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from carriers.aggregator import JsonAggregatorAdapter, json_reply
from carriers.auth import callback_signature
from carriers.base import (
    ChargeRequest,
    OperationResult,
    Outcome,
    RefundRequest,
)
from carriers.http import HttpReply, HttpTransport
from carriers.redaction import redact
from carriers.reports import CallbackRejected, CarrierReport
from models.money import format_major

_FAILURES = {
    "insufficient_funds": Outcome.INSUFFICIENT_FUNDS,
    "subscriber_barred": Outcome.REJECTED,
    "limit_exceeded": Outcome.REJECTED,
    "refund_refused": Outcome.REJECTED,
}




def outcome_of(body: dict[str, Any]) -> OperationResult:
    status, reference = body.get("status"), body.get("payment_id") or body.get("refund_id")
    if status == "completed" and reference:
        return OperationResult(outcome=Outcome.SUCCEEDED, carrier_reference=str(reference))
    if status in ("accepted", "pending") and reference:
        return OperationResult(outcome=Outcome.PENDING, carrier_reference=str(reference))
    if status == "failed":
        reason = str(body.get("reason", ""))
        return OperationResult(outcome=_FAILURES.get(reason, Outcome.REJECTED),
                               carrier_code=reason)
    return OperationResult(outcome=Outcome.UNKNOWN, message=redact(f"status {status!r}"))


def map_reply(reply: HttpReply) -> OperationResult:
    body = json_reply(reply, (200, 202))
    return body if isinstance(body, OperationResult) else outcome_of(body)


def parse_callback(body: bytes, headers: dict[str, str], secret: str,
                   _key: str | None = None) -> CarrierReport:
    """Verifies and reads one callback; raises CallbackRejected for anything not genuine."""
    given = headers.get("x-callback-signature", "")
    if not hmac.compare_digest(callback_signature(secret, body), given):
        raise CallbackRejected("bad callback signature")
    try:
        data = json.loads(body)
        key = str(data["order_id"])
    except (ValueError, KeyError, TypeError):
        raise CallbackRejected("malformed callback") from None
    result = outcome_of(data)
    return CarrierReport(idempotency_key=key, outcome=result.outcome.value,
                         carrier_reference=result.carrier_reference,
                         carrier_code=result.carrier_code, message=result.message)


class CallbackAggregatorAdapter(JsonAggregatorAdapter):
    charge_path = "/payments"
    key_param = "order_id"

    def read_reply(self, reply: HttpReply) -> OperationResult:
        return map_reply(reply)

    def __init__(self, transport: HttpTransport, callback_url: str) -> None:
        super().__init__(transport)
        self._callback_url = callback_url

    def charge_body(self, request: ChargeRequest) -> dict[str, Any]:
        return {"order_id": request.idempotency_key, "msisdn": request.msisdn,
                "amount": format_major(request.amount_minor, request.currency),
                "currency": request.currency, "description": request.description,
                "callback_url": self._callback_url}

    def refund_body(self, request: RefundRequest) -> dict[str, Any]:
        return {"order_id": request.idempotency_key,
                "payment_id": request.original_carrier_reference,
                "amount": format_major(request.amount_minor, request.currency),
                "currency": request.currency, "callback_url": self._callback_url}
