"""GSMA OneAPI Payment (REST/JSON): request and response mapping, and the adapter over HttpTransport.

POST {base}/{endUserId}/transactions/amount with an ``amountTransaction``; the carrier answers
201 with the transaction echoed, or a ``requestError`` holding a policy or service exception.
A repeated ``clientCorrelator`` is answered with the original transaction, never a second debit.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from carriers.base import (
    Capability,
    ChargeRequest,
    LookupResult,
    OperationResult,
    Outcome,
    RefundRequest,
    StatusRequest,
)
from carriers.exceptions import FAMILY_DEFAULTS, FaultCodes
from carriers.http import HttpAdapter, HttpReply, HttpTransport, refusal, retry_after
from models.money import format_major


def end_user_id(msisdn: str) -> str:
    return f"tel:{msisdn}"


def transaction_path(msisdn: str) -> str:
    return f"/{quote(end_user_id(msisdn), safe='')}/transactions/amount"


def charge_body(request: ChargeRequest) -> dict[str, Any]:
    return {
        "amountTransaction": {
            "clientCorrelator": request.idempotency_key,
            "endUserId": end_user_id(request.msisdn),
            "paymentAmount": {
                "chargingInformation": {
                    "amount": format_major(request.amount_minor, request.currency),
                    "currency": request.currency,
                    "description": request.description,
                },
            },
            "referenceCode": request.reference_code,
            "transactionOperationStatus": "Charged",
        }
    }


def refund_body(request: RefundRequest) -> dict[str, Any]:
    return {
        "amountTransaction": {
            "clientCorrelator": request.idempotency_key,
            "endUserId": end_user_id(request.msisdn),
            "originalServerReferenceCode": request.original_carrier_reference,
            "paymentAmount": {
                "chargingInformation": {
                    "amount": format_major(request.amount_minor, request.currency),
                    "currency": request.currency,
                    "description": request.description,
                },
            },
            "referenceCode": request.reference_code,
            "transactionOperationStatus": "Refunded",
        }
    }


def map_reply(reply: HttpReply, expected_status: str, faults: FaultCodes = FAMILY_DEFAULTS,
              operation: str | None = None) -> OperationResult:
    """Conservative: only an explicit success or a known exception is final; anything else is
    UNKNOWN and gets settled by repeating the same clientCorrelator. An exception id means what
    the carrier's own ``faults`` say for ``operation`` (by default the one ``expected_status``
    names), else what the family's defaults say."""
    if reply.status_code in (401, 403):  # whatever the body says: our credentials, not the sale
        refused = refusal(reply)
        assert refused is not None
        return refused
    try:
        body = json.loads(reply.text) if reply.text else {}
    except json.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        refused = refusal(reply)
        if refused is not None:
            return refused
        return OperationResult(
            outcome=Outcome.UNKNOWN,
            carrier_code=str(reply.status_code),
            message=f"malformed response (HTTP {reply.status_code})",
        )
    if 200 <= reply.status_code < 300:
        transaction = body.get("amountTransaction")
        if not isinstance(transaction, dict):
            return OperationResult(outcome=Outcome.UNKNOWN, message="no amountTransaction in reply")
        status = transaction.get("transactionOperationStatus")
        reference = transaction.get("serverReferenceCode")
        if status == expected_status and reference:
            return OperationResult(outcome=Outcome.SUCCEEDED, carrier_reference=str(reference))
        return OperationResult(
            outcome=Outcome.UNKNOWN, message=f"transactionOperationStatus {status!r}"
        )
    error = body.get("requestError")
    if isinstance(error, dict):
        exception = error.get("policyException") or error.get("serviceException")
        if isinstance(exception, dict):
            message_id = str(exception.get("messageId", ""))
            return OperationResult(
                outcome=faults.outcome(operation or _OPERATION[expected_status], message_id),
                carrier_code=message_id,
                message=str(exception.get("text", "")),
                retry_after_seconds=retry_after(reply),
            )
    refused = refusal(reply)
    if refused is not None:
        return refused
    return OperationResult(
        outcome=Outcome.UNKNOWN,
        carrier_code=str(reply.status_code),
        message=f"unexpected HTTP {reply.status_code}",
    )


def form_fields(body: dict[str, Any]) -> dict[str, str]:
    """The older form-encoded variant: the same fields, flattened."""
    transaction = body["amountTransaction"]
    info = transaction["paymentAmount"]["chargingInformation"]
    fields = {
        "clientCorrelator": transaction["clientCorrelator"],
        "endUserId": transaction["endUserId"],
        "referenceCode": transaction["referenceCode"],
        "transactionOperationStatus": transaction["transactionOperationStatus"],
        "amount": info["amount"],
        "currency": info["currency"],
        "description": info["description"],
    }
    if "originalServerReferenceCode" in transaction:
        fields["originalServerReferenceCode"] = transaction["originalServerReferenceCode"]
    return fields


def map_lookup(reply: HttpReply, expected_status: str, faults: FaultCodes = FAMILY_DEFAULTS,
               not_found_ids: frozenset[str] | None = None) -> LookupResult:
    """Only a transaction the carrier returns is an answer; a 404 is "no such transaction"
    only when it says so with a service exception, not a bare 404 from a gateway or a path
    that does not exist."""
    if reply.status_code == 404:
        try:
            body = json.loads(reply.text) if reply.text else None
        except json.JSONDecodeError:
            body = None
        error = body.get("requestError") if isinstance(body, dict) else None
        exception = error.get("serviceException") if isinstance(error, dict) else None
        if isinstance(exception, dict) and exception.get("messageId") in (
                NOT_FOUND_IDS if not_found_ids is None else not_found_ids):
            return LookupResult.not_found(str(exception.get("text", "")))
        return LookupResult.failed("HTTP 404 without a service exception", "404")
    if not 200 <= reply.status_code < 300:
        return LookupResult.failure_of(map_reply(reply, expected_status, faults, "status"))
    result = map_reply(reply, expected_status, faults, "status")
    if result.outcome is Outcome.SUCCEEDED:
        return LookupResult.of(result)
    return LookupResult.failure_of(result)


_EXPECTED = {"charge": "Charged", "refund": "Refunded"}
_OPERATION = {"Charged": "charge", "Refunded": "refund"}
# the service exceptions a OneAPI gateway answers an unknown clientCorrelator with
NOT_FOUND_IDS = frozenset({"SVC0004"})


class OneApiAdapter(HttpAdapter):
    capabilities = frozenset({Capability.CHARGE, Capability.REFUND, Capability.STATUS})

    # the service exceptions this carrier answers a look-up of an unknown key with (subclasses
    # of carriers that word it differently override it)
    not_found_ids: frozenset[str] = NOT_FOUND_IDS

    def __init__(self, transport: HttpTransport, form_encoded: bool = False,
                 faults: FaultCodes | None = None) -> None:
        super().__init__(transport)
        self._form = form_encoded
        # the carrier's own meanings of exception ids over the family's (registry ``faults``)
        self._faults = faults or FaultCodes(transport.carrier_id)

    async def _post(self, operation: str, key: str, msisdn: str, body: dict[str, Any]
                    ) -> OperationResult:
        payload: dict[str, Any] = {"data": form_fields(body)} if self._form else {"json": body}
        expected = _EXPECTED[operation]
        return await self._transport.send(
            operation=operation, idempotency_key=key, method="POST",
            path=transaction_path(msisdn),
            mapper=lambda reply: map_reply(reply, expected, self._faults, operation),
            **payload,
        )

    # Carrier subclasses override these two to add or rename fields.
    def charge_body(self, request: ChargeRequest) -> dict[str, Any]:
        return charge_body(request)

    def refund_body(self, request: RefundRequest) -> dict[str, Any]:
        return refund_body(request)

    async def charge(self, request: ChargeRequest) -> OperationResult:
        return await self._post("charge", request.idempotency_key, request.msisdn,
                                self.charge_body(request))

    async def refund(self, request: RefundRequest) -> OperationResult:
        return await self._post("refund", request.idempotency_key, request.msisdn,
                                self.refund_body(request))

    async def status(self, request: StatusRequest) -> LookupResult:
        expected = _EXPECTED[request.operation]
        return await self._transport.lookup(
            operation="status", idempotency_key=request.idempotency_key, method="GET",
            path=transaction_path(request.msisdn),
            params={"clientCorrelator": request.idempotency_key},
            mapper=lambda reply: map_lookup(reply, expected, self._faults, self.not_found_ids),
        )
