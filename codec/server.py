"""The codec server: decodes (and encodes) payloads for the Temporal UI and the ``temporal`` CLI,
so an authorised operator reads what the platform's histories hold in plain text.

Protocol (the UI's and ``temporal --codec-endpoint``'s): ``POST /decode`` and ``POST /encode``
with ``{"payloads": [<Payload as proto JSON>, ...]}``, answered with the same shape. CORS
answers the UI's origins (``--cors-origin``, default the dev server's UI on port 8233).

Run: ``python -m codec.server --port 8081``. Keys come from ``CB_CODEC_KEYS`` and
``CB_CODEC_CURRENT_KEY`` (as for the worker); a bearer token from ``CB_CODEC_SERVER_TOKEN``
is then required of every request (the CLI sends it with
``--codec-auth "Bearer <token>"``). Without a token the server only binds a loopback address.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.converter import PayloadCodec

from codec import codec_from
from codec.aesgcm import CodecError

DEFAULT_ORIGINS = ("http://localhost:8233", "http://127.0.0.1:8233")
# headers the UI and the CLI send: the UI names the namespace it shows
ALLOWED_HEADERS = "Authorization, Content-Type, X-Namespace"
MAX_BODY_BYTES = 8 * 1024 * 1024

log = logging.getLogger("codec.server")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class CodecServerSettings(BaseSettings):
    """The codec server's own settings, from the same ``CB_`` environment as the worker's."""

    model_config = SettingsConfigDict(env_prefix="CB_", env_file=".env",
                                      env_file_encoding="utf-8", extra="ignore")

    codec_keys: dict[str, SecretStr] = Field(default_factory=dict)
    codec_current_key: str | None = None
    codec_server_token: SecretStr | None = None
    codec_cors_origins: list[str] = Field(default_factory=lambda: list(DEFAULT_ORIGINS))


def codec_app(codec: PayloadCodec, token: str | None = None,
              origins: Collection[str] = DEFAULT_ORIGINS,
              max_body_bytes: int = MAX_BODY_BYTES) -> web.Application:
    """The aiohttp application: ``token`` None serves anyone who reaches the socket."""
    allowed = frozenset(o.rstrip("/") for o in origins)
    expected = f"Bearer {token}".encode() if token else None

    def cors_headers(request: web.Request) -> dict[str, str]:
        origin = request.headers.get("Origin", "")
        if origin.rstrip("/") not in allowed:
            return {}
        return {"Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Credentials": "true",
                "Vary": "Origin"}

    @web.middleware
    async def cors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = cors_headers(request)
        if request.method == "OPTIONS":  # the browser's preflight: never needs the token
            if not headers:
                return web.Response(status=403, text="origin not allowed")
            return web.Response(status=204, headers={
                **headers, "Access-Control-Allow-Methods": "POST, OPTIONS",
                "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                "Access-Control-Max-Age": "600"})
        if expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response({"error": "unauthorized"}, status=401,
                                         headers={**headers, "WWW-Authenticate": "Bearer"})
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(headers)
            raise
        response.headers.update(headers)
        return response

    def route(transform: Callable[[list[Payload]], Awaitable[list[Payload]]]) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                payloads = json_format.Parse(await request.text(), Payloads())
            except json_format.ParseError as exc:
                return web.json_response({"error": f"not a payloads document: {exc}"},
                                         status=400)
            try:
                result = await transform(list(payloads.payloads))
            except CodecError as exc:
                log.warning("%s refused: %s", request.path, exc)
                return web.json_response({"error": str(exc)}, status=400)
            body: dict[str, Any] = {"payloads": [json_format.MessageToDict(p) for p in result]}
            return web.json_response(body)
        return handle

    async def options(_: web.Request) -> web.StreamResponse:  # answered by the middleware
        raise web.HTTPForbidden()

    app = web.Application(middlewares=[cors_and_auth], client_max_size=max_body_bytes)
    app.router.add_post("/encode", route(codec.encode))
    app.router.add_post("/decode", route(codec.decode))
    app.router.add_route("OPTIONS", "/{tail:.*}", options)
    return app


async def start_codec_server(app: web.Application, host: str = "127.0.0.1",
                             port: int = 0) -> tuple[web.AppRunner, int]:
    """Serves ``app`` on ``host:port`` (0: any free port); returns the runner and the port."""
    sock = socket.create_server((host, port))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    bound: int = sock.getsockname()[1]
    return runner, bound


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m codec.server",
        description="Codec server for the Temporal UI and CLI (decrypts the platform's payloads)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--cors-origin", action="append", dest="origins", metavar="ORIGIN",
                        help="an origin allowed to call (repeatable; default CB_CODEC_CORS_ORIGINS "
                             f"or {', '.join(DEFAULT_ORIGINS)})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = CodecServerSettings()
    try:
        codec = codec_from(settings)
    except CodecError as exc:
        raise SystemExit(f"codec server: {exc}") from None
    if codec is None:
        raise SystemExit("codec server: no codec keys configured (set CB_CODEC_KEYS and "
                         "CB_CODEC_CURRENT_KEY)")
    token = settings.codec_server_token.get_secret_value() if settings.codec_server_token else None
    if token is None and not is_loopback(args.host):
        raise SystemExit(f"codec server: refusing to serve {args.host} without a bearer token "
                         "(set CB_CODEC_SERVER_TOKEN)")
    origins = args.origins or settings.codec_cors_origins
    log.info("codec server on http://%s:%d (keys %s, current %s, origins %s, token %s)",
             args.host, args.port, codec.key_ids, codec.current, json.dumps(origins),
             "required" if token else "not required")
    web.run_app(codec_app(codec, token, origins), host=args.host, port=args.port,
                access_log=None, print=None)


if __name__ == "__main__":
    main()
