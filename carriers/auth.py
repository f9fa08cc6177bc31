"""Authentication schemes shared by HTTP adapters, as httpx.Auth flows."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncGenerator, Generator

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


class TokenError(Exception):
    """No token could be had: the request was never sent."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class OAuth2ClientCredentials(httpx.Auth):
    """Client-credentials grant. The token is cached and refreshed ``refresh_margin`` seconds
    before it expires; one refresh at a time, and once more if the carrier answers 401."""

    def __init__(self, token_url: str, client_id: str, client_secret: str,
                 refresh_margin: float = 30.0, timeout: float = 10.0) -> None:
        self._token_url = token_url
        self._credentials = (client_id, client_secret)
        self._margin = refresh_margin
        self._timeout = timeout
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.tokens_fetched = 0

    async def _fetch(self) -> None:
        try:
            async with httpx.AsyncClient(timeout=self._timeout) as client:
                reply = await client.post(self._token_url, auth=self._credentials,
                                          data={"grant_type": "client_credentials"})
        except httpx.HTTPError as exc:
            raise TokenError(f"token endpoint unreachable: {exc}", permanent=False) from None
        if reply.status_code in (400, 401, 403):
            raise TokenError(f"token refused: HTTP {reply.status_code}", permanent=True)
        if reply.status_code != 200:
            raise TokenError(f"token endpoint answered HTTP {reply.status_code}", permanent=False)
        try:
            body = reply.json()
            self._token = str(body["access_token"])
            lifetime = float(body.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            raise TokenError("malformed token response", permanent=False) from None
        self._expires_at = time.monotonic() + lifetime
        self.tokens_fetched += 1

    async def _valid_token(self, stale: str | None = None) -> str:
        async with self._lock:
            expired = time.monotonic() >= self._expires_at - self._margin
            if self._token is None or expired or self._token == stale:
                await self._fetch()
            assert self._token is not None
            return self._token

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self._valid_token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            token = await self._valid_token(stale=token)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request


def hmac_signature(secret: str, method: str, path: str, timestamp: str, body: bytes) -> str:
    message = b"\n".join([method.upper().encode(), path.encode(), timestamp.encode(), body])
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


class HmacRequestSigner(httpx.Auth):
    """``X-API-Key`` plus an HMAC-SHA256 ``X-Signature`` over method, path, timestamp and body."""

    requires_request_body = True

    def __init__(self, api_key: str, secret: str) -> None:
        self._api_key = api_key
        self._secret = secret

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        timestamp = str(int(time.time()))
        request.headers["X-API-Key"] = self._api_key
        request.headers["X-Timestamp"] = timestamp
        request.headers["X-Signature"] = hmac_signature(
            self._secret, request.method, request.url.raw_path.decode(), timestamp,
            request.content)
        yield request


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class JwtBodySigner(httpx.Auth):
    """A short-lived RS256 JWT per request whose ``body_sha256`` claim binds it to the body."""

    requires_request_body = True

    def __init__(self, merchant_id: str, private_key_pem: str, lifetime_seconds: int = 300) -> None:
        try:
            key = serialization.load_pem_private_key(private_key_pem.encode(), None)
        except (ValueError, TypeError):
            raise ValueError("the secret is not a PEM private key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("RS256 needs an RSA private key")
        self._key = key
        self._merchant_id = merchant_id
        self._lifetime = lifetime_seconds

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        now = int(time.time())
        claims = {"iss": self._merchant_id, "iat": now, "exp": now + self._lifetime,
                  "jti": secrets.token_hex(8), "body_sha256": body_digest(request.content)}
        token = jwt.encode(claims, self._key, algorithm="RS256")
        request.headers["Authorization"] = f"Bearer {token}"
        yield request


def callback_signature(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
