"""Redaction of carrier exchanges: MSISDNs masked however they are written (with '+', 'tel:', or
as bare digits), while our keys, carrier references, timestamps and amounts stay readable."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

import carriers.redaction as redaction
from carriers.camara import map_created, outcome_of, parse_event, sink_token
from carriers.http import HttpReply
from carriers.redaction import redact
from models.msisdn import looks_like_msisdn, mask_msisdn

# numbers from the brief's carrier replies and the repo's fixtures, bare digits
NUMBERS = ("33612345678", "447700900123", "254712345678", "5215512345678", "16175551234",
           "4915112345678", "819012345678", "212612345678")

# identifiers and values that must come out of redaction exactly as they went in
KEYS = ("sub-12-c3-a0", "dev-s12-k7f3q9x2ab-c3-a0", "sub-123456789-c1-a0",
        "sub-447700900123-c1-a0", "refund-sub-12-c3", "dev-s12-4471234567-c3-a0",
        "prod-k7f3q9x2abmn-c3-a0", "prod-234567892345-c1-a0", "dev-o12-r3")
REFERENCES = ("fr-azur-00000012", "ke-safari-pay-00000003", "mx-sol-cb-00000100",
              "fr-azur-pay-00000001-r1", "uk-bolt-pa-00000007")
TIMESTAMPS = ("2024-05-01T12:34:56.123456+00:00", "2024-05-01T12:34:56Z", "20240501T123456Z")


def _full_numbers_left(text: str) -> list[str]:
    return [n for n in NUMBERS if n in text]


@pytest.mark.parametrize("text", [
    "msisdn=33612345678&amount=4.99",
    '{"endUserId":"447700900123"}',
    "submit_sm destination_addr=254712345678 source_addr=84433",
    "<msisdn>5215512345678</msisdn>",
    "PhoneNumber(number='16175551234', ton=1, npi=1)",
    "sip:4915112345678@ims.example",
    "denied for 212612345678.",
])
def test_bare_international_numbers_are_masked(text: str) -> None:
    clean = redact(text)
    assert _full_numbers_left(clean) == []
    assert re.search(r"\d{2}\*+\d{2}", clean)


def test_bare_numbers_keep_the_msisdn_mask_format() -> None:
    for number in NUMBERS:
        assert redact(f"msisdn={number}") == "msisdn=" + mask_msisdn(number).lstrip("+")
    assert redact('"447700900123"') == '"44********23"'
    # the written forms are unchanged
    assert redact("+33612345678 tel:+33612345678") == "+33*******78 tel:+33*******78"


@pytest.mark.parametrize("text", [
    *KEYS, *REFERENCES, *TIMESTAMPS,
    "HTTP 503", "status 201", "84433", "short code 123456", "4.99", "1234567890.50",
    '"amount": 12345678.00', "order 12345678",  # not a valid number with a '+'
    '"iat": 1717171717', "X-Timestamp: 1717171717.25",
    "sink https://app.example/callbacks/camara/sub-123456789-c1-a0",
    "authorizationId a1b2c3d4e5f6 token_hex 9f8e7d6c5b4a3928",
])
def test_what_is_not_a_phone_number_survives(text: str) -> None:
    assert redact(text) == text


def test_smpp_receipt_dates_and_message_ids_survive() -> None:
    # SMPP appendix B wording, the key=value wording, and numeric message ids some SMSCs use
    receipts = [
        "id:1234567890 sub:001 dlvrd:001 submit date:2405011234 done date:2405011235 "
        "stat:DELIVRD err:000 text:Votre abonnement",
        "id:0447700900 sub:001 dlvrd:000 submit date:240501123456 done date:240501123501 "
        "stat:REJECTD err:088 text:",
        "msgid=16175551234;state=DELIVRD;errcode=000",
        "<submitDate>202405011234</submitDate><doneDate>202405011235</doneDate>",
    ]
    for receipt in receipts:
        assert redact(receipt) == receipt
    # the same digits in a number's place are masked
    assert "16175551234" not in redact("dst=16175551234")


def test_compact_dates_are_not_taken_for_numbers() -> None:
    for stamp in ("240501123456", "202405011234", "20240501123456", "2405011234"):
        assert not looks_like_msisdn(stamp)
    assert looks_like_msisdn("447700900123")  # possible, in the UK's reserved drama range
    assert looks_like_msisdn("5215512345678")  # Mexican mobile in the pre-2019 "1" form
    assert not looks_like_msisdn("123456789012")
    assert not looks_like_msisdn("00000012")


# -- one reply (or request, or pushed result) per carrier family, as the simulators write them --

FAMILY_EXCHANGES = {
    "oneapi-json": json.dumps({"amountTransaction": {
        "clientCorrelator": "dev-s12-k7f3q9x2ab-c3-a0", "endUserId": "tel:+33612345678",
        "referenceCode": "sub-12-c3-a0", "transactionOperationStatus": "Charged",
        "serverReferenceCode": "fr-azur-00000012",
        "resourceURL": "http://sim/fr-azur/payment/v1/tel%3A%2B33612345678/transactions/amount/"
                       "fr-azur-00000012",
        "paymentAmount": {"chargingInformation": {"amount": "4.99", "currency": "EUR"}}}}),
    "oneapi-bare-and-form": "clientCorrelator=sub-12-c3-a0&endUserId=447700900123"
                            "&amount=4.99&currency=GBP&referenceCode=sub-123456789-c1-a0",
    "oneapi-error": json.dumps({"requestError": {"policyException": {
        "messageId": "POL1000", "text": "insufficient credit on 447700900123"}}}),
    "parlayx": (
        '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
        "<soapenv:Body><ns0:chargeAmount><ns0:endUserIdentifier>tel:+254712345678"
        "</ns0:endUserIdentifier><ns0:referenceCode>sub-12-c3-a0</ns0:referenceCode>"
        "<msisdn>254712345678</msisdn><amount>50.00</amount></ns0:chargeAmount>"
        "<soapenv:Fault><faultcode>soapenv:Server.SVC0270</faultcode><faultstring>"
        "SVC0270: refund refused for 254712345678 ref ke-safari-00000003</faultstring>"
        "</soapenv:Fault></soapenv:Body></soapenv:Envelope>"),
    "camara-reply": json.dumps({
        "paymentId": "mx-sol-pay-00000001", "paymentStatus": "denied",
        "paymentCreationDate": "2024-05-01T12:34:56.123456+00:00",
        "denialReason": "insufficient balance on 5215512345678",
        "amountTransaction": {"clientCorrelator": "dev-s12-k7f3q9x2ab-c3-a0",
                              "referenceCode": "sub-12-c3-a0", "phoneNumber": "+525512345678",
                              "paymentAmount": {"chargingInformation": {
                                  "amount": 49.0, "currency": "MXN"}}}}),
    "camara-event": json.dumps({
        "id": "6f1c2a9e-0b7d-4c1e-9a53-1d2b3c4d5e6f", "specversion": "1.0",
        "source": "https://operator.example/carrier-billing",
        "type": "org.camaraproject.carrier-billing.v0.payment-denied",
        "time": "2024-05-01T12:34:56.123456+00:00",
        "data": {"paymentId": "mx-sol-pay-00000001", "status": "denied",
                 "denialReason": "line 525512345678 barred"}}),
    "callback-aggregator": json.dumps({
        "order_id": "sub-12-c3-a0", "msisdn": "+4915112345678", "amount": "4.99",
        "currency": "EUR", "payment_id": "de-nord-cb-00000004", "status": "failed",
        "reason": "insufficient_funds (subscriber 4915112345678)"}),
    "polling-aggregator": json.dumps({
        "transaction_id": "uk-bolt-pa-00000007", "merchant_tx_id": "dev-s12-k7f3q9x2ab-c3-a0",
        "msisdn": "447700900123", "status": "failed", "reason_code": "INSUFFICIENT_FUNDS"}),
    "smpp-submit": "submit_sm src=84433 dst=+16175551234 registered_delivery=1 coding=GSM-7 "
                   "segments=1 user_ref=4242 | submit_sm_resp ESME_ROK message_id=9f8e7d6c5b4a3928",
    "smpp-receipt": "deliver_sm source_addr=16175551234 destination_addr=84433 "
                    "short_message='id:9f8e7d6c5b4a3928 sub:001 dlvrd:001 submit date:2405011234 "
                    "done date:2405011235 stat:DELIVRD err:000 text:Abo 4.99'",
}
SURVIVORS = (*KEYS[:3], *REFERENCES, TIMESTAMPS[0], "ke-safari-00000003", "mx-sol-pay-00000001",
             "de-nord-cb-00000004", "9f8e7d6c5b4a3928", "2405011234", "2405011235", "84433",
             "4242", "4.99", "50.00", "POL1000", "SVC0270", "6f1c2a9e-0b7d-4c1e-9a53-1d2b3c4d5e6f")


@pytest.mark.parametrize("family", sorted(FAMILY_EXCHANGES))
def test_family_replies_keep_no_full_msisdn(family: str) -> None:
    text = FAMILY_EXCHANGES[family]
    clean = redact(text)
    assert _full_numbers_left(clean) == [], clean
    assert "525512345678" not in clean
    for kept in SURVIVORS:
        if kept in text:
            assert kept in clean, (kept, clean)


def test_bare_candidates_only_reach_phonenumbers_when_they_could_be_numbers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counting(digits: str) -> bool:
        calls.append(digits)
        return looks_like_msisdn(digits)

    monkeypatch.setattr(redaction, "looks_like_msisdn", counting)
    quiet = " ".join((*KEYS, *REFERENCES, *TIMESTAMPS, "HTTP 503", "4.99", "84433",
                      "submit date:2405011234", "id:1234567890"))
    assert redact(quiet) == quiet
    assert calls == []
    redact('{"msisdn": "33612345678"}')
    assert calls == ["33612345678"]


def test_redaction_cost_stays_small() -> None:
    body = json.dumps([json.loads(FAMILY_EXCHANGES["camara-reply"])] * 100)  # a page of 100
    started = time.perf_counter()
    for _ in range(20):
        redact(body)
    per_page = (time.perf_counter() - started) / 20
    assert per_page < 0.05, per_page


# -- CAMARA: the carrier's words are masked before they leave the adapter ------------------------

def test_camara_event_denial_reason_is_redacted() -> None:
    event, key = FAMILY_EXCHANGES["camara-event"], "dev-s12-k7f3q9x2ab-c3-a0"
    report = parse_event(event.encode(), {"authorization": f"Bearer {sink_token('t0k', key)}"},
                         "t0k", key)
    assert report.outcome == "rejected"
    assert "525512345678" not in report.message
    assert report.message == "line 52********78 barred"


def test_camara_denial_with_a_written_number_is_redacted() -> None:
    result = outcome_of("denied", "mx-sol-pay-00000001",
                        "insufficient balance for tel:+525512345678 / 5215512345678")
    assert result.outcome.value == "insufficient_funds"
    assert "525512345678" not in result.message and "5215512345678" not in result.message
    assert result.message.startswith("insufficient balance for tel:+52********78")


def test_camara_error_message_is_redacted() -> None:
    body = {"status": 403, "code": "CARRIER_BILLING.PAYMENT_DENIED",
            "message": "payment denied: 447700900123 has spending limit reached"}
    reply = HttpReply(403, json.dumps(body), httpx.Headers())
    result = map_created(reply, "paymentId", "paymentStatus")
    assert result.carrier_code == "CARRIER_BILLING.PAYMENT_DENIED"
    assert result.message == "payment denied: 44********23 has spending limit reached"
    rejected = HttpReply(400, json.dumps({"status": 400, "code": "INVALID_ARGUMENT",
                                          "message": "invalid phoneNumber 33612345678"}),
                         httpx.Headers())
    assert "33612345678" not in map_created(rejected, "paymentId", "paymentStatus").message


def test_per_operation_sink_credentials_are_removed() -> None:
    """The CAMARA sink credential is derived per operation (not a configured secret): the
    request body recorded as an interaction must not carry it."""
    from carriers.camara import sink_token

    token = sink_token("callback-secret", "dev-abc-c1-a0")
    body = ('{"sink": "https://app/callbacks/za-protea/dev-abc-c1-a0", "sinkCredential": '
            f'{{"credentialType": "ACCESSTOKEN", "accessToken": "{token}"}}}}')
    assert token not in redact(body)
    assert '"accessToken": "***"' in redact(body)
