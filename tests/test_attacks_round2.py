"""Second adversarial review of the money paths, after the fixes of 90181ce. Each test's
docstring tells the attack as it succeeds today; its name tells the guarantee that should
hold. Real stack (time-skipping server, simulators on sockets, real receiver and worker) where
feasible; otherwise a focused test of the deciding function or store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from carriers.auth import callback_signature
from carriers.base import LookupResult, StatusRequest
from models.tables import OperationState
from settings import Settings
from starter import SubscriptionClient
from tests.conftest import Simulator
from tests.test_attacks import debits, ledger_of, msisdn_for, op, run_until, subscribe

# -- 1. CAMARA look-ups never work on SQLite ------------------------------------------------------


async def test_a_camara_debit_whose_event_never_comes_is_settled_by_look_up(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """br-ipe (CAMARA, declares a status look-up) takes the charge ("processing", with its
    paymentId) and debits it, but its CloudEvent never reaches us. The workflow settles by
    look-up after 20 s — and every look-up raises ``TypeError: can't compare offset-naive and
    offset-aware datetimes``: ``_run`` passes ``sent_at=operation.created_at`` raw (SQLite, the
    embedded default, gives naive datetimes back; only ``last_sent_at`` goes through
    ``_aware``), and ``CamaraAdapter.status`` (changed in 90181ce) does
    ``max(request.last_sent_at or sent, sent)``. The activity fails on every attempt, so no
    CAMARA charge or refund can ever be settled by look-up: a debit whose event is lost has no
    ledger row and ends unsettled; a denial event is never confirmed (so an out-of-credit
    subscriber is never retried), and ``starter.py settle`` fails the same way."""
    carrier_id = "br-ipe"
    msisdn = msisdn_for(carrier_id, "r2-camara-no-event")
    await simulator.fault(carrier_id, "no_callback", msisdn)
    started = await subscribe(client, carrier_id, msisdn)
    key = f"{started.key_prefix}-c1-a0"
    handle = client.handle(started.subscription_id)
    try:
        state = await run_until(temporal_env, handle, lambda s: s.recent_cycles,
                                step=timedelta(seconds=30), rounds=40)
        outcomes = [c.outcome for c in state.recent_cycles]
    except AssertionError:
        outcomes = []
    record = op(engine, key)
    taken = await debits(simulator, carrier_id, msisdn)
    await client.cancel_subscription(started.subscription_id)
    assert len(taken) == 1
    assert outcomes == ["succeeded"] and [
        e.idempotency_key for e in ledger_of(engine, started.subscription_id)] == [key], (
        f"the carrier debited {taken[0]['amount'] if taken else '?'} and answers look-ups, "
        f"but after 20 minutes the cycle is {outcomes} and the operation "
        f"{record.state if record else None!r} ({record.message if record else ''!r})")


# -- 2. SMPP: a redelivered receipt of the same subscriber's earlier message ---------------------


def test_an_smpp_receipt_for_an_earlier_message_never_settles_the_next_one_on_a_reused_id(
    engine: Engine,
) -> None:
    """Round 1's fix filters receipts by the subscriber's number, but an SMSC that reuses
    message ids reuses them for the same subscriber too. Month 1's charge to A was refused
    for credit (REJECTD, err 088) under id M; month 2's charge to A is given M again. The
    SMSC redelivers month 1's receipt (it does so after every rebind until acknowledged; ours
    was lost with a dying worker). ``_match_receipt`` finds both rows by (id, number) and
    prefers the *open* one: month 2 is marked failed, insufficient funds — the "look-up" that
    confirms a negative for SMPP reads that very row — and the workflow charges slot a1 under
    a new key, although month 2's message was delivered and billed: a second debit. The
    receipt even carries month 1's ``user_message_reference`` (which names month 1's row), and
    it is ignored whenever the message id matched."""
    from models.smpp_store import SubmissionStore

    store = SubmissionStore(engine)
    carrier_id = "gb-mersey"
    reused = f"reused-{uuid.uuid4().hex[:8]}"
    msisdn = "+447700900303"
    month1, month2 = f"r2-m1-{reused}", f"r2-m2-{reused}"

    old, _ = store._reserve(carrier_id, month1, msisdn)
    store._submitted(carrier_id, month1, reused)
    assert old.id is not None
    store._settled(old.id, False, reused, "REJECTD", "088")
    new, _ = store._reserve(carrier_id, month2, msisdn)
    store._submitted(carrier_id, month2, reused)
    assert new.id is not None and new.user_reference != old.user_reference

    # month 1's receipt, redelivered: its message id, and month 1's user_message_reference
    matched = store._match_receipt(carrier_id, reused, old.user_reference, msisdn)
    assert matched is None or matched.idempotency_key == month1, (
        f"month 1's receipt (user reference {old.user_reference}) was matched to the open "
        f"{matched.idempotency_key} (user reference {matched.user_reference})")


# -- 3. a late settlement pinned to the first report it was started with -------------------------


async def test_a_final_result_pushed_while_a_late_settlement_runs_is_applied(
    client: SubscriptionClient, simulator: Simulator, engine: Engine, settings: Settings,
    temporal_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fr-cote's charge is left unsettled (no callback, look-ups failing). Days later the
    aggregator flushes its queue: an interim "accepted" callback, then, a second later, the
    genuine "completed". The relay starts ``LateSettlementWorkflow`` (``settle-<key>``) with
    the interim report. The "completed" one is stored on the record, and the relay asks to
    start ``settle-<key>`` again — ``USE_EXISTING``, so it gets the run already going, whose
    input is the interim report, and returns "settling". That run settles by
    ``_reported(operation, relayed)``, which prefers the *relayed* "pending" over the stored
    final "succeeded", looks up (failing), and ends unsettled. No run ever reads the stored
    success: the debit stays unsettled with no ledger row although the carrier's final result
    is on the record ("late results still count")."""
    import workflows.settle
    from carriers.aggregator import JsonAggregatorAdapter

    monkeypatch.setattr(workflows.settle, "MAX_SETTLE_ATTEMPTS", 2)
    carrier_id = "fr-cote"
    msisdn = msisdn_for(carrier_id, "r2-late-pinned")
    prefix: list[str] = ["<none>"]
    original = JsonAggregatorAdapter.status

    async def slow_failing_lookup(self: JsonAggregatorAdapter, request: StatusRequest
                                  ) -> LookupResult:
        if not request.idempotency_key.startswith(prefix[0]):
            return await original(self, request)
        await asyncio.sleep(1.5)  # a carrier slow to answer, then failing
        return LookupResult.failed("look-up unavailable", "500")

    monkeypatch.setattr(JsonAggregatorAdapter, "status", slow_failing_lookup)
    await simulator.fault(carrier_id, "no_callback", msisdn)
    started = await subscribe(client, carrier_id, msisdn)
    prefix[0] = started.key_prefix
    key = f"{started.key_prefix}-c1-a0"
    handle = client.handle(started.subscription_id)
    state = await run_until(temporal_env, handle, lambda s: s.recent_cycles,
                            step=timedelta(minutes=2), rounds=30)
    assert [c.outcome for c in state.recent_cycles] == ["unsettled"]
    record = op(engine, key)
    assert record is not None and record.state == OperationState.UNSETTLED

    # the aggregator's interim callback, signed with its own key, then the genuine final one
    secret = settings.carrier_secrets["fr-cote-callback"].get_secret_value()
    interim = json.dumps({"order_id": key, "payment_id": record.carrier_reference,
                          "status": "accepted"}).encode()
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            f"{settings.callback_base_url}/callbacks/{carrier_id}", content=interim,
            headers={"Content-Type": "application/json",
                     "X-Callback-Signature": callback_signature(secret, interim)})
        assert answer.status_code == 200 and answer.json()["status"] == "settling", answer.text
        final = await simulator.control("callback", {"carrier": carrier_id, "key": key,
                                                     "outcome": "success"})
        assert final["status"] == 200, final
    late = temporal_env.client.get_workflow_handle(f"settle-{key}")
    settled: Any = await asyncio.wait_for(late.result(), 30)
    await asyncio.sleep(0.5)
    record = op(engine, key)
    await client.cancel_subscription(started.subscription_id)
    assert record is not None and record.reported_outcome == "succeeded"
    assert len(await debits(simulator, carrier_id, msisdn)) == 1
    assert record.state == OperationState.SETTLED and [
        e.idempotency_key for e in ledger_of(engine, started.subscription_id)] == [key], (
        f"the carrier's final success is on the record but the late settlement ran on the "
        f"interim report and ended {settled!r}: operation {record.state!r}, "
        f"ledger {ledger_of(engine, started.subscription_id)}")


# -- 4. giving up now does carrier I/O, retried forever, on the workflow's queue -----------------


async def test_a_cycle_whose_charge_is_given_up_always_ends(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Since 90181ce ``record_unsettled_operation`` settles inline when a result was pushed
    meanwhile: it calls ``settle_unsettled_operation``, i.e. the carrier's look-up. The
    workflow runs it with ``start_to_close_timeout=60 s`` and *no* retry policy (unbounded
    retries, no schedule-to-close), on the workflow's task queue (not the carrier's). A
    look-up that raises (CAMARA's does on every call today, see test 1; any answer an adapter
    cannot read) or that outlasts 60 s (CAMARA pages 20 times at the carrier timeout) makes
    the activity fail forever: the subscription never records the cycle, never bills again,
    and its run never ends, not even after a cancel. Here fr-cote's charge gets an
    out-of-credit callback while its look-up raises."""
    import workflows.settle
    from carriers.aggregator import JsonAggregatorAdapter

    monkeypatch.setattr(workflows.settle, "MAX_SETTLE_ATTEMPTS", 2)
    carrier_id = "fr-cote"
    msisdn = msisdn_for(carrier_id, "r2-give-up-hangs")
    prefix: list[str] = ["<none>"]
    original = JsonAggregatorAdapter.status

    async def unreadable_lookup(self: JsonAggregatorAdapter, request: StatusRequest
                                ) -> LookupResult:
        if not request.idempotency_key.startswith(prefix[0]):
            return await original(self, request)
        raise AttributeError("'str' object has no attribute 'get'")  # an answer it cannot read

    monkeypatch.setattr(JsonAggregatorAdapter, "status", unreadable_lookup)
    await simulator.fault(carrier_id, "no_callback", msisdn)
    started = await subscribe(client, carrier_id, msisdn)
    prefix[0] = started.key_prefix
    key = f"{started.key_prefix}-c1-a0"
    await wait_pending(engine, key)
    pushed = await simulator.control("callback", {"carrier": carrier_id, "key": key,
                                                  "outcome": "insufficient_funds"})
    assert pushed["status"] == 200, pushed
    handle = client.handle(started.subscription_id)
    try:
        state = await run_until(temporal_env, handle, lambda s: s.recent_cycles,
                                step=timedelta(hours=1), rounds=12)
        outcomes = [c.outcome for c in state.recent_cycles]
    except AssertionError:
        outcomes = []
    record = op(engine, key)
    monkeypatch.setattr(JsonAggregatorAdapter, "status", original)
    await client.cancel_subscription(started.subscription_id)
    with contextlib.suppress(RPCError):  # (it ends by itself once the fix is in)
        await handle.terminate("test over")
    assert outcomes == ["unsettled"], (
        f"12 hours later cycle 1 is still open ({outcomes}); operation "
        f"{record.state if record else None!r}: the workflow retries "
        f"record_unsettled_operation forever")


async def wait_pending(engine: Engine, key: str) -> None:
    for _ in range(200):
        found = op(engine, key)
        if found is not None and found.state == OperationState.PENDING:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{key} never pending: {op(engine, key)}")


# -- 5. a refund owed that the carrier never accepted can never be sent again -------------------


async def test_a_refund_the_carrier_only_ever_refused_is_sent_when_asked_again(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mx-maya (Parlay X, declares neither a look-up nor deduplication) throttles a refund
    for its whole week (Retry-After longer than the budget): every answer said "nothing was
    done". Round 1's fix lists it: ``_mark_unsettled`` now moves RETRYABLE → UNSETTLED ("refund
    owed, never accepted ... asking for it again ... sends only where that is safe"). But
    asking again can never send it: ``reserve`` claims only RETRYABLE, so the UNSETTLED record
    goes to ``settle``, which for a carrier without look-up or deduplication answers "unknown"
    every time — although the operation was never ambiguous (``ambiguous`` is False, no
    reference, no report), so sending it is exactly as safe as the first time. The refund the
    subscriber is owed is listed forever and never paid."""
    import workflows.settle

    monkeypatch.setattr(workflows.settle, "MAX_SETTLE_ATTEMPTS", 3)
    carrier_id = "mx-maya"
    msisdn = msisdn_for(carrier_id, "r2-refund-owed")
    started = await subscribe(client, carrier_id, msisdn)
    handle = client.handle(started.subscription_id)
    await run_until(temporal_env, handle, lambda s: s.charges_succeeded == 1,
                    step=timedelta(seconds=30))
    await simulator.fault(carrier_id, "throttle", msisdn, count=2, delay_seconds=10_000_000)
    first = await client.refund(started.subscription_id, 1)
    key = f"{started.key_prefix}-r1"
    record = op(engine, key)
    assert first.outcome == "unsettled" and record is not None
    assert record.state == OperationState.UNSETTLED and not record.ambiguous
    assert not [t for t in await simulator.transactions(carrier_id, msisdn)
                if t["kind"] == "refund"]

    # the carrier is fine again; the operator asks for the refund again
    again = await client.refund(started.subscription_id, 1)
    refunds = [t for t in await simulator.transactions(carrier_id, msisdn)
               if t["kind"] == "refund"]
    record = op(engine, key)
    await client.cancel_subscription(started.subscription_id)
    assert again.outcome == "succeeded" and len(refunds) == 1, (
        f"a refund never accepted by the carrier is asked again and ends {again.outcome!r} "
        f"({again.message!r}); operation {record.state if record else None!r}, "
        f"sent {record.sends if record else 0} times, carrier refunds {len(refunds)}")
