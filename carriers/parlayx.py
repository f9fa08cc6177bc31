"""Parlay X over SOAP (3GPP TS 29.199): Payment ``chargeAmount`` / ``refundAmount`` and Account
Management ``getBalance``. zeep builds and reads the envelopes from the WSDLs in
``carriers/wsdl/parlayx``; the shared HttpTransport sends them, so classification and
interaction records are the same as for REST carriers.

Authentication is SOAP-level: a WS-Security UsernameToken (PasswordDigest, or PasswordText for
carriers whose entry says ``auth.password_type = "text"``), or the vendor
``RequestSOAPHeader`` (spId, timeStamp YYYYMMDDHHMMSS, spPassword = MD5(spId+password+timeStamp)).
Faults are ``ServiceException`` / ``PolicyException``, read from the fault ``detail`` or, as some
gateways send them, from ``faultcode`` / ``faultstring``; an id means what the carrier's own
``faults`` say, else what the family's defaults say. Service paths are the family's defaults
unless the entry's ``service_paths`` names its own ("payment", "account").
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import zeep
from lxml import etree
from zeep import Settings, Transport
from zeep.exceptions import Fault, TransportError, XMLSyntaxError
from zeep.wsdl import Document
from zeep.wsse.username import UsernameToken

from carriers.base import (
    BalanceResult,
    Capability,
    ChargeRequest,
    LookupResult,
    OperationResult,
    Outcome,
    RefundRequest,
    StatusRequest,
)
from carriers.exceptions import FAMILY_DEFAULTS, FaultCodes
from carriers.http import HttpAdapter, HttpReply, HttpTransport, refusal
from models.money import format_major, from_decimal

WSDL_DIR = Path(__file__).resolve().parent / "wsdl" / "parlayx"
PAYMENT_WSDL = WSDL_DIR / "parlayx_payment_amount_charging_2_1.wsdl"
ACCOUNT_WSDL = WSDL_DIR / "parlayx_account_management_service_2_2.wsdl"
PAYMENT_PATH = "/AmountChargingService"
ACCOUNT_PATH = "/AccountManagementService"
# the family's service paths by the names a registry entry's ``service_paths`` overrides
SERVICE_PATHS = {"payment": PAYMENT_PATH, "account": ACCOUNT_PATH}
VENDOR_HEADER_NS = "http://www.huawei.com.cn/schema/common/v2_1"
_EXCEPTION_ID = re.compile(r"\b((?:SVC|POL)\d{4})\b")


def sp_password(sp_id: str, password: str, timestamp: str) -> str:
    return hashlib.md5((sp_id + password + timestamp).encode()).hexdigest().upper()  # noqa: S324


def request_soap_header(sp_id: str, password: str, now: datetime) -> etree._Element:
    timestamp = now.strftime("%Y%m%d%H%M%S")
    header = etree.Element(f"{{{VENDOR_HEADER_NS}}}RequestSOAPHeader", nsmap={"v2": VENDOR_HEADER_NS})
    for name, value in (("spId", sp_id), ("spPassword", sp_password(sp_id, password, timestamp)),
                        ("timeStamp", timestamp)):
        etree.SubElement(header, f"{{{VENDOR_HEADER_NS}}}{name}").text = value
    return header


@lru_cache(maxsize=4)
def _document(path: Path) -> Document:
    """Parsed once per process: reading the WSDLs and schemas is the slow part of a client."""
    # zeep annotates the transport as a class; it takes an instance
    return Document(str(path), Transport(), settings=Settings())  # type: ignore[arg-type]


@dataclass
class _SoapReply:
    """What zeep's binding reads from an HTTP reply."""

    status_code: int
    content: bytes
    headers: dict[str, str] = field(default_factory=dict)
    encoding: str = "utf-8"


# WS-Security 1.1 SOAP fault codes (wsse:...) for a request whose security header was refused:
# our credentials, never the subscriber's doing, and nothing was processed
WSSE_AUTH_FAULTS = {"FailedAuthentication", "InvalidSecurity", "InvalidSecurityToken",
                    "FailedCheck", "SecurityTokenUnavailable", "MessageExpired"}


def service_paths(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The carrier's service paths: its own over the family's defaults."""
    unknown = set(overrides or {}) - set(SERVICE_PATHS)
    if unknown:
        raise ValueError(f"unknown Parlay X service path name(s) {sorted(unknown)}: "
                         f"known are {sorted(SERVICE_PATHS)}")
    return {**SERVICE_PATHS, **(overrides or {})}


def _fault_outcome(fault: Fault, faults: FaultCodes = FAMILY_DEFAULTS,
                   operation: str = "charge") -> OperationResult:
    code = str(fault.code or "")
    if code.rpartition(":")[2] in WSSE_AUTH_FAULTS:
        return OperationResult(outcome=Outcome.TRANSIENT, carrier_code="AUTH",
                               message=f"credentials refused: {fault.message or code}")
    message_id = ""
    if fault.detail is not None:
        for element in fault.detail.iter():
            if isinstance(element.tag, str) and etree.QName(element).localname == "messageId":
                message_id = (element.text or "").strip()
                break
    if not message_id:  # some gateways put the id in faultcode or faultstring instead
        found = _EXCEPTION_ID.search(f"{fault.code or ''} {fault.message or ''}")
        message_id = found.group(1) if found else ""
    if not message_id:
        return OperationResult(outcome=Outcome.UNKNOWN, message=f"SOAP fault: {fault.message}")
    return OperationResult(outcome=faults.outcome(operation, message_id), carrier_code=message_id,
                           message=str(fault.message or ""))


class ParlayXAdapter(HttpAdapter):
    capabilities = frozenset({Capability.CHARGE, Capability.REFUND, Capability.STATUS,
                              Capability.BALANCE})

    def __init__(self, transport: HttpTransport, auth_kind: str, username: str,
                 secret: str, *, password_type: str | None = None,
                 paths: Mapping[str, str] | None = None,
                 faults: FaultCodes | None = None) -> None:
        super().__init__(transport)
        if password_type not in (None, "digest", "text"):
            raise ValueError(f"unknown WS-Security password type {password_type!r}")
        # the UsernameToken profile allows both; digest unless the carrier requires the text
        wsse = (UsernameToken(username, secret, use_digest=password_type != "text")
                if auth_kind == "wsse" else None)
        self._paths = service_paths(paths)
        # the carrier's own meanings of exception ids over the family's (registry ``faults``)
        self._faults = faults or FaultCodes(transport.carrier_id)
        self._payment = zeep.Client(_document(PAYMENT_WSDL), wsse=wsse)
        self._account = zeep.Client(_document(ACCOUNT_WSDL), wsse=wsse)
        self._vendor_header = (username, secret) if auth_kind == "parlayx-header" else None

    def _envelope(self, client: zeep.Client, operation: str, **params: Any) -> str:
        if self._vendor_header:
            params["_soapheaders"] = [request_soap_header(*self._vendor_header, datetime.now(UTC))]
        message = client.create_message(client.service, operation, **params)
        return str(etree.tostring(message, encoding="unicode"))

    def _read(self, client: zeep.Client, operation: str, reply: HttpReply,
              kind: str) -> tuple[Any, OperationResult | None]:
        """The operation's result, or the outcome its failure means (``kind``: our name of the
        operation, charge/refund/status/balance, as the carrier's fault keys use it)."""
        refused = refusal(reply)
        if refused is not None:
            return None, refused
        binding = client.service._binding
        shim = _SoapReply(reply.status_code, reply.text.encode(), dict(reply.headers))
        try:
            result = binding.process_reply(client, binding.get(operation), shim)
            if reply.status_code != 200:  # e.g. an empty 202: accepted is not done
                return None, OperationResult(outcome=Outcome.UNKNOWN,
                                             carrier_code=str(reply.status_code),
                                             message=f"unexpected HTTP {reply.status_code}")
            return result, None
        except Fault as fault:
            return None, _fault_outcome(fault, self._faults, kind)
        except (XMLSyntaxError, TransportError, etree.XMLSyntaxError) as exc:
            return None, OperationResult(
                outcome=Outcome.UNKNOWN, carrier_code=str(reply.status_code),
                message=f"malformed response (HTTP {reply.status_code}): {type(exc).__name__}")

    async def _call(self, operation: str, key: str, **params: Any) -> OperationResult:
        kind = "charge" if operation == "chargeAmount" else "refund"

        def mapper(reply: HttpReply) -> OperationResult:
            _, failure = self._read(self._payment, operation, reply, kind)
            return failure or OperationResult(outcome=Outcome.SUCCEEDED, carrier_reference=key)

        return await self._transport.send(
            operation=kind, idempotency_key=key, method="POST", path=self._paths["payment"],
            content=self._envelope(self._payment, operation, **params),
            headers={"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'},
            mapper=mapper)

    @staticmethod
    def _charging(amount_minor: int, currency: str, description: str) -> dict[str, str]:
        return {"description": description, "currency": currency,
                "amount": format_major(amount_minor, currency)}

    async def charge(self, request: ChargeRequest) -> OperationResult:
        return await self._call(
            "chargeAmount", request.idempotency_key, endUserIdentifier=f"tel:{request.msisdn}",
            charge=self._charging(request.amount_minor, request.currency, request.description),
            referenceCode=request.idempotency_key)

    async def refund(self, request: RefundRequest) -> OperationResult:
        return await self._call(
            "refundAmount", request.idempotency_key, endUserIdentifier=f"tel:{request.msisdn}",
            charge=self._charging(request.amount_minor, request.currency, request.description),
            referenceCode=request.idempotency_key,
            originalReferenceCode=request.original_carrier_reference)

    async def status(self, request: StatusRequest) -> LookupResult:
        """``getAmountTransactionStatus`` is our own extension, not in TS 29.199-6: only
        carriers that declare a status look-up get asked. A state other than the three known
        ones is not an answer."""
        expected: Literal["Charged", "Refunded"] = (
            "Charged" if request.operation == "charge" else "Refunded")

        def mapper(reply: HttpReply) -> LookupResult:
            result, failure = self._read(self._payment, "getAmountTransactionStatus", reply,
                                         "status")
            if failure:
                return LookupResult.failure_of(failure)
            state = str(result)
            if state == "NotFound":
                return LookupResult.not_found()
            if state == expected:
                return LookupResult.of(OperationResult(
                    outcome=Outcome.SUCCEEDED, carrier_reference=request.idempotency_key))
            return LookupResult.failed(f"unrecognised transaction status {state!r}")

        return await self._transport.lookup(
            operation="status", idempotency_key=request.idempotency_key, method="POST",
            path=self._paths["payment"], headers={"Content-Type": "text/xml; charset=utf-8",
                                        "SOAPAction": '""'},
            content=self._envelope(self._payment, "getAmountTransactionStatus",
                                   endUserIdentifier=f"tel:{request.msisdn}",
                                   referenceCode=request.idempotency_key),
            mapper=mapper)

    async def balance(self, msisdn: str, currency: str) -> BalanceResult:
        found: list[Decimal] = []

        def mapper(reply: HttpReply) -> OperationResult:
            result, failure = self._read(self._account, "getBalance", reply, "balance")
            if failure:
                return failure
            for entry in result or []:
                found.append(Decimal(str(entry.amount)))
            return OperationResult(outcome=Outcome.SUCCEEDED)

        outcome = await self._transport.send(
            operation="balance", idempotency_key=f"balance-{len(msisdn)}", method="POST",
            path=self._paths["account"], headers={"Content-Type": "text/xml; charset=utf-8",
                                        "SOAPAction": '""'},
            content=self._envelope(self._account, "getBalance", endUserIdentifier=f"tel:{msisdn}"),
            mapper=mapper)
        if outcome.outcome is not Outcome.SUCCEEDED or not found:
            return BalanceResult(outcome=outcome.outcome, message=outcome.message)
        return BalanceResult(outcome=Outcome.SUCCEEDED, currency=currency,
                             amount_minor=from_decimal(sum(found, Decimal(0)), currency))
