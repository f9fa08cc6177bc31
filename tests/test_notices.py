"""The send_notice activity against a real SMSC simulator: rendered in the subscriber's
language within one segment, sent once per key, and never debited."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.notices import NoticeActivities, NoticeInput
from carriers.loader import default_registry
from carriers.numbers import sample_msisdn
from carriers.pool import AdapterPool
from carriers.sms_text import sms_encoding
from models.inbound_sms import SmsNotice
from models.tables import Subscriber, Subscription
from tests.conftest import Simulator
from tests.test_mo_sms import Phone, own_pool, own_settings, phone  # noqa: F401 (fixtures)

REGISTRY = default_registry()
_rng = random.Random(2026)
_taken: set[str] = set()


def subscribed(engine: Engine, carrier_id: str, price_point_id: str, locale: str) -> tuple[str, int, int]:
    """A subscriber and their (active) subscription, as rows: no workflow, so no charge."""
    msisdn = sample_msisdn(REGISTRY.carriers[carrier_id], REGISTRY, _rng, _taken)
    with Session(engine) as session:
        subscriber = Subscriber(msisdn=msisdn, carrier_id=carrier_id, timezone="Europe/London",
                                locale=locale)
        session.add(subscriber)
        session.flush()
        assert subscriber.id is not None
        subscription = Subscription(subscriber_id=subscriber.id, product_id="game-pass",
                                    price_point_id=price_point_id)
        session.add(subscription)
        session.commit()
        assert subscription.id is not None
        return msisdn, subscriber.id, subscription.id


@pytest.fixture(scope="module")
async def notices(own_pool: AdapterPool, engine: Engine) -> AsyncIterator[NoticeActivities]:  # noqa: F811
    yield NoticeActivities(engine, own_pool, REGISTRY)


def notice_of(subscriber_id: int, subscription_id: int, carrier_id: str, kind: str,
              params: dict[str, str] | None = None, locale: str = "") -> NoticeInput:
    return NoticeInput(subscription_id=subscription_id, subscriber_id=subscriber_id,
                       carrier_id=carrier_id, kind=kind, locale=locale, params=params or {},
                       idempotency_key=f"notice-{uuid.uuid4().hex[:12]}")


async def no_debits(simulator: Simulator, carrier_id: str, msisdn: str) -> bool:
    return await simulator.transactions(carrier_id, msisdn) == []


def notice_row(engine: Engine, key: str) -> SmsNotice:
    with Session(engine) as session:
        return session.exec(select(SmsNotice).where(SmsNotice.idempotency_key == key)).one()


async def test_a_welcome_in_the_subscribers_language_sent_once_and_never_debited(
        notices: NoticeActivities, phone: Phone, engine: Engine,  # noqa: F811
        simulator: Simulator) -> None:
    msisdn, subscriber_id, subscription_id = await asyncio.to_thread(
        subscribed, engine, "gb-mersey", "gb-mersey-pass-weekly", "fr_FR")
    notice = notice_of(subscriber_id, subscription_id, "gb-mersey", "welcome")
    env = ActivityEnvironment()
    first = await env.run(notices.send_notice, notice)
    again = await env.run(notices.send_notice, notice)  # a retried activity, same key
    expected = ("Bienvenue sur Game Pass : 3.00 GBP. Aide : AIDE au 84422. Pour arreter : "
                "STOP au 84422. Support 0800 555 0100")
    assert (first.outcome, first.sent_now, first.text) == ("sent", True, expected)
    assert (again.outcome, again.sent_now) == ("sent", False)
    received = await phone.received(msisdn)
    # from the premium short code, yet free: the SMSC saw the free-to-end-user service type
    assert [(r["short_code"], r["text"]) for r in received] == [("84422", expected)]
    assert await no_debits(simulator, "gb-mersey", msisdn)
    row = await asyncio.to_thread(notice_row, engine, notice.idempotency_key)
    assert (row.state, row.sends, row.kind, row.locale) == ("sent", 1, "welcome", "fr_FR")


@pytest.mark.parametrize(("locale", "start"), [
    ("ja_JP", "Game Passの暗証番号は4821。84150へ返信し1.50 GBPを確認。"),
    ("it_IT", "Il tuo PIN Game Pass e' 4821. Invialo al 84150 per confermare 1.50 GBP."),
    ("xx_XX", "Your Game Pass PIN is 4821. Reply with it to 84150 to confirm 1.50 GBP."),
])
async def test_an_opt_in_pin_per_locale_arrives_whole(
        notices: NoticeActivities, phone: Phone, engine: Engine,  # noqa: F811
        simulator: Simulator, locale: str, start: str) -> None:
    msisdn, subscriber_id, subscription_id = await asyncio.to_thread(
        subscribed, engine, "gb-mersey", "gb-mersey-pass-demo", "en_GB")
    result = await ActivityEnvironment().run(notices.send_notice, notice_of(
        subscriber_id, subscription_id, "gb-mersey", "opt_in_pin", {"pin": "4821"}, locale))
    assert result.outcome == "sent" and result.text.startswith(start)
    assert sms_encoding(result.text).segments == 1
    [received] = await phone.received(msisdn)
    assert received["text"] == result.text  # UCS-2 included, decoded by the SMSC as sent
    assert await no_debits(simulator, "gb-mersey", msisdn)


async def test_a_notice_the_smsc_refused_is_sent_on_the_retry_and_only_once(
        notices: NoticeActivities, phone: Phone, engine: Engine,  # noqa: F811
        simulator: Simulator) -> None:
    msisdn, subscriber_id, subscription_id = await asyncio.to_thread(
        subscribed, engine, "gb-mersey", "gb-mersey-pass-weekly", "de_DE")
    notice = notice_of(subscriber_id, subscription_id, "gb-mersey", "renewal_reminder",
                       {"date": "2026-12-01"})
    await simulator.fault("gb-mersey", "throttle", msisdn)
    env = ActivityEnvironment()
    with pytest.raises(ApplicationError) as refused:
        await env.run(notices.send_notice, notice)
    assert refused.value.type == "NoticeNotTaken" and not refused.value.non_retryable
    assert await phone.received(msisdn) == []
    retried = await env.run(notices.send_notice, notice)
    assert retried.outcome == "sent" and retried.sent_now
    assert retried.text.startswith("Game Pass verlaengert sich am 2026-12-01 fuer 3.00 GBP.")
    assert len(await phone.received(msisdn)) == 1
    row = await asyncio.to_thread(notice_row, engine, notice.idempotency_key)
    assert (row.state, row.sends) == ("sent", 2)
    assert await no_debits(simulator, "gb-mersey", msisdn)


async def test_a_carrier_without_smpp_uses_the_platform_channel_or_none(
        own_pool: AdapterPool, phone: Phone, engine: Engine,  # noqa: F811
        simulator: Simulator) -> None:
    msisdn, subscriber_id, subscription_id = await asyncio.to_thread(
        subscribed, engine, "gb-thames", "gb-thames-pass-weekly", "en_GB")
    notice = notice_of(subscriber_id, subscription_id, "gb-thames", "stop_confirmation")
    env = ActivityEnvironment()
    without = await env.run(NoticeActivities(engine, own_pool, REGISTRY).send_notice, notice)
    assert without.outcome == "no_channel" and not without.sent_now
    platform = NoticeActivities(engine, own_pool, REGISTRY, platform_carrier_id="gb-mersey")
    sent = await env.run(platform.send_notice, notice)
    assert sent.outcome == "sent"
    assert [(r["short_code"], r["text"]) for r in await phone.received(msisdn)] == [
        ("GAMES", "You have left Game Pass and will not be charged again. Help: 0800 555 0100")]
    assert await no_debits(simulator, "gb-thames", msisdn)
    assert await no_debits(simulator, "gb-mersey", msisdn)


async def test_a_receipt_as_the_workflow_asks_for_it(
        notices: NoticeActivities, phone: Phone, engine: Engine,  # noqa: F811
        simulator: Simulator) -> None:
    """The subscription workflow names the price only; the day is the day it is sent."""
    from datetime import UTC, datetime

    msisdn, subscriber_id, subscription_id = await asyncio.to_thread(
        subscribed, engine, "gb-mersey", "gb-mersey-pass-weekly", "en_GB")
    result = await ActivityEnvironment().run(notices.send_notice, NoticeInput(
        subscription_id, subscriber_id, "gb-mersey", "receipt", "en_GB", {"price": "3.00 GBP"},
        f"s{subscription_id}-c1-a0-receipt"))
    today = datetime.now(UTC).date().isoformat()
    assert result.text == (f"Game Pass: payment of 3.00 GBP received on {today}. Thank you. "
                           "To stop, text STOP to 84422.")
    assert [r["text"] for r in await phone.received(msisdn)] == [result.text]
    assert await no_debits(simulator, "gb-mersey", msisdn)


async def test_a_notice_kind_without_a_template_is_a_configuration_error(
        notices: NoticeActivities, engine: Engine) -> None:
    _, subscriber_id, subscription_id = await asyncio.to_thread(
        subscribed, engine, "gb-mersey", "gb-mersey-pass-weekly", "en_GB")
    with pytest.raises(ApplicationError) as refused:
        await ActivityEnvironment().run(notices.send_notice, notice_of(
            subscriber_id, subscription_id, "gb-mersey", "opt_in_pin"))  # no PIN given
    assert refused.value.type == "ConfigurationError" and refused.value.non_retryable
