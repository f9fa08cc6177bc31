"""Billing flows under country, carrier and product rules, on the time-skipping server against
the simulators over real sockets. Every test ends with our ledger equal to the carrier's books."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from temporalio.testing import WorkflowEnvironment

from models.tables import CarrierOperation, LedgerKind, Subscriber, Subscription
from rules.types import Caps
from settings import Settings
from starter import SubscriptionClient, SubscriptionRequestError
from tests.conftest import GameBackendServer, Simulator
from tests.workflow_helpers import (
    REGISTRY,
    assert_books_match,
    ledger_of,
    new_msisdn,
    next_weekday,
    ruled_client,
    rules_with,
    subscribe_to,
    until,
)
from workflows import search_attributes as sa
from workflows.subscription import SubscriptionWorkflow
from workflows.types import BillingState


@pytest.fixture
def no_opt_in(temporal_env: WorkflowEnvironment, engine: Engine, settings: Settings,
              worker: Any) -> Iterator[SubscriptionClient]:
    yield ruled_client(temporal_env, engine, settings, rules_with(opt_in="none"))




def operations_of(engine: Engine, subscription_id: int) -> list[CarrierOperation]:
    with Session(engine) as session:
        return list(session.exec(select(CarrierOperation).where(
            CarrierOperation.subscription_id == subscription_id,
            CarrierOperation.kind == LedgerKind.CHARGE).order_by(col(CarrierOperation.id))))


def subscriber_of(engine: Engine, subscription_id: int) -> int:
    with Session(engine) as session:
        subscription = session.get(Subscription, subscription_id)
        assert subscription is not None
        return subscription.subscriber_id


async def state_of(client: SubscriptionClient, subscription_id: int) -> BillingState:
    return await client.handle(subscription_id).query(SubscriptionWorkflow.state)


# -- scheduling ---------------------------------------------------------------------------


async def test_a_year_of_monthly_renewals_at_the_carriers_local_hour_across_dst(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """fr-azur renews at 10:00 Paris time: 09:00 UTC in winter, 08:00 UTC in summer."""
    msisdn = new_msisdn("fr-azur", "flows-year")
    first = (await next_weekday(temporal_env, "Europe/Paris", 10)).replace(month=1, day=12)
    first = first.replace(year=first.year + 1)
    started = await subscribe_to(no_opt_in, "fr-azur-pass-monthly", msisdn,
                                 first_charge_at=first.astimezone(UTC))
    handle = no_opt_in.handle(started.subscription_id)
    await temporal_env.sleep(first + timedelta(days=340) - await temporal_env.get_current_time())
    state = await until(temporal_env, handle, lambda s: s.charges_succeeded >= 12,
                        step=timedelta(days=1), rounds=30)
    assert state.charges_succeeded == 12 and state.cycles_failed == 0

    paris = ZoneInfo("Europe/Paris")
    charged = operations_of(engine, started.subscription_id)
    local = [o.due_at.replace(tzinfo=UTC).astimezone(paris) for o in charged]
    assert [t.month for t in local] == list(range(1, 13))
    # renewals in the carrier's hour, each subscription at its own minute of it
    assert len({(t.hour, t.minute) for t in local[1:]}) == 1 and local[1].hour == 10, local
    utc_hours = {o.due_at.hour for o in charged}
    assert utc_hours == {8, 9}  # the wall time held through both DST changes
    await no_opt_in.cancel_subscription(started.subscription_id)
    await assert_books_match(simulator, engine, "fr-azur", msisdn, [started.subscription_id])


async def test_a_charge_due_in_quiet_hours_is_postponed_with_the_reason_in_the_history(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    msisdn = new_msisdn("pl-baltyk", "flows-quiet")
    due = await next_weekday(temporal_env, "Europe/Warsaw", 2, 30)
    started = await subscribe_to(no_opt_in, "pl-baltyk-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    handle = no_opt_in.handle(started.subscription_id)
    state = await until(temporal_env, handle, lambda s: s.charges_succeeded == 1,
                        step=timedelta(hours=1), rounds=72)
    assert state.postponements >= 1
    decision = next(d for d in state.decisions if d.kind == "postponed")
    assert decision.rule == "PL.window"
    assert decision.detail == "postponed: quiet hours until 09:00 Europe/Warsaw"
    charged_at = operations_of(engine, started.subscription_id)[0].due_at.replace(tzinfo=UTC)
    assert charged_at.astimezone(ZoneInfo("Europe/Warsaw")).hour == 9
    assert charged_at.date() == due.date()

    # the history names the postponement on its timer
    history = await handle.fetch_history()
    summaries = [e.user_metadata.summary.data.decode() for e in history.events
                 if e.HasField("user_metadata") and e.user_metadata.HasField("summary")]
    assert any("quiet hours until 09:00 Europe/Warsaw" in s for s in summaries), summaries
    await no_opt_in.cancel_subscription(started.subscription_id)
    await assert_books_match(simulator, engine, "pl-baltyk", msisdn, [started.subscription_id])


async def test_a_free_trial_charges_nothing_until_it_ends(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    msisdn = new_msisdn("de-rheinfunk", "flows-trial")
    start = await next_weekday(temporal_env, "Europe/Berlin", 12)
    started = await subscribe_to(no_opt_in, "de-rheinfunk-pass-monthly", msisdn,
                                 first_charge_at=start.astimezone(UTC), trial_days=7)
    handle = no_opt_in.handle(started.subscription_id)
    await temporal_env.sleep(start + timedelta(days=6) - await temporal_env.get_current_time())
    assert (await handle.query(SubscriptionWorkflow.state)).charges_succeeded == 0
    assert ledger_of(engine, started.subscription_id) == []
    state = await until(temporal_env, handle, lambda s: s.charges_succeeded == 1,
                        step=timedelta(hours=6), rounds=12)
    assert state.recent_cycles[0].due_at >= start + timedelta(days=7) - timedelta(hours=4)
    await no_opt_in.cancel_subscription(started.subscription_id)
    await assert_books_match(simulator, engine, "de-rheinfunk", msisdn, [started.subscription_id])


# -- caps (shipped figures) ------------------------------------------------------------------


async def test_frances_attempt_cap_and_subscription_cap_postpone_charges_never_drop_them(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """FR: at most 2 charge attempts a day and EUR 12 a month for a subscription. A
    10-second EUR 0.99 plan reaches both; each refusal postpones to the roll-over."""
    msisdn = new_msisdn("fr-lumiere", "flows-fr-caps")
    start = (await next_weekday(temporal_env, "Europe/Paris", 10)).replace(day=2)
    if start <= (await temporal_env.get_current_time()):
        start = start.replace(month=start.month % 12 + 1,
                              year=start.year + (start.month == 12))
    started = await subscribe_to(no_opt_in, "fr-lumiere-pass-demo", msisdn,
                                 first_charge_at=start.astimezone(UTC))
    handle = no_opt_in.handle(started.subscription_id)
    state = await until(temporal_env, handle, lambda s: s.charges_succeeded >= 12,
                        step=timedelta(hours=12), rounds=80)
    rules = {d.rule for d in state.decisions}
    assert "FR.max_attempts_per_day" in rules
    paris = ZoneInfo("Europe/Paris")
    charges = [e for e in ledger_of(engine, started.subscription_id) if e.kind == "charge"]
    per_day: dict[Any, int] = {}
    for entry in charges:
        day = entry.due_at.replace(tzinfo=UTC).astimezone(paris).date()
        per_day[day] = per_day.get(day, 0) + 1
    assert max(per_day.values()) <= 2
    per_month: dict[Any, int] = {}
    for entry in charges:
        month = entry.due_at.replace(tzinfo=UTC).astimezone(paris).strftime("%Y-%m")
        per_month[month] = per_month.get(month, 0) + entry.amount_minor
    assert max(per_month.values()) <= 1200
    state = await until(temporal_env, handle, lambda s: any(
        d.rule == "FR.subscription_per_month" for d in s.decisions),
        step=timedelta(days=1), rounds=40)
    refused = next(d for d in state.decisions if d.rule == "FR.subscription_per_month")
    assert refused.kind == "postponed"
    assert "12,00 €" in refused.detail or "12.00" in refused.detail, refused.detail
    await no_opt_in.cancel_subscription(started.subscription_id)
    await assert_books_match(simulator, engine, "fr-lumiere", msisdn, [started.subscription_id])


async def test_a_price_over_the_per_transaction_cap_is_refused_before_anything_is_written(
    temporal_env: WorkflowEnvironment, engine: Engine, settings: Settings, worker: Any,
) -> None:
    client = ruled_client(temporal_env, engine, settings, rules_with(
        opt_in="none", caps=Caps(per_transaction_minor=300)))
    msisdn = new_msisdn("gb-thames", "flows-per-transaction")
    with pytest.raises(SubscriptionRequestError, match="per_transaction"):
        await subscribe_to(client, "gb-thames-pass-monthly", msisdn)
    with Session(engine) as session:
        assert session.exec(select(Subscriber).where(Subscriber.msisdn == msisdn)).first() is None


async def test_a_monthly_spend_cap_across_two_subscriptions_postpones_to_the_next_month(
    temporal_env: WorkflowEnvironment, engine: Engine, settings: Settings, worker: Any,
    simulator: Simulator,
) -> None:
    """GB's cap is per subscriber: with a GBP 5 month, the 3.99 pass and the 1.25 weekly
    pass cannot both be charged in the same month."""
    client = ruled_client(temporal_env, engine, settings, rules_with(
        opt_in="none", caps=Caps(per_transaction_minor=4000, per_month_minor=500)))
    msisdn = new_msisdn("gb-thames", "flows-gb-month")
    start = (await next_weekday(temporal_env, "Europe/London", 10)).replace(day=8)
    if start <= await temporal_env.get_current_time():
        start = start.replace(month=start.month % 12 + 1, year=start.year + (start.month == 12))
    first = await subscribe_to(client, "gb-thames-pass-monthly", msisdn,
                               first_charge_at=start.astimezone(UTC))
    second = await subscribe_to(client, "gb-thames-gems-demo", msisdn,
                                first_charge_at=(start + timedelta(hours=1)).astimezone(UTC))
    handle = client.handle(second.subscription_id)
    state = await until(temporal_env, handle, lambda s: any(
        d.rule == "GB.per_month" for d in s.decisions), step=timedelta(hours=1), rounds=48)
    decision = next(d for d in state.decisions if d.rule == "GB.per_month")
    assert decision.kind == "postponed"
    assert "£5.00 per month" in decision.detail, decision.detail
    until_text = decision.detail.rsplit("until ", 1)[1]
    resumes = datetime.fromisoformat(until_text).astimezone(ZoneInfo("Europe/London"))
    assert (resumes.day, resumes.hour) == (1, 0)
    await client.cancel_subscription(first.subscription_id)
    await client.cancel_subscription(second.subscription_id)
    await assert_books_match(simulator, engine, "gb-thames", msisdn,
                             [first.subscription_id, second.subscription_id])


# -- balance, ladder, retries ----------------------------------------------------------------


async def test_a_short_balance_is_charged_down_the_price_ladder_as_a_partial_payment(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, game_backend: GameBackendServer,
) -> None:
    msisdn = new_msisdn("mx-maya", "flows-ladder")
    await simulator.set_balance("mx-maya", msisdn, "50.00")
    due = await next_weekday(temporal_env, "America/Mexico_City", 12)
    started = await subscribe_to(no_opt_in, "mx-maya-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    handle = no_opt_in.handle(started.subscription_id)
    state = await until(temporal_env, handle, lambda s: s.charges_succeeded == 1,
                        step=timedelta(hours=1), rounds=48)
    assert state.partial_payments == 1
    cycle = state.recent_cycles[-1]
    assert (cycle.amount_minor, cycle.partial, cycle.delivery) == (4450, True, "delivered")
    [entry] = ledger_of(engine, started.subscription_id)
    assert (entry.amount_minor, entry.list_price_minor) == (4450, 8900)  # recorded as partial
    books = await game_backend.control("books")
    grants = [g for g in books["entitlements"] if g["grant_id"].startswith(started.key_prefix)]
    assert len(grants) == 1 and grants[0]["until"]  # half a month of service, not a month
    assert books["grant_requests"][grants[0]["grant_id"]] == 1
    await no_opt_in.cancel_subscription(started.subscription_id)
    await assert_books_match(simulator, engine, "mx-maya", msisdn, [started.subscription_id])


async def test_retries_follow_the_countrys_schedule_then_suspend_until_resumed(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """GB: retries after 1 h and 4 h (two a day), then at the next opening; then suspend."""
    msisdn = new_msisdn("gb-thames", "flows-suspend")
    await simulator.set_balance("gb-thames", msisdn, "0.50")
    due = await next_weekday(temporal_env, "Europe/London", 9)
    started = await subscribe_to(no_opt_in, "gb-thames-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    handle = no_opt_in.handle(started.subscription_id)
    state = await until(temporal_env, handle, lambda s: s.status == "suspended",
                        step=timedelta(hours=1), rounds=96)
    attempts = [o.due_at.replace(tzinfo=UTC) for o in operations_of(engine, started.subscription_id)]
    assert len(attempts) == 4  # the charge and three retries
    gaps = [round((later - earlier).total_seconds() / 60)
            for earlier, later in zip(attempts, attempts[1:], strict=False)]
    assert gaps[:2] == [60, 240]
    london = ZoneInfo("Europe/London")
    assert attempts[3].astimezone(london).date() > attempts[0].astimezone(london).date()
    assert all(8 <= a.astimezone(london).hour < 21 for a in attempts)
    assert any(d.rule == "GB.after_retries" for d in state.decisions)
    assert ledger_of(engine, started.subscription_id) == []

    # nothing is charged while suspended, even when the next cycle falls due
    await simulator.set_balance("gb-thames", msisdn, "20.00")
    await temporal_env.sleep(timedelta(days=40))
    assert (await handle.query(SubscriptionWorkflow.state)).charges_succeeded == 0
    await no_opt_in.resume(started.subscription_id)
    state = await until(temporal_env, handle, lambda s: s.charges_succeeded == 1,
                        step=timedelta(hours=1), rounds=30)
    assert state.status == "active"
    await no_opt_in.cancel_subscription(started.subscription_id)
    await assert_books_match(simulator, engine, "gb-thames", msisdn, [started.subscription_id])


# -- delivery and refunds ----------------------------------------------------------------------


async def test_a_delivery_the_game_refuses_is_refunded_and_nothing_stays_granted(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, game_backend: GameBackendServer, settings: Settings,
) -> None:
    msisdn = new_msisdn("de-nordnetz", "flows-delivery-refused")
    due = await next_weekday(temporal_env, "Europe/Berlin", 11)
    started = await subscribe_to(no_opt_in, "de-nordnetz-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    subscriber = subscriber_of(engine, started.subscription_id)
    await game_backend.control("faults", {
        "kind": "refuse", "subscriber_ref": f"{settings.deployment_id}-{subscriber}"})
    handle = no_opt_in.handle(started.subscription_id)
    state = await until(temporal_env, handle, lambda s: s.refunds == 1,
                        step=timedelta(hours=1), rounds=48)
    assert state.delivery_failures == 1 and state.deliveries == 0
    assert state.recent_cycles[-1].delivery == "refunded"
    kinds = sorted(e.kind for e in ledger_of(engine, started.subscription_id))
    assert kinds == ["charge", "refund"]
    await no_opt_in.cancel_subscription(started.subscription_id)
    await assert_books_match(simulator, engine, "de-nordnetz", msisdn, [started.subscription_id])


async def test_refunds_are_validated_by_the_workflow_and_never_exceed_the_charge(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    msisdn = new_msisdn("es-iberica", "flows-refunds")
    due = await next_weekday(temporal_env, "Europe/Madrid", 12)
    started = await subscribe_to(no_opt_in, "es-iberica-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    handle = no_opt_in.handle(started.subscription_id)
    await until(temporal_env, handle, lambda s: s.charges_succeeded == 1,
                step=timedelta(hours=1), rounds=48)
    sid = started.subscription_id
    with pytest.raises(SubscriptionRequestError, match="between 0 and the 499"):
        await no_opt_in.request_refund(sid, 1, amount_minor=500, request_id="too-much")
    with pytest.raises(SubscriptionRequestError, match="cycle 2 has no charge"):
        await no_opt_in.request_refund(sid, 2, request_id="no-such-cycle")
    assert [e.kind for e in ledger_of(engine, sid)] == ["charge"]

    record = await no_opt_in.request_refund(sid, 1, amount_minor=200, request_id="ticket-7")
    assert (record.outcome, record.amount_minor) == ("succeeded", 200)
    again = await no_opt_in.request_refund(sid, 1, amount_minor=200, request_id="ticket-7")
    assert again.outcome == "succeeded"
    with pytest.raises(SubscriptionRequestError, match="already refunded"):
        await no_opt_in.request_refund(sid, 1, amount_minor=100, request_id="ticket-8")
    with pytest.raises(SubscriptionRequestError, match="used for another refund"):
        await no_opt_in.request_refund(sid, 1, amount_minor=100, request_id="ticket-7")
    refunds = [e for e in ledger_of(engine, sid) if e.kind == "refund"]
    assert [r.amount_minor for r in refunds] == [200]
    await no_opt_in.cancel_subscription(sid)
    await assert_books_match(simulator, engine, "es-iberica", msisdn, [sid])


# -- changes by services -------------------------------------------------------------------------


async def test_a_plan_change_applies_from_the_next_cycle(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    msisdn = new_msisdn("fr-azur", "flows-plan-change")
    due = await next_weekday(temporal_env, "Europe/Paris", 10)
    started = await subscribe_to(no_opt_in, "fr-azur-pass-weekly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    handle = no_opt_in.handle(sid)
    await until(temporal_env, handle, lambda s: s.charges_succeeded == 1,
                step=timedelta(hours=1), rounds=48)
    with pytest.raises(SubscriptionRequestError, match="not a price of"):
        await no_opt_in.change_plan(sid, "gb-thames-pass-monthly")
    await no_opt_in.change_plan(sid, "fr-azur-pass-monthly")
    state = await until(temporal_env, handle, lambda s: s.charges_succeeded == 3,
                        step=timedelta(days=1), rounds=50)
    amounts = [e.amount_minor for e in ledger_of(engine, sid)]
    assert amounts == [149, 499, 499]
    dues = [c.due_at for c in state.recent_cycles if c.outcome == "succeeded"]
    assert timedelta(weeks=1) <= dues[1] - dues[0] < timedelta(weeks=1, hours=1)
    assert 28 <= (dues[2] - dues[1]).days <= 31
    await no_opt_in.cancel_subscription(sid)
    await assert_books_match(simulator, engine, "fr-azur", msisdn, [sid])


async def test_pause_holds_billing_and_resume_charges_the_cycle_then_counts_from_there(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    msisdn = new_msisdn("es-iberica", "flows-pause")
    due = await next_weekday(temporal_env, "Europe/Madrid", 11)
    started = await subscribe_to(no_opt_in, "es-iberica-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    handle = no_opt_in.handle(sid)
    await until(temporal_env, handle, lambda s: s.charges_succeeded == 1,
                step=timedelta(hours=1), rounds=48)
    paused = await no_opt_in.pause(sid)
    assert paused.status == "paused"
    with pytest.raises(SubscriptionRequestError, match="already paused"):
        await no_opt_in.pause(sid)
    await temporal_env.sleep(timedelta(days=45))
    assert (await handle.query(SubscriptionWorkflow.state)).charges_succeeded == 1
    resumed = await no_opt_in.resume(sid)
    assert resumed.status == "active"
    state = await until(temporal_env, handle, lambda s: s.next_cycle == 3,
                        step=timedelta(hours=1), rounds=48)
    assert state.charges_succeeded == 2
    resumed_at = state.recent_cycles[-1].due_at
    assert resumed_at > due + timedelta(days=45)
    await no_opt_in.cancel_subscription(sid)
    await assert_books_match(simulator, engine, "es-iberica", msisdn, [sid])


async def test_cancel_at_period_end_charges_nothing_more(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    msisdn = new_msisdn("es-iberica", "flows-period-end")
    due = await next_weekday(temporal_env, "Europe/Madrid", 11)
    started = await subscribe_to(no_opt_in, "es-iberica-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    handle = no_opt_in.handle(sid)
    await until(temporal_env, handle, lambda s: s.charges_succeeded == 1,
                step=timedelta(hours=1), rounds=48)
    await no_opt_in.cancel_at_period_end(sid)
    assert (await handle.query(SubscriptionWorkflow.state)).status == "active"
    final = await until(temporal_env, handle, lambda s: s.status == "cancelled",
                        step=timedelta(days=1), rounds=40)
    assert final.charges_succeeded == 1 and final.next_cycle == 2
    assert len(ledger_of(engine, sid)) == 1
    await assert_books_match(simulator, engine, "es-iberica", msisdn, [sid])


# -- opt-in --------------------------------------------------------------------------------------


async def texts_to(simulator: Simulator, msisdn: str) -> list[str]:
    received = await simulator.control(f"sms?msisdn={quote(msisdn)}")
    return [m["text"] for m in received if m["direction"] == "notice"]


async def pin_sent_to(simulator: Simulator, msisdn: str) -> str:
    """The code in the text the subscriber's phone received (it may still be on its way)."""
    for _ in range(50):
        for text in await texts_to(simulator, msisdn):
            found = re.search(r"\b(\d{5,8})\b", text)
            if found:
                return found.group(1)
        await asyncio.sleep(0.1)
    raise AssertionError(f"no code among {await texts_to(simulator, msisdn)}")


async def test_italy_bills_only_after_the_code_sent_by_sms_is_typed_back(
    temporal_env: WorkflowEnvironment, engine: Engine, settings: Settings, worker: Any,
    simulator: Simulator,
) -> None:
    """AGCOM 10/21/CONS: activation needs the number and a one-time code of 5+ digits."""
    client = ruled_client(temporal_env, engine, settings)
    msisdn = new_msisdn("it-tirreno", "flows-it-opt-in")
    due = await next_weekday(temporal_env, "Europe/Rome", 11, days_ahead=0)
    started = await subscribe_to(client, "it-tirreno-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    handle = client.handle(sid)
    state = await until(temporal_env, handle, lambda s: s.status == "pending_opt_in",
                        step=timedelta(seconds=5), rounds=20)
    pin = await pin_sent_to(simulator, msisdn)
    assert len(pin) >= 5
    with pytest.raises(SubscriptionRequestError, match="does not match"):
        await client.confirm_opt_in(sid, "0" * len(pin) if pin != "0" * len(pin) else "1" * len(pin))
    with pytest.raises(SubscriptionRequestError, match="digits only"):
        await client.confirm_opt_in(sid, "12a45")
    assert operations_of(engine, sid) == []
    state = await client.confirm_opt_in(sid, pin)
    assert state.opted_in
    state = await until(temporal_env, handle, lambda s: s.charges_succeeded == 1,
                        step=timedelta(hours=1), rounds=200)
    assert state.status == "active"
    texts = await texts_to(simulator, msisdn)
    assert len(texts) >= 2  # the code, then the welcome
    await client.cancel_subscription(sid)
    await assert_books_match(simulator, engine, "it-tirreno", msisdn, [sid])


async def test_an_opt_in_never_confirmed_expires_and_nothing_is_ever_charged(
    temporal_env: WorkflowEnvironment, engine: Engine, settings: Settings, worker: Any,
    simulator: Simulator,
) -> None:
    client = ruled_client(temporal_env, engine, settings)
    msisdn = new_msisdn("it-tirreno", "flows-it-expired")
    started = await subscribe_to(client, "it-tirreno-pass-monthly", msisdn)
    sid = started.subscription_id
    handle = client.handle(sid)
    state = await until(temporal_env, handle, lambda s: s.status == "opt_in_expired",
                        step=timedelta(minutes=2), rounds=20)
    decision = state.decisions[-1]
    assert (decision.rule, decision.kind) == ("IT.opt_in", "refused")
    assert "no code within 10 minutes" in decision.detail
    with pytest.raises(SubscriptionRequestError, match="not running"):
        await client.confirm_opt_in(sid, await pin_sent_to(simulator, msisdn))
    assert operations_of(engine, sid) == [] and ledger_of(engine, sid) == []
    with Session(engine) as session:
        row = session.get(Subscription, sid)
        assert row is not None and row.status == "opt_in_expired"
    # the product's one live subscription slot is free again
    again = await subscribe_to(client, "it-tirreno-pass-monthly", msisdn)
    await client.cancel_subscription(again.subscription_id)
    await assert_books_match(simulator, engine, "it-tirreno", msisdn, [sid])


async def test_three_wrong_codes_end_the_opt_in(
    temporal_env: WorkflowEnvironment, engine: Engine, settings: Settings, worker: Any,
    simulator: Simulator,
) -> None:
    client = ruled_client(temporal_env, engine, settings)
    msisdn = new_msisdn("it-tirreno", "flows-it-wrong")
    started = await subscribe_to(client, "it-tirreno-pass-monthly", msisdn)
    sid = started.subscription_id
    handle = client.handle(sid)
    await until(temporal_env, handle, lambda s: s.status == "pending_opt_in",
                step=timedelta(seconds=5), rounds=20)
    pin = await pin_sent_to(simulator, msisdn)
    wrong = str((int(pin) + 1) % 10 ** len(pin)).zfill(len(pin))
    for _ in range(3):
        with pytest.raises(SubscriptionRequestError, match="does not match"):
            await client.confirm_opt_in(sid, wrong)
    state = await until(temporal_env, handle, lambda s: s.status == "opt_in_expired",
                        step=timedelta(seconds=5), rounds=20)
    assert "3 wrong codes" in state.decisions[-1].detail
    assert operations_of(engine, sid) == []


async def test_a_refused_delivery_on_a_carrier_without_refunds_is_shown_as_a_refund_owed(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, game_backend: GameBackendServer, settings: Settings,
) -> None:
    """Premium SMS cannot be refunded through the carrier: the money is owed and an operator
    sees it (BillingIssue refund_owed), never silently kept."""
    msisdn = new_msisdn("ke-safari", "flows-owed")
    due = await next_weekday(temporal_env, "Africa/Nairobi", 11)
    started = await subscribe_to(no_opt_in, "ke-safari-pass-weekly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    subscriber = subscriber_of(engine, started.subscription_id)
    await game_backend.control("faults", {
        "kind": "refuse", "subscriber_ref": f"{settings.deployment_id}-{subscriber}"})
    handle = no_opt_in.handle(started.subscription_id)
    state = await until(temporal_env, handle, lambda s: bool(s.refunds_owed),
                        step=timedelta(hours=1), rounds=48)
    assert state.refunds_owed == [1] and state.billing_issue == "refund_owed"
    assert state.recent_cycles[-1].delivery == "not_delivered"
    described = await handle.describe()
    assert described.typed_search_attributes.get(sa.BILLING_ISSUE) == "refund_owed"
    await no_opt_in.cancel_subscription(started.subscription_id)


@pytest.mark.parametrize("price_point", ["br-ipe-pass-monthly", "za-karoo-pass-monthly",
                                         "de-alpen-pass-monthly", "es-cobromovil-pass-monthly"])
async def test_a_partial_refund_moves_exactly_its_amount_on_every_family(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, price_point: str,
) -> None:
    """CAMARA needs a 'partial' refund naming its amount (a 'total' one returns the whole
    payment); the other families name the amount always."""
    carrier_id = price_point.rsplit("-pass-", 1)[0]
    zone = REGISTRY.carriers[carrier_id].timezone
    msisdn = new_msisdn(carrier_id, f"flows-partial-refund-{price_point}")
    due = await next_weekday(temporal_env, zone, 12)
    started = await subscribe_to(no_opt_in, price_point, msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    state = await until(temporal_env, no_opt_in.handle(sid), lambda s: s.charges_succeeded == 1,
                        step=timedelta(hours=1), rounds=48)
    charged = state.recent_cycles[-1].amount_minor
    record = await no_opt_in.request_refund(sid, 1, amount_minor=charged // 3,
                                            request_id=f"third-{sid}")
    assert record.outcome == "succeeded", record
    refunds = [e.amount_minor for e in ledger_of(engine, sid) if e.kind == "refund"]
    assert refunds == [charged // 3]
    await no_opt_in.cancel_subscription(sid)
    await assert_books_match(simulator, engine, carrier_id, msisdn, [sid])


async def test_a_partial_payments_remainder_is_collected_later_where_the_carrier_says_so(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """mx-maya: ladder 100 % / 50 % / 25 % after a balance check; remainder collect_later
    (za-springbok, by contrast, writes it off)."""
    msisdn = new_msisdn("mx-maya", "flows-remainder")
    await simulator.set_balance("mx-maya", msisdn, "50.00")
    due = await next_weekday(temporal_env, "America/Mexico_City", 12)
    started = await subscribe_to(no_opt_in, "mx-maya-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    handle = no_opt_in.handle(sid)
    await until(temporal_env, handle, lambda s: s.partial_payments == 1,
                step=timedelta(minutes=30), rounds=48)
    assert [e.amount_minor for e in ledger_of(engine, sid)] == [4450]
    await simulator.set_balance("mx-maya", msisdn, "200.00")
    state = await until(temporal_env, handle, lambda s: s.remainders_collected == 1,
                        step=timedelta(hours=1), rounds=72)
    entries = ledger_of(engine, sid)
    assert [(e.amount_minor, e.list_price_minor) for e in entries] == [(4450, 8900),
                                                                       (4450, 8900)]
    assert state.amount_charged_minor == 8900 and state.deliveries == 2
    await no_opt_in.cancel_subscription(sid)
    await assert_books_match(simulator, engine, "mx-maya", msisdn, [sid])


async def test_a_balance_below_the_price_postpones_where_the_carrier_says_so(
    no_opt_in: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """kw-dasman: balance look-up, policy postpone: no charge is sent that would fail."""
    msisdn = new_msisdn("kw-dasman", "flows-balance-postpone")
    await simulator.set_balance("kw-dasman", msisdn, "0.500")
    due = await next_weekday(temporal_env, "Asia/Kuwait", 11)
    started = await subscribe_to(no_opt_in, "kw-dasman-pass-monthly", msisdn,
                                 first_charge_at=due.astimezone(UTC))
    sid = started.subscription_id
    handle = no_opt_in.handle(sid)
    state = await until(temporal_env, handle, lambda s: s.postponements >= 1,
                        step=timedelta(minutes=30), rounds=48)
    decision = next(d for d in state.decisions if d.rule == "kw-dasman.balance_policy")
    assert "below the price" in decision.detail
    assert operations_of(engine, sid) == []  # nothing sent that would have failed
    await simulator.set_balance("kw-dasman", msisdn, "10.000")
    state = await until(temporal_env, handle, lambda s: s.charges_succeeded == 1,
                        step=timedelta(hours=1), rounds=72)
    assert [e.amount_minor for e in ledger_of(engine, sid)] == [1250]
    await no_opt_in.cancel_subscription(sid)
    await assert_books_match(simulator, engine, "kw-dasman", msisdn, [sid])
