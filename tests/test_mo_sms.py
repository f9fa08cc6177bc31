"""Mobile-originated SMS end to end: the SMSC simulator sends a real deliver_sm to the bound
ESME (our SMPP adapter, wired exactly as the worker wires it), the text is stored, routed and
acted on through a real Temporal workflow, and the answer reaches the phone as a free SMS the
books never debit."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, select
from temporalio import workflow
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from carriers.loader import default_registry
from carriers.numbers import sample_msisdn
from carriers.pool import AdapterPool
from carriers.smpp import MobileOriginated, SmppAdapter
from keywords.service import MoService, attach_mobile_originated
from models.inbound_sms import InboundSms, SmsNotice
from models.tables import CarrierInteraction, Subscriber, Subscription
from settings import Settings
from simulators.smsc import Smsc
from starter import SubscriptionClient
from tests.conftest import Simulator
from worker import build_worker, make_adapter_pool
from workflows.subscription import SubscriptionWorkflow

REGISTRY = default_registry()
CARRIER = REGISTRY.carriers["gb-mersey"]
WEEKLY, DEMO = "84422", "84150"
_rng = random.Random(8442)
_taken: set[str] = set()


def create_sms_tables(engine: Engine) -> None:
    """inbound_sms and sms_notice, until a migration creates them (models/inbound_sms.py)."""
    SQLModel.metadata.create_all(engine, tables=[InboundSms.__table__,  # type: ignore[attr-defined]
                                                 SmsNotice.__table__])  # type: ignore[attr-defined]


@dataclass
class Phone:
    """The SMSC's control surface, as a subscriber's phone sees it."""

    smsc: Smsc
    url: str  # the control surface
    endpoint: str  # where ESMEs bind

    async def text(self, msisdn: str, short_code: str, text: str, copies: int = 1,
                   carrier_id: str = CARRIER.id) -> str:
        async with httpx.AsyncClient(base_url=self.url) as http:
            response = await http.post("/_control/mo", json={
                "carrier_id": carrier_id, "msisdn": msisdn, "short_code": short_code,
                "text": text, "copies": copies})
            response.raise_for_status()
            return str(response.json()["message_id"])

    async def received(self, msisdn: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=self.url) as http:
            response = await http.get("/_control/sms", params={"msisdn": msisdn})
            response.raise_for_status()
            return [e for e in response.json() if e["direction"] == "notice"]


@pytest.fixture(scope="module")
async def phone(simulator: Simulator) -> AsyncIterator[Phone]:
    """An SMSC of its own on the simulator's books (its sessions are this module's alone)."""
    smsc = Smsc(simulator.core, {CARRIER.id: {p.short_code: p.amount for p in CARRIER.price_points
                                              if p.short_code}})
    port = await smsc.start()
    control = await smsc.start_control()
    yield Phone(smsc, f"http://127.0.0.1:{control}", f"127.0.0.1:{port}")
    await smsc.stop()


@pytest.fixture(scope="module")
def own_settings(settings: Settings, phone: Phone) -> Settings:
    """This module's SMSC and task queue: its SMPP sessions and workflows are its own, so the
    session's worker (and other modules' adapters) never share its binds."""
    urls = dict(settings.simulator_urls, smpp=phone.endpoint)
    return settings.model_copy(update={"simulator_urls": urls,
                                       "task_queue": f"mo-{uuid.uuid4()}"})


@pytest.fixture(scope="module")
async def own_pool(own_settings: Settings, engine: Engine,
                   temporal_client: Client) -> AsyncIterator[AdapterPool]:
    """The worker's adapter pool (receipts relayed to workflows), on this module's SMSC."""
    create_sms_tables(engine)
    pool = make_adapter_pool(REGISTRY, own_settings, engine, temporal_client)
    yield pool
    await pool.aclose()


@pytest.fixture(scope="module")
async def mo(own_pool: AdapterPool, own_settings: Settings, engine: Engine,
             temporal_client: Client) -> AsyncIterator[MoService]:
    """Wired as the worker wires it, with a worker of its own running the workflows."""
    service = await attach_mobile_originated(temporal_client, engine, REGISTRY, own_pool,
                                             own_settings)
    adapter = own_pool.get(CARRIER.id)
    assert isinstance(adapter, SmppAdapter)
    adapter.start()
    async with build_worker(temporal_client, own_settings, engine, own_pool, REGISTRY):
        yield service
    await service.aclose()


def new_msisdn() -> str:
    return sample_msisdn(CARRIER, REGISTRY, _rng, _taken)


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 8.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition never met"
        await asyncio.sleep(0.05)


def inbound(engine: Engine, msisdn: str) -> list[InboundSms]:
    with Session(engine) as session:
        return list(session.exec(select(InboundSms).where(InboundSms.msisdn == msisdn)
                                 .order_by(InboundSms.id)).all())  # type: ignore[arg-type]


async def handled(engine: Engine, msisdn: str, count: int,
                  seconds: float = 8.0) -> list[InboundSms]:
    async def done() -> bool:
        rows = await asyncio.to_thread(inbound, engine, msisdn)
        return len(rows) >= count and all(r.state != "received" for r in rows)
    await eventually(done, seconds)
    return await asyncio.to_thread(inbound, engine, msisdn)


def subscriptions_of(engine: Engine, msisdn: str) -> list[Subscription]:
    with Session(engine) as session:
        subscriber = session.exec(select(Subscriber).where(Subscriber.msisdn == msisdn)).first()
        if subscriber is None:
            return []
        return list(session.exec(select(Subscription).where(
            Subscription.subscriber_id == subscriber.id)).all())


def deliveries(engine: Engine, message_id: str) -> int:
    """How many times the adapter took this MO from the SMSC (each is recorded)."""
    with Session(engine) as session:
        return len(session.exec(select(CarrierInteraction).where(
            CarrierInteraction.operation == "mo",
            CarrierInteraction.idempotency_key == message_id)).all())


async def debits(simulator: Simulator, msisdn: str) -> list[dict[str, Any]]:
    return [t for t in await simulator.transactions(CARRIER.id, msisdn) if t["kind"] == "charge"]


# -- subscribe, redelivered --------------------------------------------------------------------

async def test_join_starts_one_subscription_workflow_even_when_the_smsc_delivers_it_twice(
        mo: MoService, phone: Phone, engine: Engine, client: SubscriptionClient,
        simulator: Simulator) -> None:
    msisdn = new_msisdn()
    message_id = await phone.text(msisdn, WEEKLY, "  join ", copies=2)
    rows = await handled(engine, msisdn, 1)
    await eventually(lambda: asyncio.to_thread(lambda: deliveries(engine, message_id) == 2))
    rows = await asyncio.to_thread(inbound, engine, msisdn)
    assert len(rows) == 1 and rows[0].action == "subscribe" and rows[0].state == "handled"
    subscriptions = await asyncio.to_thread(subscriptions_of, engine, msisdn)
    assert [s.price_point_id for s in subscriptions] == ["gb-mersey-pass-weekly"]
    subscription_id = subscriptions[0].id
    assert subscription_id is not None
    assert rows[0].outcome == f"started subscription-{subscription_id}"
    description = await client.handle(subscription_id).describe()
    assert description.workflow_type == "SubscriptionWorkflow"
    # (the welcome, or the opt-in PIN, is the workflow's to send)
    # JOIN again: no second subscription, answered "already subscribed"
    await phone.text(msisdn, WEEKLY, "PLAY")
    rows = await handled(engine, msisdn, 2)
    assert rows[1].outcome == "already subscribed"
    assert len(await asyncio.to_thread(subscriptions_of, engine, msisdn)) == 1
    answers = [n for n in await phone.received(msisdn) if n["text"].startswith("You already")]
    assert [(a["short_code"], a["text"]) for a in answers] == [(WEEKLY, (
        "You already subscribe to Game Pass, 3.00 GBP. To stop, text STOP to 84422."))]
    await client.cancel_subscription(subscription_id)


# -- stop --------------------------------------------------------------------------------------

async def test_stop_cancels_the_subscription_and_confirms(
        mo: MoService, phone: Phone, engine: Engine, client: SubscriptionClient) -> None:
    msisdn = new_msisdn()
    await phone.text(msisdn, WEEKLY, "Join")
    await handled(engine, msisdn, 1)
    [subscription] = await asyncio.to_thread(subscriptions_of, engine, msisdn)
    assert subscription.id is not None
    await phone.text(msisdn, WEEKLY, "stop all")
    rows = await handled(engine, msisdn, 2)
    assert rows[1].action == "stop" and rows[1].outcome == f"cancelled [{subscription.id}]"
    state = await client.handle(subscription.id).query(SubscriptionWorkflow.state)
    assert state.status == "cancelled"
    notices = await phone.received(msisdn)
    assert notices[-1]["text"] == ("You have left Game Pass and will not be charged again. "
                                   "Help: 0800 555 0100")
    # a second STOP: nothing left to cancel, still confirmed
    await phone.text(msisdn, WEEKLY, "ARRÊT")
    rows = await handled(engine, msisdn, 3)
    assert rows[2].outcome == "nothing to cancel"
    assert len(await phone.received(msisdn)) == len(notices) + 1


# -- help and the unknown ------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["HELP", "info please", "what is this?"])
async def test_help_and_unknown_texts_are_answered_with_help_once(
        mo: MoService, phone: Phone, engine: Engine, simulator: Simulator, text: str) -> None:
    msisdn = new_msisdn()
    message_id = await phone.text(msisdn, DEMO, text, copies=2)
    rows = await handled(engine, msisdn, 1)
    await eventually(lambda: asyncio.to_thread(lambda: deliveries(engine, message_id) == 2))
    assert len(await asyncio.to_thread(inbound, engine, msisdn)) == 1
    assert rows[0].action == ("unknown" if text.startswith("what") else "help")
    answers = await phone.received(msisdn)
    assert [(a["short_code"], a["text"]) for a in answers] == [
        (DEMO, "Game Pass: 1.50 GBP. To stop, text STOP to 84150. Support 0800 555 0100")]
    assert await debits(simulator, msisdn) == []  # free to the subscriber


async def test_a_ucs2_text_is_decoded(mo: MoService, phone: Phone, engine: Engine) -> None:
    msisdn = new_msisdn()
    await phone.text(msisdn, DEMO, "ヘルプ 😀")
    [row] = await handled(engine, msisdn, 1)
    assert row.text == "ヘルプ 😀" and row.action == "unknown"


# -- opt-in PIN ----------------------------------------------------------------------------------

@workflow.defn(name="OptInProbe")
class OptInProbe:
    """Stands in for a subscription awaiting its code: takes confirm_opt_in(pin) like the
    real one, accepting 4821 only."""

    def __init__(self) -> None:
        self.pins: list[str] = []
        self.confirmed = False

    @workflow.run
    async def run(self) -> list[str]:
        await workflow.wait_condition(lambda: self.confirmed)
        return self.pins

    @workflow.update(name="confirm_opt_in")
    def confirm_opt_in(self, pin: str) -> str:
        self.pins.append(pin)
        if pin != "4821":
            raise ApplicationError("the code does not match", type="WrongCode")
        self.confirmed = True
        return "active"


def pending_subscription(engine: Engine, msisdn: str) -> int:
    with Session(engine) as session:
        subscriber = Subscriber(msisdn=msisdn, carrier_id=CARRIER.id, timezone=CARRIER.timezone,
                                locale="en_GB")
        session.add(subscriber)
        session.flush()
        assert subscriber.id is not None
        subscription = Subscription(subscriber_id=subscriber.id, product_id="game-pass",
                                    price_point_id="gb-mersey-pass-weekly")
        subscription.status = "pending_opt_in"  # type: ignore[assignment]
        session.add(subscription)
        session.commit()
        assert subscription.id is not None
        return subscription.id


async def test_a_pin_goes_to_the_subscription_awaiting_it(
        mo: MoService, phone: Phone, engine: Engine, temporal_env: WorkflowEnvironment) -> None:
    msisdn = new_msisdn()
    subscription_id = await asyncio.to_thread(pending_subscription, engine, msisdn)
    queue = f"probe-{uuid.uuid4()}"
    async with Worker(temporal_env.client, task_queue=queue, workflows=[OptInProbe],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        handle = await temporal_env.client.start_workflow(
            OptInProbe.run, id=f"subscription-{subscription_id}", task_queue=queue)
        await phone.text(msisdn, WEEKLY, "1111")
        rows = await handled(engine, msisdn, 1)
        assert rows[0].action == "pin"
        assert rows[0].outcome == f"code refused by subscription-{subscription_id}"
        await phone.text(msisdn, WEEKLY, " 4821 ")
        rows = await handled(engine, msisdn, 2)
        assert rows[1].outcome == f"code confirmed for subscription-{subscription_id}"
        assert await handle.result() == ["1111", "4821"]
    refused = await phone.received(msisdn)
    assert len(refused) == 1 and "could not complete your request" in refused[0]["text"]


async def test_a_pin_with_no_subscription_awaiting_it_is_answered_with_help(
        mo: MoService, phone: Phone, engine: Engine) -> None:
    msisdn = new_msisdn()
    await phone.text(msisdn, WEEKLY, "123456")
    [row] = await handled(engine, msisdn, 1)
    assert row.outcome == "no subscription awaits a code: answered with help"
    assert "STOP to 84422" in (await phone.received(msisdn))[0]["text"]


# -- acknowledged only once stored -----------------------------------------------------------------

async def test_a_text_that_could_not_be_stored_is_left_unacknowledged_and_comes_again(
        mo: MoService, own_pool: AdapterPool, phone: Phone, engine: Engine) -> None:
    adapter = own_pool.get(CARRIER.id)
    assert isinstance(adapter, SmppAdapter)
    refusals: list[str] = []

    async def database_down(text: MobileOriginated) -> None:
        refusals.append(text.text)
        raise ConnectionRefusedError("database unreachable")

    msisdn = new_msisdn()
    adapter.set_mobile_originated_sink(database_down)
    try:
        message_id = await phone.text(msisdn, WEEKLY, "HELP")

        async def given_up() -> bool:  # the adapter tries three times, then drops the session
            return len(refusals) >= 3
        await eventually(given_up)
    finally:
        adapter.set_mobile_originated_sink(mo.accept)
    assert await asyncio.to_thread(inbound, engine, msisdn) == []  # nothing stored...
    [row] = await handled(engine, msisdn, 1, seconds=30)  # ...so the SMSC delivered it again
    assert row.smsc_message_id == message_id and row.action == "help"
    assert len(await phone.received(msisdn)) == 1


async def test_a_text_stored_by_a_worker_that_stopped_is_acted_on_at_the_next_start(
        mo: MoService, phone: Phone, engine: Engine) -> None:
    msisdn = new_msisdn()

    def stored_then_stopped() -> None:
        with Session(engine) as session:
            session.add(InboundSms(carrier_id=CARRIER.id, dedup_key=f"id:left-{msisdn}",
                                   smsc_message_id=f"left-{msisdn}", msisdn=msisdn,
                                   short_code=DEMO, text="aide"))
            session.commit()

    await asyncio.to_thread(stored_then_stopped)
    assert await mo.resume() >= 1
    [row] = await handled(engine, msisdn, 1)
    assert row.action == "help"
    [answer] = await phone.received(msisdn)
    assert answer["text"].startswith("Game Pass : 1.50 GBP. Pour arreter : STOP au 84150.")
