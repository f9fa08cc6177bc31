"""Aggregator with polling: 202 + transaction id on submit, the result via GET once processed."""

from __future__ import annotations

import hmac
import itertools
import json
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from aiohttp import web

from carriers.auth import hmac_signature
from simulators.books import InsufficientFunds, RefundRefused
from simulators.core import (
    SimCarrier,
    SimulatorCore,
    lose_answer_after_debit,
    refuse_before_debit,
)

PROTOCOL = "polling-aggregator"
PROCESSING_SECONDS = 0.3
MAX_CLOCK_SKEW_SECONDS = 300


@dataclass
class Operation:
    transaction_id: str
    carrier_id: str
    kind: str
    merchant_tx_id: str
    msisdn: str
    final_status: str  # what it becomes once processed: success | failed
    reason_code: str | None
    ready_at: float

    def view(self) -> dict[str, object]:
        processed = time.monotonic() >= self.ready_at
        return {"transaction_id": self.transaction_id, "merchant_tx_id": self.merchant_tx_id,
                "status": self.final_status if processed else "pending",
                "reason_code": self.reason_code if processed else None}


class PollingAggregator:
    def __init__(self, core: SimulatorCore) -> None:
        self.core = core
        self.operations: dict[str, Operation] = {}
        self.by_key: dict[tuple[str, str, str], str] = {}
        self._ids = itertools.count(1)

    def add_routes(self, app: web.Application) -> None:
        for kind in ("charges", "refunds"):
            app.router.add_post(f"/{{carrier}}/v2/{kind}", self.submit)
            app.router.add_get(f"/{{carrier}}/v2/{kind}", self.find)
            app.router.add_get(f"/{{carrier}}/v2/{kind}/{{transaction_id}}", self.get)

    async def _verified(self, request: web.Request) -> tuple[SimCarrier, bytes]:
        carrier = self.core.carrier(request, PROTOCOL)
        body = await request.read()
        timestamp = request.headers.get("X-Timestamp", "0")
        expected = hmac_signature(carrier.password, request.method, request.raw_path, timestamp,
                                  body)
        fresh = abs(time.time() - float(timestamp or 0)) < MAX_CLOCK_SKEW_SECONDS
        if not (fresh and request.headers.get("X-API-Key") == carrier.username
                and hmac.compare_digest(expected, request.headers.get("X-Signature", ""))):
            raise web.HTTPUnauthorized(text=json.dumps({"error": "invalid_signature"}),
                                       content_type="application/json")
        return carrier, body

    async def submit(self, request: web.Request) -> web.StreamResponse:
        carrier, raw = await self._verified(request)
        kind = "charge" if request.path.endswith("/charges") else "refund"
        try:
            body = json.loads(raw)
            key, amount = str(body["merchant_tx_id"]), Decimal(str(body["amount"]))
            if body["currency"] != carrier.currency or amount <= 0:
                raise ValueError("amount or currency")
        except (ValueError, KeyError, TypeError, InvalidOperation) as exc:
            return web.json_response({"error": "invalid_request", "message": str(exc)}, status=400)
        existing = self.by_key.get((carrier.carrier_id, kind, key))
        if existing is not None:
            return web.json_response(self.operations[existing].view(), status=200)

        msisdn = str(body.get("msisdn", ""))
        if kind == "refund":
            original = self.operations.get(str(body.get("charge_transaction_id")))
            msisdn = original.msisdn if original else ""
        fault = self.core.take_fault(carrier.carrier_id, msisdn)
        fault_kind = fault.kind if fault else ""
        refusal = await refuse_before_debit(fault,
                                            lambda: web.Response(status=202, text="accepted?"))
        if refusal is not None:
            return refusal

        operation = self._process(carrier, kind, key, msisdn, amount, body,
                                  force_insufficient=fault_kind == "insufficient_funds")
        await lose_answer_after_debit(request, fault)
        return web.json_response(operation.view(), status=202)

    def _process(self, carrier: SimCarrier, kind: str, key: str, msisdn: str, amount: Decimal,
                 body: dict[str, object], force_insufficient: bool) -> Operation:
        book = self.core.books[carrier.carrier_id]
        status, reason, reference = "success", None, f"{carrier.carrier_id}-pa-{next(self._ids):08d}"
        try:
            if force_insufficient:
                raise InsufficientFunds()
            if kind == "charge":
                txn = book.charge(msisdn, amount, key, str(body.get("description", "")))
            else:
                original = self.operations.get(str(body.get("charge_transaction_id")))
                if original is None:
                    raise RefundRefused("unknown charge")
                txn = book.refund(msisdn, amount, key, "refund", original.transaction_id)
            reference = txn.server_reference
        except InsufficientFunds:
            status, reason = "failed", "INSUFFICIENT_FUNDS"
        except RefundRefused:
            status, reason = "failed", "REFUND_REFUSED"
        operation = Operation(reference, carrier.carrier_id, kind, key, msisdn, status, reason,
                              time.monotonic() + PROCESSING_SECONDS)
        self.operations[reference] = operation
        self.by_key[(carrier.carrier_id, kind, key)] = reference
        return operation

    async def get(self, request: web.Request) -> web.Response:
        carrier, _ = await self._verified(request)
        operation = self.operations.get(request.match_info["transaction_id"])
        if operation is None or operation.carrier_id != carrier.carrier_id:
            return web.json_response({"error": "not_found"}, status=404)
        return web.json_response(operation.view())

    async def find(self, request: web.Request) -> web.Response:
        carrier, _ = await self._verified(request)
        kind = "charge" if request.path.endswith("/charges") else "refund"
        reference = self.by_key.get((carrier.carrier_id, kind,
                                     request.query.get("merchant_tx_id", "")))
        if reference is None:
            return web.json_response({"error": "not_found"}, status=404)
        return web.json_response(self.operations[reference].view())
