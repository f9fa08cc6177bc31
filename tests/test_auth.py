"""Authentication flows against the simulators: OAuth2 token caching and refresh, and the
RS256 JWT bound to the request body."""

from __future__ import annotations

import json
import random
import time

import httpx

from carriers.auth import JwtBodySigner, OAuth2ClientCredentials
from carriers.base import ChargeRequest, Outcome
from carriers.factory import build_adapter
from carriers.http import discard_interaction
from carriers.loader import default_registry
from carriers.numbers import sample_msisdn
from settings import Settings
from tests.conftest import Simulator


async def test_oauth2_token_is_cached_refreshed_before_expiry_and_after_a_401(
    settings: Settings, simulator: Simulator
) -> None:
    registry = default_registry()
    carrier = registry.carriers["de-rheinfunk"]
    adapter = build_adapter(carrier, settings, discard_interaction)
    auth = adapter._transport._client.auth  # type: ignore[attr-defined]
    assert isinstance(auth, OAuth2ClientCredentials)
    msisdn = sample_msisdn(carrier, registry, random.Random(21))
    rng = random.Random(22)

    async def charge() -> Outcome:
        request = ChargeRequest(idempotency_key=f"oauth-{rng.random()}", msisdn=msisdn,
                                amount_minor=599, currency="EUR", description="Game Pass",
                                reference_code="O1")
        return (await adapter.charge(request)).outcome

    try:
        assert [await charge() for _ in range(3)] == [Outcome.SUCCEEDED] * 3
        assert auth.tokens_fetched == 1
        auth._expires_at = time.monotonic() + 10  # inside the 30 s refresh margin
        assert await charge() is Outcome.SUCCEEDED
        assert auth.tokens_fetched == 2
        simulator.core.tokens.clear()  # the carrier forgets every token: we get a 401
        assert await charge() is Outcome.SUCCEEDED
        assert auth.tokens_fetched == 3
    finally:
        await adapter.aclose()


async def test_jwt_binds_the_body(settings: Settings, simulator: Simulator) -> None:
    carrier = default_registry().carriers["es-cobromovil"]
    signer = JwtBodySigner(carrier.auth.username,
                           settings.carrier_secrets[carrier.auth.secret_ref].get_secret_value())
    url = f"{simulator.url}/es-cobromovil/api/payments"
    body = {"order_id": "jwt-1", "msisdn": "+34612345678", "amount": "4.99", "currency": "EUR",
            "callback_url": f"{settings.callback_base_url}/callbacks/es-cobromovil"}
    signed = next(signer.auth_flow(httpx.Request("POST", url, json=body)))
    headers = {"Authorization": signed.headers["Authorization"],
               "Content-Type": "application/json"}
    async with httpx.AsyncClient() as client:
        tampered = json.dumps({**body, "amount": "0.01"}).encode()
        refused = await client.post(url, content=tampered, headers=headers)
        assert refused.status_code == 401
        accepted = await client.post(url, content=signed.content, headers=headers)
        assert accepted.status_code == 202
