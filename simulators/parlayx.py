"""Parlay X carrier over SOAP: AmountCharging and AccountManagement endpoints, serving their
WSDLs, checking WS-Security UsernameTokens or the vendor RequestSOAPHeader.

Each carrier is what its registry entry says: its endpoints are at its ``service_paths`` (over
the family's defaults) under ``/{carrier}/parlayx``, its UsernameToken must carry the password
type its ``auth.password_type`` names (PasswordDigest unless "text"), and the code it refuses
a charge with for want of credit (``fault_code_variant``) is the one its ``faults`` declare for
that, else the family's SVC0270."""

from __future__ import annotations

import base64
import hashlib
import hmac
from decimal import Decimal, InvalidOperation
from xml.sax.saxutils import escape

from aiohttp import web
from lxml import etree

from carriers.exceptions import insufficient_funds_code
from carriers.loader import CarrierConfig, Registry, default_registry
from carriers.parlayx import ACCOUNT_WSDL, PAYMENT_WSDL, WSDL_DIR, service_paths, sp_password
from simulators.books import CarrierBook, InsufficientFunds, RefundRefused
from simulators.core import (
    SimCarrier,
    SimulatorCore,
    lose_answer_after_debit,
    refuse_before_debit,
)

PROTOCOL = "parlayx"
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
PAYMENT_NS = "http://www.csapi.org/schema/parlayx/payment/amount_charging/v2_1/local"
ACCOUNT_NS = "http://www.csapi.org/schema/parlayx/account_management/v2_2/local"
COMMON_NS = "http://www.csapi.org/schema/parlayx/common/v2_1"
SEXT = "{http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd}"
WSU = "{http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd}"
PROFILE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0"
# the family's code for a charge refused for want of credit, in its fault_code_variant form
VARIANT_CODE = "SVC0270"


def envelope(body: str) -> str:
    return (f'<soapenv:Envelope xmlns:soapenv="{SOAP_ENV}"><soapenv:Body>{body}'
            "</soapenv:Body></soapenv:Envelope>")


def _text(parent: etree._Element, name: str) -> str:
    for element in parent.iter():
        if isinstance(element.tag, str) and etree.QName(element).localname == name:
            return (element.text or "").strip()
    return ""


class ParlayXCarrier:
    def __init__(self, core: SimulatorCore, registry: Registry | None = None) -> None:
        self.core = core
        self.registry = registry if registry is not None else default_registry()

    def add_routes(self, app: web.Application) -> None:
        # each carrier's own service paths (registry service_paths), dispatched per carrier
        app.router.add_post("/{carrier}/parlayx/{service:.+}", self.service)
        app.router.add_get("/{carrier}/parlayx/{service:.+}", self.wsdl)
        app.router.add_static("/parlayx/wsdl", WSDL_DIR)

    def entry(self, carrier: SimCarrier) -> CarrierConfig | None:
        return self.registry.carriers.get(carrier.carrier_id)

    def _service_name(self, request: web.Request) -> tuple[SimCarrier, str]:
        """The carrier, and the family's name of the service its request path names."""
        carrier = self.core.carrier(request, PROTOCOL)
        entry = self.entry(carrier)
        paths = service_paths(entry.service_paths if entry else None)
        wanted = "/" + request.match_info["service"]
        for name, path in paths.items():
            if path == wanted:
                return carrier, name
        raise web.HTTPNotFound(text="no such service")

    async def service(self, request: web.Request) -> web.StreamResponse:
        _, name = self._service_name(request)
        return await (self.payment(request) if name == "payment" else self.account(request))

    async def wsdl(self, request: web.Request) -> web.FileResponse:
        _, name = self._service_name(request)
        return web.FileResponse(str(PAYMENT_WSDL if name == "payment" else ACCOUNT_WSDL))

    # -- faults --------------------------------------------------------------------------------

    @staticmethod
    def fault(carrier: SimCarrier, kind: str, message_id: str, text: str) -> web.Response:
        if "faults-in-faultcode" in carrier.options:  # the id only in faultcode/faultstring
            body = (f"<soapenv:Fault><faultcode>soapenv:Server.{message_id}</faultcode>"
                    f"<faultstring>{message_id}: {escape(text)}</faultstring></soapenv:Fault>")
        else:
            body = (f"<soapenv:Fault><faultcode>soapenv:Server</faultcode>"
                    f"<faultstring>{escape(text)}</faultstring><detail>"
                    f'<ns1:{kind} xmlns:ns1="{COMMON_NS}"><messageId>{message_id}</messageId>'
                    f"<text>{escape(text)}</text></ns1:{kind}></detail></soapenv:Fault>")
        return web.Response(status=500, text=envelope(body), content_type="text/xml")

    def out_of_credit(self, carrier: SimCarrier) -> web.Response:
        """Refuses for want of credit with the code this carrier's entry declares for it (its
        own list), else the family's POL1000."""
        code = insufficient_funds_code(self.entry(carrier), "POL1000")
        kind = "PolicyException" if code.startswith("POL") else "ServiceException"
        return self.fault(carrier, kind, code, "insufficient credit")

    @staticmethod
    def auth_failed() -> web.Response:
        """WS-Security 1.1's fault for a security header that does not authenticate."""
        body = ('<soapenv:Fault xmlns:wsse="http://docs.oasis-open.org/wss/2004/01/'
                'oasis-200401-wss-wssecurity-secext-1.0.xsd">'
                "<faultcode>wsse:FailedAuthentication</faultcode>"
                "<faultstring>The security token could not be authenticated or authorized"
                "</faultstring></soapenv:Fault>")
        return web.Response(status=500, text=envelope(body), content_type="text/xml")

    @staticmethod
    def unsupported(operation: str) -> web.Response:
        """A plain SOAP fault, as a gateway's stack answers an operation it does not have."""
        body = ("<soapenv:Fault><faultcode>soapenv:Client</faultcode>"
                f"<faultstring>operation not supported: {escape(operation)}</faultstring>"
                "</soapenv:Fault>")
        return web.Response(status=500, text=envelope(body), content_type="text/xml")

    # -- authentication ------------------------------------------------------------------------

    def authenticated(self, carrier: SimCarrier, document: etree._Element) -> bool:
        header = document.find(f"{{{SOAP_ENV}}}Header")
        if header is None:
            return False
        if carrier.auth_kind == "wsse":
            token = header.find(f"{SEXT}Security/{SEXT}UsernameToken")
            password = token.find(f"{SEXT}Password") if token is not None else None
            if token is None or password is None:
                return False
            entry = self.entry(carrier)
            # the carrier takes the one password type it documents, never the other
            text = entry is not None and entry.auth.password_type == "text"
            given_type = password.get("Type", f"{PROFILE}#PasswordText")  # the profile's default
            if given_type != f"{PROFILE}#{'PasswordText' if text else 'PasswordDigest'}":
                return False
            if text:
                expected = carrier.password
            else:
                nonce, created = _text(token, "Nonce"), _text(token, "Created")
                try:
                    raw_nonce = base64.b64decode(nonce, validate=True)
                except ValueError:
                    return False
                expected = base64.b64encode(hashlib.sha1(  # noqa: S324 (the profile's)
                    raw_nonce + created.encode() + carrier.password.encode()).digest()).decode()
            return _text(token, "Username") == carrier.username and hmac.compare_digest(
                expected.encode(), (password.text or "").strip().encode())
        sp_id, timestamp = _text(header, "spId"), _text(header, "timeStamp")
        expected = sp_password(sp_id, carrier.password, timestamp)
        return sp_id == carrier.username and hmac.compare_digest(
            expected, _text(header, "spPassword").upper())

    async def _parse(self, request: web.Request) -> tuple[SimCarrier, etree._Element | None]:
        carrier = self.core.carrier(request, PROTOCOL)
        try:
            return carrier, etree.fromstring(await request.read())
        except etree.XMLSyntaxError:
            return carrier, None

    # -- operations ----------------------------------------------------------------------------

    async def account(self, request: web.Request) -> web.Response:
        carrier, document = await self._parse(request)
        if document is None:
            return self.fault(carrier, "ServiceException", "SVC0001", "malformed request")
        if not self.authenticated(carrier, document):
            return self.auth_failed()
        msisdn = _text(document, "endUserIdentifier").removeprefix("tel:")
        balance = self.core.books[carrier.carrier_id].account(msisdn).balance
        return web.Response(content_type="text/xml", text=envelope(
            f'<ns0:getBalanceResponse xmlns:ns0="{ACCOUNT_NS}"><ns0:result>'
            f"<balanceType>main</balanceType><amount>{balance}</amount>"
            "</ns0:result></ns0:getBalanceResponse>"))

    async def payment(self, request: web.Request) -> web.StreamResponse:
        carrier, document = await self._parse(request)
        if document is None:
            return self.fault(carrier, "ServiceException", "SVC0001", "malformed request")
        if not self.authenticated(carrier, document):
            return self.auth_failed()
        body = document.find(f"{{{SOAP_ENV}}}Body")
        operation = etree.QName(body[0]).localname if body is not None and len(body) else ""
        msisdn = _text(document, "endUserIdentifier").removeprefix("tel:")
        reference = _text(document, "referenceCode")
        book = self.core.books[carrier.carrier_id]
        if operation == "getAmountTransactionStatus":  # our extension, not in TS 29.199-6
            if not carrier.status_lookup:
                return self.unsupported(operation)
            lookup_fault = self.core.take_lookup_fault(carrier.carrier_id)
            if lookup_fault is not None and lookup_fault.status == 401:
                return self.auth_failed()
            if lookup_fault is not None:
                return self.fault(carrier, "ServiceException", "SVC0001", "service error")
            txn = book.find(reference)
            state = "NotFound" if txn is None or txn.msisdn != msisdn else (
                "Charged" if txn.kind == "charge" else "Refunded")
            return web.Response(content_type="text/xml", text=envelope(
                f'<ns0:getAmountTransactionStatusResponse xmlns:ns0="{PAYMENT_NS}">'
                f"<ns0:result>{state}</ns0:result></ns0:getAmountTransactionStatusResponse>"))
        try:
            amount = Decimal(_text(document, "amount"))
            currency = _text(document, "currency")
        except InvalidOperation:
            return self.fault(carrier, "ServiceException", "SVC0002", "invalid amount")
        if currency != carrier.currency or amount <= 0 or not reference:
            return self.fault(carrier, "ServiceException", "SVC0002", "invalid input")
        previous = book.find(reference)
        if previous is not None and carrier.deduplicates_by_key == "error":
            return self.fault(carrier, "ServiceException", "SVC0005",
                              f"duplicate correlator {reference}")
        if previous is not None and carrier.deduplicates_by_key == "replay":
            return self._done(operation)  # a repeated referenceCode is not applied twice

        fault = self.core.take_fault(carrier.carrier_id, msisdn)
        kind = fault.kind if fault else ""
        refusal = await refuse_before_debit(
            fault, lambda: web.Response(status=200, text="<html><body>gateway",
                                        content_type="text/html"))
        if refusal is not None:
            return refusal
        if kind == "insufficient_funds":
            return self.out_of_credit(carrier)
        if fault is not None and kind == "fault_code_variant":
            code = fault.code or insufficient_funds_code(self.entry(carrier), VARIANT_CODE)
            kind = "PolicyException" if code.startswith("POL") else "ServiceException"
            return self.fault(carrier, kind, code,
                              fault.text or "insufficient balance")
        visible_at = fault.visible_at() if fault is not None else 0.0
        try:
            if operation == "chargeAmount":
                book.charge(msisdn, amount, reference, reference, visible_at)
            elif operation == "refundAmount":
                book.refund(msisdn, amount, reference, reference,
                            self._original(book, _text(document, "originalReferenceCode")),
                            visible_at)
            else:
                return self.fault(carrier, "ServiceException", "SVC0001",
                                  f"unknown operation {operation}")
        except InsufficientFunds:
            return self.out_of_credit(carrier)
        except RefundRefused as exc:
            return self.fault(carrier, "ServiceException", "SVC0270", str(exc))
        await lose_answer_after_debit(request, fault)
        return self._done(operation)

    @staticmethod
    def _original(book: CarrierBook, original_reference: str) -> str:
        charge = book.by_correlator.get(original_reference)
        return charge.server_reference if charge is not None else ""

    @staticmethod
    def _done(operation: str) -> web.Response:
        return web.Response(content_type="text/xml", text=envelope(
            f'<ns0:{operation}Response xmlns:ns0="{PAYMENT_NS}"/>'))
