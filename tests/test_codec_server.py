"""The codec server over a real socket: decode and encode, bearer token, CORS for the UI, and
``python -m codec.server`` as the operator starts it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from google.protobuf import json_format
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload
from temporalio.converter import DataConverter

from codec import AesGcmCodec, codec_from, new_key
from codec.aesgcm import ENCODING, KEY_ID_METADATA
from codec.server import codec_app, main, start_codec_server
from settings import PROJECT_ROOT
from tests.postgres import free_port

TOKEN = "s3cret-operator-token"
UI = "http://localhost:8233"
KEY_A, KEY_B = new_key(), new_key()
VALUE = {"msisdn": "+33612345678", "reference": "fr-azur-00000042", "amount_minor": 499}


def make_codec(current: str, **keys: str) -> AesGcmCodec:
    class Keys:
        codec_keys = {k: SecretStr(v) for k, v in keys.items()}
        codec_current_key = current
    codec = codec_from(Keys())
    assert codec is not None
    return codec


def as_json(payloads: list[Payload]) -> dict[str, Any]:
    return {"payloads": [json_format.MessageToDict(p) for p in payloads]}


def from_json(body: dict[str, Any]) -> list[Payload]:
    return [json_format.ParseDict(p, Payload()) for p in body["payloads"]]


async def serve(app: web.Application) -> AsyncIterator[httpx.AsyncClient]:
    runner, port = await start_codec_server(app)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            yield http
    finally:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve(codec_app(make_codec("a", a=KEY_A), TOKEN, [UI])):
        yield client


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_decodes_what_the_codec_encoded(http: httpx.AsyncClient) -> None:
    plain = await DataConverter.default.encode([VALUE, "second"])
    sealed = await make_codec("a", a=KEY_A).encode(plain)
    response = await http.post("/decode", json=as_json(sealed),
                               headers={**AUTH, "X-Namespace": "default"})
    assert response.status_code == 200
    assert from_json(response.json()) == plain
    assert await DataConverter.default.decode(from_json(response.json()), [dict, str]) == [
        VALUE, "second"]


async def test_encodes_for_the_ui_and_passes_plain_payloads_through(
        http: httpx.AsyncClient) -> None:
    plain = await DataConverter.default.encode([VALUE])
    encoded = from_json((await http.post("/encode", json=as_json(plain), headers=AUTH)).json())
    assert encoded[0].metadata["encoding"] == ENCODING
    assert b"+33612345678" not in encoded[0].SerializeToString()
    assert await make_codec("a", a=KEY_A).decode(encoded) == plain
    # a history written before encryption decodes unchanged
    passed = await http.post("/decode", json=as_json(plain), headers=AUTH)
    assert from_json(passed.json()) == plain
    empty = await http.post("/decode", json={"payloads": []}, headers=AUTH)
    assert empty.json() == {"payloads": []}


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", TOKEN, f"Basic {TOKEN}"])
async def test_wrong_or_missing_bearer_token_is_401_and_reveals_nothing(
        http: httpx.AsyncClient, authorization: str | None) -> None:
    sealed = await make_codec("a", a=KEY_A).encode(await DataConverter.default.encode([VALUE]))
    headers = {"Origin": UI} | ({"Authorization": authorization} if authorization else {})
    response = await http.post("/decode", json=as_json(sealed), headers=headers)
    assert response.status_code == 401
    assert "+33612345678" not in response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    # the browser may read the refusal, so the UI can say why
    assert response.headers["Access-Control-Allow-Origin"] == UI


async def test_cors_preflight_answers_the_ui_origin_only(http: httpx.AsyncClient) -> None:
    preflight = {"Origin": UI, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type,x-namespace"}
    response = await http.options("/decode", headers=preflight)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == UI
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "x-namespace"} <= allowed

    stranger = await http.options("/decode", headers={**preflight, "Origin": "https://evil.example"})
    assert stranger.status_code == 403
    assert "Access-Control-Allow-Origin" not in stranger.headers

    answered = await http.post("/decode", json={"payloads": []}, headers={**AUTH, "Origin": UI})
    assert answered.headers["Access-Control-Allow-Origin"] == UI
    other = await http.post("/decode", json={"payloads": []},
                            headers={**AUTH, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


async def test_refuses_bad_documents_and_unknown_keys_with_400(http: httpx.AsyncClient) -> None:
    assert (await http.post("/decode", content=b"not json", headers=AUTH)).status_code == 400
    assert (await http.post("/decode", json={"payloads": [{"data": 5}]},
                            headers=AUTH)).status_code == 400
    foreign = await make_codec("z", z=KEY_B).encode([Payload(data=b"x")])
    response = await http.post("/decode", json=as_json(foreign), headers=AUTH)
    assert response.status_code == 400
    assert "'z'" in response.json()["error"]


async def test_rotation_through_the_server_old_payloads_decode_new_ones_use_the_new_key() -> None:
    plain = await DataConverter.default.encode([VALUE])
    old = await make_codec("a", a=KEY_A).encode(plain)
    async for http in serve(codec_app(make_codec("b", a=KEY_A, b=KEY_B))):  # no token: loopback
        assert from_json((await http.post("/decode", json=as_json(old))).json()) == plain
        new = from_json((await http.post("/encode", json=as_json(plain))).json())
        assert new[0].metadata[KEY_ID_METADATA] == b"b"
        assert await make_codec("b", b=KEY_B).decode(new) == plain


def test_refuses_to_start_without_keys_or_exposed_without_a_token(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(PROJECT_ROOT / "tests")  # no .env file is read
    for name in ("CB_CODEC_KEYS", "CB_CODEC_CURRENT_KEY", "CB_CODEC_SERVER_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit, match="no codec keys"):
        main(["--port", "0"])
    monkeypatch.setenv("CB_CODEC_KEYS", json.dumps({"a": KEY_A}))
    with pytest.raises(SystemExit, match="without a bearer token"):
        main(["--host", "0.0.0.0", "--port", "0"])
    monkeypatch.setenv("CB_CODEC_KEYS", json.dumps({"a": KEY_A, "b": KEY_B}))
    with pytest.raises(SystemExit, match="set codec_current_key"):
        main(["--port", "0"])


async def test_python_m_codec_server_serves_the_keys_from_the_environment() -> None:
    port = free_port()
    env = {**os.environ, "CB_CODEC_KEYS": json.dumps({"a": KEY_A, "b": KEY_B}),
           "CB_CODEC_CURRENT_KEY": "b", "CB_CODEC_SERVER_TOKEN": TOKEN,
           "PYTHONPATH": str(PROJECT_ROOT)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "codec.server", "--port", str(port), "--cors-origin", UI,
        env=env, cwd=PROJECT_ROOT / "tests", stderr=asyncio.subprocess.PIPE)
    try:
        sealed = await make_codec("a", a=KEY_A).encode(
            await DataConverter.default.encode([VALUE]))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(100):
                try:
                    response = await http.post("/decode", json=as_json(sealed), headers=AUTH)
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("codec server never listened")
            assert response.status_code == 200
            data = base64.b64decode(response.json()["payloads"][0]["data"])
            assert json.loads(data) == VALUE
            assert (await http.post("/decode", json=as_json(sealed))).status_code == 401
    finally:
        process.terminate()
        await process.wait()
