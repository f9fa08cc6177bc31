"""Aggregator with polling: 202 + transaction id on submit, the result via GET once processed."""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation

from aiohttp import web

from carriers.auth import hmac_signature
from simulators.books import InsufficientFunds, RefundRefused
from simulators.core import (
    SimCarrier,
    SimulatorCore,
    TakenFault,
    lookup_absent,
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
    ready_at: float  # wall-clock time, so that it means the same after a restart
    visible_at: float = 0.0  # before this, look-ups do not see it (commit_after_reply)

    def view(self) -> dict[str, object]:
        processed = time.time() >= self.ready_at
        return {"transaction_id": self.transaction_id, "merchant_tx_id": self.merchant_tx_id,
                "status": self.final_status if processed else "pending",
                "reason_code": self.reason_code if processed else None}

    def visible(self) -> bool:
        return time.time() >= self.visible_at


class PollingAggregator:
    def __init__(self, core: SimulatorCore) -> None:
        self.core = core
        self.operations: dict[str, Operation] = {}
        self.by_key: dict[tuple[str, str, str], list[str]] = {}
        core.reset_hooks.append(self._forget)
        for record in core.records(PROTOCOL):
            self._index(Operation(**record))

    def _forget(self) -> None:
        self.operations.clear()
        self.by_key.clear()

    def _index(self, operation: Operation) -> None:
        self.operations[operation.transaction_id] = operation
        self.by_key.setdefault((operation.carrier_id, operation.kind, operation.merchant_tx_id),
                               []).append(operation.transaction_id)

    def _find(self, carrier_id: str, kind: str, key: str) -> Operation | None:
        """The first operation under this key that look-ups can see."""
        return next((self.operations[t] for t in self.by_key.get((carrier_id, kind, key), ())
                     if self.operations[t].visible()), None)

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
        try:
            fresh = abs(time.time() - float(timestamp or 0)) < MAX_CLOCK_SKEW_SECONDS
        except ValueError:
            fresh = False
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
        existing = self._find(carrier.carrier_id, kind, key)
        if existing is not None and carrier.deduplicates_by_key == "error":
            return web.json_response({"error": "duplicate_merchant_tx_id",
                                      "message": f"merchant_tx_id {key} already used"},
                                     status=409)
        if existing is not None and carrier.deduplicates_by_key == "replay":
            return web.json_response(existing.view(), status=200)

        msisdn = str(body.get("msisdn", ""))
        if kind == "refund":
            original = self.operations.get(str(body.get("charge_transaction_id")))
            msisdn = original.msisdn if original else ""
        fault = self.core.take_fault(carrier.carrier_id, msisdn)
        refusal = await refuse_before_debit(fault,
                                            lambda: web.Response(status=202, text="accepted?"))
        if refusal is not None:
            return refusal

        operation = self._process(carrier, kind, key, msisdn, amount, body, fault)
        await lose_answer_after_debit(request, fault)
        return web.json_response(operation.view(), status=202)

    def _process(self, carrier: SimCarrier, kind: str, key: str, msisdn: str, amount: Decimal,
                 body: dict[str, object], fault: TakenFault | None) -> Operation:
        book = self.core.books[carrier.carrier_id]
        fault_kind = fault.kind if fault else ""
        visible_at = fault.visible_at() if fault else 0.0
        with self.core.atomic():  # the debit and our record of it, in one commit
            status, reason = "success", None
            reference = f"{carrier.carrier_id}-pa-{self.core.next_id(PROTOCOL):08d}"
            try:
                if fault_kind == "insufficient_funds":
                    raise InsufficientFunds()
                if fault_kind == "fault_code_variant":
                    status, reason = "failed", (fault.code if fault and fault.code
                                                else "LOW_BALANCE")
                elif kind == "charge":
                    txn = book.charge(msisdn, amount, key, str(body.get("description", "")),
                                      visible_at)
                    reference = txn.server_reference
                else:
                    original = self.operations.get(str(body.get("charge_transaction_id")))
                    if original is None:
                        raise RefundRefused("unknown charge")
                    txn = book.refund(msisdn, amount, key, "refund", original.transaction_id,
                                      visible_at)
                    reference = txn.server_reference
            except InsufficientFunds:
                status, reason = "failed", "INSUFFICIENT_FUNDS"
            except RefundRefused:
                status, reason = "failed", "REFUND_REFUSED"
            operation = Operation(reference, carrier.carrier_id, kind, key, msisdn, status, reason,
                                  time.time() + PROCESSING_SECONDS, visible_at)
            self.core.save_record(PROTOCOL, reference, asdict(operation))
        self._index(operation)
        return operation

    def _lookup_refusal(self, carrier: SimCarrier) -> web.Response | None:
        fault = self.core.take_lookup_fault(carrier.carrier_id)
        if fault is None:
            return None
        if fault.status == 401:
            return web.json_response({"error": "invalid_signature"}, status=401)
        return web.json_response({"error": "internal_error"}, status=fault.status or 500)

    async def get(self, request: web.Request) -> web.Response:
        carrier, _ = await self._verified(request)
        operation = self.operations.get(request.match_info["transaction_id"])
        if operation is None or operation.carrier_id != carrier.carrier_id or not operation.visible():
            return web.json_response({"error": "not_found"}, status=404)
        return web.json_response(operation.view())

    async def find(self, request: web.Request) -> web.Response:
        carrier = self.core.carrier(request, PROTOCOL)
        if not carrier.status_lookup:
            return lookup_absent()
        carrier, _ = await self._verified(request)
        refusal = self._lookup_refusal(carrier)
        if refusal is not None:
            return refusal
        kind = "charge" if request.path.endswith("/charges") else "refund"
        operation = self._find(carrier.carrier_id, kind, request.query.get("merchant_tx_id", ""))
        if operation is None:
            return web.json_response({"error": "not_found"}, status=404)
        return web.json_response(operation.view())
