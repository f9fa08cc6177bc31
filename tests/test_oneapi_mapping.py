"""OneAPI reply mapping: only explicit answers are final, everything else is settled later."""

import json

import httpx
import pytest

from carriers.base import Outcome
from carriers.http import HttpReply
from carriers.oneapi import map_reply


def reply(status: int, body: object, headers: dict[str, str] | None = None) -> HttpReply:
    text = body if isinstance(body, str) else json.dumps(body)
    return HttpReply(status, text, httpx.Headers(headers or {}))


def error(kind: str, message_id: str) -> dict[str, object]:
    return {"requestError": {kind: {"messageId": message_id, "text": "t"}}}


def test_charged_with_reference_succeeds() -> None:
    body = {"amountTransaction": {"transactionOperationStatus": "Charged",
                                  "serverReferenceCode": "abc"}}
    result = map_reply(reply(201, body), "Charged")
    assert (result.outcome, result.carrier_reference) == (Outcome.SUCCEEDED, "abc")


@pytest.mark.parametrize(("status", "body", "outcome"), [
    (400, error("policyException", "POL1000"), Outcome.INSUFFICIENT_FUNDS),
    (400, error("policyException", "POL1001"), Outcome.REJECTED),
    (400, error("policyException", "POL9999"), Outcome.UNKNOWN),  # nobody listed it
    (400, error("serviceException", "SVC0270"), Outcome.REJECTED),
    (409, error("serviceException", "SVC0005"), Outcome.UNKNOWN),
    (400, error("serviceException", "SVC4242"), Outcome.UNKNOWN),
    (401, {"message": "bad credentials"}, Outcome.TRANSIENT),  # an operator fixes it
    (401, error("policyException", "POL0001"), Outcome.TRANSIENT),  # whatever the body says
    (503, "busy", Outcome.TRANSIENT),
    (500, "oops", Outcome.UNKNOWN),
    (201, "<html>not json</html>", Outcome.UNKNOWN),
    (201, {"amountTransaction": {"transactionOperationStatus": "Processing"}}, Outcome.UNKNOWN),
    (201, {"amountTransaction": {"transactionOperationStatus": "Refunded",
                                 "serverReferenceCode": "x"}}, Outcome.UNKNOWN),
])
def test_reply_outcomes(status: int, body: object, outcome: Outcome) -> None:
    assert map_reply(reply(status, body), "Charged").outcome is outcome


def test_retry_after_is_passed_on() -> None:
    result = map_reply(reply(429, "slow down", {"Retry-After": "7"}), "Charged")
    assert (result.outcome, result.retry_after_seconds) == (Outcome.TRANSIENT, 7.0)
