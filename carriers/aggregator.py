"""What the two aggregator families share: JSON requests keyed by our idempotency key, a
charge and a refund collection, and a look-up of either by that key."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from carriers.base import (
    Capability,
    ChargeRequest,
    LookupResult,
    OperationResult,
    Outcome,
    RefundRequest,
    StatusRequest,
)
from carriers.http import HttpAdapter, HttpReply, refusal


def json_reply(reply: HttpReply, ok_statuses: tuple[int, ...]
               ) -> dict[str, Any] | OperationResult:
    """The reply's JSON object, or the outcome when there is none to read: busy or not
    authorised (status alone), refused as invalid (nothing was done), or malformed."""
    refused = refusal(reply)
    if refused is not None:
        return refused
    if reply.status_code in (400, 404, 422):
        return OperationResult(outcome=Outcome.REJECTED, carrier_code=str(reply.status_code),
                               message=reply.text[:200])
    try:
        body = json.loads(reply.text)
    except json.JSONDecodeError:
        body = None
    if not isinstance(body, dict) or reply.status_code not in ok_statuses:
        return OperationResult(outcome=Outcome.UNKNOWN, carrier_code=str(reply.status_code),
                               message=f"malformed response (HTTP {reply.status_code})")
    return body


class JsonAggregatorAdapter(HttpAdapter):
    capabilities = frozenset({Capability.CHARGE, Capability.REFUND, Capability.STATUS})
    charge_path: ClassVar[str]
    refund_path: ClassVar[str] = "/refunds"
    # the query parameter the aggregator finds our key by
    key_param: ClassVar[str]
    # the "error" a 404 look-up answer carries when the key is unknown
    not_found_error: ClassVar[str] = "not_found"

    def read_reply(self, reply: HttpReply) -> OperationResult:
        raise NotImplementedError

    def read_lookup(self, reply: HttpReply) -> LookupResult:
        """A record read with 200, or "no such key" said as a 404 with the aggregator's JSON
        error body; anything else is no answer."""
        if reply.status_code == 404:
            try:
                body = json.loads(reply.text)
            except json.JSONDecodeError:
                body = None
            if isinstance(body, dict) and body.get("error") == self.not_found_error:
                return LookupResult.not_found(str(body.get("error")))
            return LookupResult.failed("HTTP 404 without the aggregator's not-found body", "404")
        if reply.status_code != 200:
            return LookupResult.failure_of(self.read_reply(reply))
        result = self.read_reply(reply)
        if result.outcome in (Outcome.UNKNOWN, Outcome.TRANSIENT):
            return LookupResult.failure_of(result)
        return LookupResult.of(result)

    def charge_body(self, request: ChargeRequest) -> dict[str, Any]:
        raise NotImplementedError

    def refund_body(self, request: RefundRequest) -> dict[str, Any]:
        raise NotImplementedError

    async def _post(self, operation: str, key: str, path: str, body: dict[str, Any]
                    ) -> OperationResult:
        return await self._transport.send(operation=operation, idempotency_key=key,
                                          method="POST", path=path, json=body,
                                          mapper=self.read_reply)

    async def charge(self, request: ChargeRequest) -> OperationResult:
        return await self._post("charge", request.idempotency_key, self.charge_path,
                                self.charge_body(request))

    async def refund(self, request: RefundRequest) -> OperationResult:
        return await self._post("refund", request.idempotency_key, self.refund_path,
                                self.refund_body(request))

    async def status(self, request: StatusRequest) -> LookupResult:
        path = self.charge_path if request.operation == "charge" else self.refund_path
        return await self._transport.lookup(
            operation="status", idempotency_key=request.idempotency_key, method="GET",
            path=path, params={self.key_param: request.idempotency_key},
            mapper=self.read_lookup)
