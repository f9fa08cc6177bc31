"""The game backend simulator over real sockets: idempotent grants, conflicts, revocation,
authentication and every injected fault."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from simulators.game_backend import GameBackend, start_game_backend
from tests.postgres import free_port

TOKEN = "test-game-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def backend() -> AsyncIterator[httpx.AsyncClient]:
    runner, port = await start_game_backend(GameBackend(TOKEN))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH,
                                 timeout=5.0) as client:
        yield client
    await runner.cleanup()


def _grant(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"grant_id": f"g-{uuid.uuid4().hex[:10]}", "subscriber_ref": "sub-1",
                            "sku": "GP-STD", "until": "2030-01-01T00:00:00+00:00"}
    return {**body, **changes}


async def _fault(client: httpx.AsyncClient, **body: Any) -> None:
    (await client.post("/_control/faults", json=body)).raise_for_status()


async def _books(client: httpx.AsyncClient) -> dict[str, Any]:
    books: dict[str, Any] = (await client.get("/_control/books")).json()
    return books


async def test_a_grant_repeated_is_the_same_entitlement(backend: httpx.AsyncClient) -> None:
    body = _grant()
    first = await backend.post("/entitlements", json=body)
    # the same moment spelled differently is the same terms
    again = await backend.post("/entitlements", json={**body, "until": "2030-01-01T00:00:00Z"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["entitlement_id"] == first.json()["entitlement_id"]
    looked_up = await backend.get(f"/entitlements/{body['grant_id']}")
    assert looked_up.json()["entitlement_id"] == first.json()["entitlement_id"]
    books = await _books(backend)
    assert len(books["entitlements"]) == 1
    assert books["grant_requests"] == {body["grant_id"]: 2}


async def test_a_grant_id_reused_for_other_terms_is_refused(backend: httpx.AsyncClient) -> None:
    body = _grant(quantity=100, until=None)
    del body["until"]
    assert (await backend.post("/entitlements", json=body)).status_code == 201
    for change in ({"quantity": 550}, {"sku": "GEM-550"}, {"subscriber_ref": "sub-2"}):
        conflict = await backend.post("/entitlements", json={**body, **change})
        assert conflict.status_code == 409
        assert conflict.json()["error"] == "grant_id_conflict"
    [kept] = (await _books(backend))["entitlements"]
    assert (kept["quantity"], kept["sku"], kept["subscriber_ref"]) == (100, body["sku"], "sub-1")


async def test_requests_without_the_token_or_with_bad_terms_grant_nothing(
        backend: httpx.AsyncClient) -> None:
    no_token = await backend.post("/entitlements", json=_grant(), headers={"Authorization": ""})
    wrong = await backend.post("/entitlements", json=_grant(),
                               headers={"Authorization": "Bearer nope"})
    both = await backend.post("/entitlements", json=_grant(quantity=1))
    naive = await backend.post("/entitlements", json=_grant(until="2030-01-01T00:00:00"))
    zero = await backend.post("/entitlements", json={**_grant(quantity=0), "until": None})
    assert (no_token.status_code, wrong.status_code) == (401, 401)
    assert (both.status_code, naive.status_code, zero.status_code) == (400, 400, 400)
    assert (await _books(backend))["entitlements"] == []


async def test_revocation_is_idempotent_and_unknown_grants_are_not_found(
        backend: httpx.AsyncClient) -> None:
    body = _grant()
    granted = (await backend.post("/entitlements", json=body)).json()
    first = await backend.delete(f"/entitlements/{body['grant_id']}")
    second = await backend.delete(f"/entitlements/{body['grant_id']}")
    assert first.status_code == second.status_code == 200
    assert first.json()["status"] == "revoked"
    assert second.json()["revoked_at"] == first.json()["revoked_at"]
    assert second.json()["entitlement_id"] == granted["entitlement_id"]
    looked_up = (await backend.get(f"/entitlements/{body['grant_id']}")).json()
    assert looked_up["status"] == "revoked"
    assert (await backend.delete("/entitlements/never-granted")).status_code == 404
    assert (await backend.get("/entitlements/never-granted")).status_code == 404


async def test_a_closed_account_is_refused_for_good_but_earlier_grants_replay(
        backend: httpx.AsyncClient) -> None:
    earlier = _grant(subscriber_ref="closing")
    assert (await backend.post("/entitlements", json=earlier)).status_code == 201
    await _fault(backend, kind="refuse", subscriber_ref="closing")
    for _ in range(2):
        refused = await backend.post("/entitlements", json=_grant(subscriber_ref="closing"))
        assert refused.status_code == 422 and refused.json()["error"] == "account_closed"
    assert (await backend.post("/entitlements", json=earlier)).status_code == 200
    assert (await backend.post("/entitlements", json=_grant())).status_code == 201
    assert len((await _books(backend))["entitlements"]) == 2


async def test_unavailable_answers_act_on_nothing_then_recover(backend: httpx.AsyncClient) -> None:
    await _fault(backend, kind="unavailable", count=2)
    body = _grant()
    statuses = [(await backend.post("/entitlements", json=body)).status_code for _ in range(3)]
    assert statuses == [503, 503, 201]
    assert len((await _books(backend))["entitlements"]) == 1


async def test_a_dropped_answer_hides_a_grant_that_happened(backend: httpx.AsyncClient) -> None:
    await _fault(backend, kind="drop")
    body = _grant()
    with pytest.raises(httpx.RemoteProtocolError):
        await backend.post("/entitlements", json=body)
    found = await backend.get(f"/entitlements/{body['grant_id']}")
    assert found.status_code == 200 and found.json()["status"] == "active"


async def test_a_slow_answer_times_the_caller_out_and_grants_later(
        backend: httpx.AsyncClient) -> None:
    await _fault(backend, kind="slow", delay_seconds=0.6)
    body = _grant()
    with pytest.raises(httpx.ReadTimeout):
        await backend.post("/entitlements", json=body, timeout=0.2)
    await asyncio.sleep(0.6)
    assert (await backend.get(f"/entitlements/{body['grant_id']}")).status_code == 200


async def test_faults_can_target_one_subscriber_and_one_operation(
        backend: httpx.AsyncClient) -> None:
    body = _grant()
    await backend.post("/entitlements", json=body)
    await _fault(backend, kind="unavailable", operation="revoke", subscriber_ref="sub-1")
    assert (await backend.post("/entitlements", json=_grant())).status_code == 201
    assert (await backend.delete(f"/entitlements/{body['grant_id']}")).status_code == 503
    assert (await backend.delete(f"/entitlements/{body['grant_id']}")).status_code == 200
    bad = await backend.post("/_control/faults", json={"kind": "explode"})
    assert bad.status_code == 400


async def test_the_entry_point_serves_on_the_port_given() -> None:
    port = free_port()
    env = {**os.environ, "CB_GAME_BACKEND_TOKEN": "from-env"}
    process = subprocess.Popen(
        [sys.executable, "-m", "simulators.game_backend", "--port", str(port)],
        cwd=Path(__file__).resolve().parent.parent, env=env, stdout=subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(100):
                try:
                    await client.get("/_control/books")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            granted = await client.post("/entitlements", json=_grant(),
                                        headers={"Authorization": "Bearer from-env"})
            assert granted.status_code == 201
    finally:
        process.terminate()
        assert process.wait(timeout=5) == 0
