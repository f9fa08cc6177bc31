"""The delivery activities against the real game backend on a socket and a SQLite database built
by the migrations and the seed: one grant per payment whatever is lost on the way, permanent
refusals for the workflow to refund, and revocation."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities.delivery import DeliveryActivities, DeliveryConfigurationError, DeliveryUncertain
from activities.delivery_messages import DeliveryInput, DeliveryOutput, RevokeInput, delivery_key
from carriers.loader import default_registry
from models import delivery as store
from models.db import make_engine, migrate
from models.delivery import Delivery, DeliveryState
from models.seed import seed_reference_data
from simulators.game_backend import GameBackend, start_game_backend

TOKEN = "delivery-test-token"


@pytest.fixture(scope="module")
def catalogue_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path_factory.mktemp('delivery') / 'delivery.db'}"
    migrate(url)
    engine = make_engine(url)
    seed_reference_data(engine, default_registry())
    yield engine
    engine.dispose()


@dataclass
class Backend:
    url: str
    control: httpx.AsyncClient

    async def fault(self, **body: Any) -> None:
        (await self.control.post("/_control/faults", json=body)).raise_for_status()

    async def books(self) -> dict[str, Any]:
        books: dict[str, Any] = (await self.control.get("/_control/books")).json()
        return books

    async def entitlements(self, grant_id: str) -> list[dict[str, Any]]:
        return [e for e in (await self.books())["entitlements"] if e["grant_id"] == grant_id]

    async def grant_requests(self, grant_id: str) -> int:
        count: int = (await self.books())["grant_requests"].get(grant_id, 0)
        return count


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    runner, port = await start_game_backend(GameBackend(TOKEN))
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url) as control:
        yield Backend(url, control)
    await runner.cleanup()


@pytest.fixture
async def delivery(catalogue_engine: Engine, backend: Backend) -> AsyncIterator[DeliveryActivities]:
    activities = DeliveryActivities(catalogue_engine, backend.url, TOKEN, timeout_seconds=0.4)
    yield activities
    await activities.aclose()


_subscribers = iter(range(10_000, 99_999))


def _input(**changes: Any) -> DeliveryInput:
    subscriber = next(_subscribers)
    fields: dict[str, Any] = dict(
        subscription_id=subscriber, subscriber_id=subscriber, cycle=1,
        idempotency_key=delivery_key(f"dev-{uuid.uuid4().hex[:12]}-c1-a0"),
        product_id="game-pass", country_code="FR", locale="fr_FR",
        price_point_id="fr-azur-pass-monthly", service_seconds=None, paid_minor=499,
        currency="EUR")
    return DeliveryInput(**{**fields, **changes})


def _row(engine: Engine, grant_id: str) -> Delivery:
    with Session(engine) as session:
        row = store.find(session, grant_id)
    assert row is not None
    return row


def _aware(moment: datetime | None) -> datetime:
    assert moment is not None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def test_a_paid_month_is_granted_once_and_replays_answer_from_our_records(
        delivery: DeliveryActivities, backend: Backend, catalogue_engine: Engine) -> None:
    request = _input()
    first = await delivery.deliver_product(request)
    again = await delivery.deliver_product(request)
    assert first.delivered and not first.permanent
    assert first.variant_id == "game-pass-standard-fr_FR-fr-azur-pass-monthly"
    assert again == first
    [held] = await backend.entitlements(request.idempotency_key)
    assert held["entitlement_id"] == first.entitlement_id
    assert held["sku"] == "GP-STANDARD-FR_FR-FR-AZUR-PASS-MONTHLY"
    assert held["subscriber_ref"] == f"dev-{request.subscriber_id}"
    assert await backend.grant_requests(request.idempotency_key) == 1
    row = _row(catalogue_engine, request.idempotency_key)
    assert (row.state, row.sends, row.paid_minor) == (DeliveryState.DELIVERED, 1, 499)
    # a calendar month of access from when it was first asked for
    access = _aware(row.until) - _aware(row.created_at)
    assert timedelta(days=28) <= access <= timedelta(days=31, seconds=1)
    assert datetime.fromisoformat(held["until"]) == _aware(row.until)


async def test_a_dropped_answer_is_found_by_the_retry_and_never_granted_twice(
        delivery: DeliveryActivities, backend: Backend, catalogue_engine: Engine) -> None:
    request = _input()
    await backend.fault(kind="drop")
    with pytest.raises(DeliveryUncertain) as raised:
        await delivery.deliver_product(request)
    assert not raised.value.non_retryable
    assert _row(catalogue_engine, request.idempotency_key).state == DeliveryState.SENDING
    retried = await delivery.deliver_product(request)
    assert retried.delivered
    [held] = await backend.entitlements(request.idempotency_key)
    assert held["entitlement_id"] == retried.entitlement_id
    # the retry looked the grant up instead of asking again
    assert await backend.grant_requests(request.idempotency_key) == 1


async def test_a_timed_out_grant_that_lands_late_is_still_one_grant(
        delivery: DeliveryActivities, backend: Backend) -> None:
    request = _input()
    await backend.fault(kind="slow", delay_seconds=0.8)
    with pytest.raises(DeliveryUncertain):
        await delivery.deliver_product(request)
    # retried while the first request still sleeps at the backend: sent again, same terms
    retried = await delivery.deliver_product(request)
    assert retried.delivered
    await backend.fault(kind="clear")
    held = await backend.entitlements(request.idempotency_key)
    assert [e["entitlement_id"] for e in held] == [retried.entitlement_id]


async def test_a_closed_account_is_a_permanent_refusal(
        delivery: DeliveryActivities, backend: Backend, catalogue_engine: Engine) -> None:
    request = _input()
    await backend.fault(kind="refuse", subscriber_ref=f"dev-{request.subscriber_id}")
    refused = await delivery.deliver_product(request)
    assert refused == DeliveryOutput(False, refused.variant_id, None, "account_closed", True)
    assert (await delivery.deliver_product(request)) == refused
    assert await backend.grant_requests(request.idempotency_key) == 1
    assert await backend.entitlements(request.idempotency_key) == []
    row = _row(catalogue_engine, request.idempotency_key)
    assert (row.state, row.reason) == (DeliveryState.REFUSED, "account_closed")
    # nothing was granted, so nothing is revoked
    revoked = await delivery.revoke_delivery(RevokeInput(request.idempotency_key, "refund"))
    assert (revoked.revoked, revoked.reason) == (False, "never_granted")


async def test_an_unavailable_backend_is_retried_then_granted(
        delivery: DeliveryActivities, backend: Backend) -> None:
    request = _input()
    await backend.fault(kind="unavailable", count=2)
    for _ in range(2):
        with pytest.raises(DeliveryUncertain, match="503"):
            await delivery.deliver_product(request)
    assert (await delivery.deliver_product(request)).delivered
    assert len(await backend.entitlements(request.idempotency_key)) == 1


async def test_a_token_the_backend_refuses_waits_for_a_fix_without_granting(
        catalogue_engine: Engine, backend: Backend) -> None:
    wrong = DeliveryActivities(catalogue_engine, backend.url, "not-the-token", timeout_seconds=0.4)
    request = _input()
    with pytest.raises(DeliveryUncertain, match="401"):
        await wrong.deliver_product(request)
    await wrong.aclose()
    fixed = DeliveryActivities(catalogue_engine, backend.url, TOKEN, timeout_seconds=0.4)
    assert (await fixed.deliver_product(request)).delivered
    await fixed.aclose()


async def test_revoking_after_a_refund_takes_the_grant_back_for_good(
        delivery: DeliveryActivities, backend: Backend, catalogue_engine: Engine) -> None:
    request = _input(product_id="gem-pack", country_code="GB", locale="en_GB",
                     price_point_id="gb-thames-gems-demo", paid_minor=79, currency="GBP")
    delivered = await delivery.deliver_product(request)
    assert delivered.delivered and delivered.variant_id == "gem-pack-100-en_GB-gb-thames-gems-demo"
    first = await delivery.revoke_delivery(RevokeInput(request.idempotency_key, "refund"))
    again = await delivery.revoke_delivery(RevokeInput(request.idempotency_key, "refund"))
    assert first.revoked and first.entitlement_id == delivered.entitlement_id
    assert again == first
    [held] = await backend.entitlements(request.idempotency_key)
    assert (held["status"], held["quantity"]) == ("revoked", 100)
    row = _row(catalogue_engine, request.idempotency_key)
    assert (row.state, row.revoke_reason) == (DeliveryState.REVOKED, "refund")
    # a late replay of the delivery does not grant it again
    replay = await delivery.deliver_product(request)
    assert (replay.delivered, replay.permanent) == (False, True)
    assert await backend.grant_requests(request.idempotency_key) == 1


async def test_a_revocation_before_any_grant_stops_later_attempts(
        delivery: DeliveryActivities, backend: Backend) -> None:
    request = _input()
    await backend.fault(kind="unavailable")
    with pytest.raises(DeliveryUncertain):
        await delivery.deliver_product(request)
    revoked = await delivery.revoke_delivery(RevokeInput(request.idempotency_key, "cancelled"))
    assert (revoked.revoked, revoked.reason) == (False, "never_granted")
    later = await delivery.deliver_product(request)
    assert (later.delivered, later.permanent) == (False, True)
    assert await backend.entitlements(request.idempotency_key) == []
    never = await delivery.revoke_delivery(RevokeInput("dev-unknown-c1-a0-d", "refund"))
    assert (never.revoked, never.reason) == (False, "never_granted")


async def test_a_partial_payment_buys_time_but_no_units(
        delivery: DeliveryActivities, backend: Backend, catalogue_engine: Engine) -> None:
    partial = _input(service_seconds=3600, paid_minor=100)
    assert (await delivery.deliver_product(partial)).delivered
    row = _row(catalogue_engine, partial.idempotency_key)
    assert _aware(row.until) - _aware(row.created_at) <= timedelta(hours=1, seconds=1)
    assert _aware(row.until) - _aware(row.created_at) >= timedelta(minutes=59)
    gems = _input(product_id="gem-pack", price_point_id="fr-azur-gems-once",
                  service_seconds=600, paid_minor=50)
    refused = await delivery.deliver_product(gems)
    assert (refused.delivered, refused.permanent, refused.reason) == (False, True, "partial_payment")
    assert await backend.grant_requests(gems.idempotency_key) == 0


async def test_our_own_mistakes_are_not_retried(
        delivery: DeliveryActivities, backend: Backend, catalogue_engine: Engine) -> None:
    unpaid = _input(paid_minor=0)
    with pytest.raises(DeliveryConfigurationError, match="without a payment") as raised:
        await delivery.deliver_product(unpaid)
    assert raised.value.non_retryable
    with Session(catalogue_engine) as session:
        assert store.find(session, unpaid.idempotency_key) is None

    request = _input()
    assert (await delivery.deliver_product(request)).delivered
    with pytest.raises(DeliveryConfigurationError, match="another delivery"):
        await delivery.deliver_product(_input(idempotency_key=request.idempotency_key))

    # the backend already holds this grant id for other terms
    taken = _input()
    await backend.control.post("/entitlements", headers={"Authorization": f"Bearer {TOKEN}"},
                               json={"grant_id": taken.idempotency_key, "subscriber_ref": "x",
                                     "sku": "GP-STD", "quantity": 1})
    with pytest.raises(DeliveryConfigurationError, match="reused"):
        await delivery.deliver_product(taken)
    with pytest.raises(DeliveryConfigurationError, match="no-such-product"):
        await delivery.deliver_product(_input(product_id="no-such-product"))


# -- through a real worker ----------------------------------------------------------------------

@workflow.defn(sandboxed=False)
class DeliverOnce:
    @workflow.run
    async def run(self, request: DeliveryInput) -> DeliveryOutput:
        result: DeliveryOutput = await workflow.execute_activity(
            "deliver_product", request, result_type=DeliveryOutput,
            start_to_close_timeout=timedelta(seconds=5),
            retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=100),
                                     maximum_attempts=5,
                                     non_retryable_error_types=["ConfigurationError"]))
        return result


async def test_temporal_retries_a_lost_answer_into_one_grant(
        temporal_env: WorkflowEnvironment, delivery: DeliveryActivities, backend: Backend,
        tmp_path: Path) -> None:
    request = _input()
    await backend.fault(kind="drop")
    queue = f"delivery-{uuid.uuid4()}"
    async with Worker(temporal_env.client, task_queue=queue, workflows=[DeliverOnce],
                      activities=delivery.all(), workflow_runner=UnsandboxedWorkflowRunner()):
        result = await temporal_env.client.execute_workflow(
            DeliverOnce.run, request, id=f"deliver-{uuid.uuid4()}", task_queue=queue)
    assert result.delivered and result.entitlement_id
    [held] = await backend.entitlements(request.idempotency_key)
    assert held["entitlement_id"] == result.entitlement_id
    assert await backend.grant_requests(request.idempotency_key) == 1
