"""GSMA OneAPI Payment carrier: POST/GET {carrier}/payment/v1/{endUserId}/transactions/amount."""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from carriers.exceptions import insufficient_funds_code
from carriers.loader import Registry, default_registry
from simulators.books import InsufficientFunds, RefundRefused
from simulators.core import (
    SimCarrier,
    SimulatorCore,
    lookup_absent,
    lose_answer_after_debit,
    refuse_before_debit,
)

PROTOCOL = "oneapi"
# the family's code for a charge refused for want of credit, in its fault_code_variant form
VARIANT_CODE = "POL0001"


def request_error(status: int, kind: str, message_id: str, text: str) -> web.Response:
    return web.json_response(
        {"requestError": {kind: {"messageId": message_id, "text": text}}}, status=status)


class OneApiCarrier:
    def __init__(self, core: SimulatorCore, registry: Registry | None = None) -> None:
        self.core = core
        self.registry = registry if registry is not None else default_registry()

    def add_routes(self, app: web.Application) -> None:
        path = "/{carrier}/payment/v1/{end_user}/transactions/amount"
        app.router.add_post(path, self.amount)
        app.router.add_get(path, self.lookup)

    async def _read_transaction(self, request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/x-www-form-urlencoded":
            form = await request.post()
            return {
                "clientCorrelator": form.get("clientCorrelator"),
                "endUserId": form.get("endUserId"),
                "referenceCode": form.get("referenceCode"),
                "transactionOperationStatus": form.get("transactionOperationStatus"),
                "originalServerReferenceCode": form.get("originalServerReferenceCode"),
                "paymentAmount": {"chargingInformation": {
                    "amount": form.get("amount"), "currency": form.get("currency"),
                    "description": form.get("description")}},
            }
        body = await request.json()
        transaction = body.get("amountTransaction")
        if not isinstance(transaction, dict):
            raise ValueError("amountTransaction missing")
        return transaction

    def _echo(self, request: web.Request, carrier: SimCarrier, txn_in: dict[str, Any],
              server_ref: str, status: str) -> web.Response:
        echoed = dict(txn_in)
        if "quirky_echo" in carrier.options:  # description as a list, amount as a number
            info = dict(echoed["paymentAmount"]["chargingInformation"])
            info["description"] = [info.get("description", "")]
            info["amount"] = float(info["amount"])
            echoed["paymentAmount"] = {"chargingInformation": info}
        echoed["serverReferenceCode"] = server_ref
        echoed["transactionOperationStatus"] = status
        echoed["resourceURL"] = f"{request.url.with_query(None)}/{server_ref}"
        return web.json_response({"amountTransaction": echoed}, status=201)

    def out_of_credit(self, carrier: SimCarrier) -> web.Response:
        """Refuses for want of credit with the code this carrier's entry declares for it (its
        own list), else the family's POL1000."""
        code = insufficient_funds_code(self.registry.carriers.get(carrier.carrier_id), "POL1000")
        kind = "serviceException" if code.startswith("SVC") else "policyException"
        return request_error(400, kind, code, "insufficient credit")

    async def lookup(self, request: web.Request) -> web.Response:
        """Status by clientCorrelator: how a client settles an operation it got no answer to."""
        carrier = self.core.carrier(request, PROTOCOL)
        if not carrier.status_lookup:  # not every gateway has it (it is not in the spec)
            return lookup_absent()
        if not self.core.http_auth_ok(request, carrier):
            return request_error(401, "policyException", "POL0001", "authentication failed")
        fault = self.core.take_lookup_fault(carrier.carrier_id)
        if fault is not None and fault.status == 401:
            return request_error(401, "policyException", "POL0001", "authentication failed")
        if fault is not None:
            return request_error(fault.status or 500, "serviceException", "SVC0001",
                                 "A service error occurred")
        msisdn = unquote(request.match_info["end_user"]).removeprefix("tel:")
        txn = self.core.books[carrier.carrier_id].find(request.query.get("clientCorrelator", ""))
        if txn is None or txn.msisdn != msisdn:
            return request_error(404, "serviceException", "SVC0004", "no such transaction")
        return web.json_response({"amountTransaction": {
            "clientCorrelator": txn.client_correlator, "endUserId": f"tel:{msisdn}",
            "serverReferenceCode": txn.server_reference,
            "transactionOperationStatus": "Charged" if txn.kind == "charge" else "Refunded",
            "paymentAmount": {"chargingInformation": {"amount": str(txn.amount),
                                                      "currency": txn.currency}},
        }})

    async def amount(self, request: web.Request) -> web.StreamResponse:
        carrier = self.core.carrier(request, PROTOCOL)
        if not self.core.http_auth_ok(request, carrier):
            return request_error(401, "policyException", "POL0001", "authentication failed")
        book = self.core.books[carrier.carrier_id]
        try:
            txn_in = await self._read_transaction(request)
            msisdn = unquote(request.match_info["end_user"]).removeprefix("tel:")
            info = txn_in["paymentAmount"]["chargingInformation"]
            amount = Decimal(str(info["amount"]))
            currency = str(info["currency"])
            correlator = str(txn_in["clientCorrelator"])
            operation = str(txn_in["transactionOperationStatus"])
        except (ValueError, KeyError, TypeError, InvalidOperation, json.JSONDecodeError) as exc:
            return request_error(400, "serviceException", "SVC0002", f"invalid input: {exc}")
        if currency != carrier.currency or amount <= 0:
            return request_error(400, "serviceException", "SVC0002", "invalid amount or currency")
        metadata = txn_in["paymentAmount"].get("chargingMetaData") or {}
        if ("requires-charging-metadata" in carrier.options and operation == "Charged"
                and not metadata.get("serviceId")):
            return request_error(400, "serviceException", "SVC0002", "chargingMetaData.serviceId")

        previous = book.find(correlator)
        if previous is not None and carrier.deduplicates_by_key == "error":
            return request_error(409, "serviceException", "SVC0005",
                                 f"duplicate clientCorrelator {correlator}")
        if previous is not None and carrier.deduplicates_by_key == "replay":
            # a repeated correlator is answered with the original
            if previous.msisdn != msisdn or previous.amount != amount:
                return request_error(409, "serviceException", "SVC0005", "correlator reused")
            status = "Charged" if previous.kind == "charge" else "Refunded"
            return self._echo(request, carrier, txn_in, previous.server_reference, status)

        fault = self.core.take_fault(carrier.carrier_id, msisdn)
        refusal = await refuse_before_debit(
            fault, lambda: web.Response(status=201, text="<html>gateway says hello</html>"))
        if refusal is not None:
            return refusal
        if fault is not None and fault.kind == "insufficient_funds":
            return self.out_of_credit(carrier)
        if fault is not None and fault.kind == "fault_code_variant":
            # the code this carrier's registry entry says it refuses for want of credit with
            code = fault.code or insufficient_funds_code(
                self.registry.carriers.get(carrier.carrier_id), VARIANT_CODE)
            kind = "serviceException" if code.startswith("SVC") else "policyException"
            return request_error(fault.status or 400, kind, code, fault.text or "credit too low")
        visible_at = fault.visible_at() if fault is not None else 0.0

        reference = str(txn_in.get("referenceCode", ""))
        try:
            if operation == "Charged":
                txn = book.charge(msisdn, amount, correlator, reference, visible_at)
            elif operation == "Refunded":
                txn = book.refund(msisdn, amount, correlator, reference,
                                  str(txn_in.get("originalServerReferenceCode", "")), visible_at)
            else:
                return request_error(400, "serviceException", "SVC0002",
                                     f"unsupported operation {operation}")
        except InsufficientFunds:
            return self.out_of_credit(carrier)
        except RefundRefused as exc:
            return request_error(400, "serviceException", "SVC0270", str(exc))

        await lose_answer_after_debit(request, fault)
        return self._echo(request, carrier, txn_in, txn.server_reference, operation)
