"""Attacks from an adversarial review of the money paths. Each test's docstring tells the attack
as it first succeeded; its name tells the guarantee it now checks. Real stack (time-skipping
server, simulators on sockets, the real receiver and worker) where feasible; otherwise a
focused test of the deciding function or store."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from activities.billing import BillingActivities
from carriers.loader import default_registry
from carriers.numbers import sample_msisdn
from models import operations
from models.tables import (
    CarrierInteraction,
    CarrierOperation,
    LedgerEntry,
    OperationState,
    Period,
)
from starter import StartedSubscription, StartSubscriptionRequest, SubscriptionClient
from tests.conftest import Simulator
from workflows.subscription import SubscriptionWorkflow
from workflows.types import BillingState

REGISTRY = default_registry()


# -- helpers -------------------------------------------------------------------------------------


def msisdn_for(carrier_id: str, seed: object) -> str:
    return sample_msisdn(REGISTRY.carriers[carrier_id], REGISTRY,
                         random.Random(f"attacks-{seed}"))


async def subscribe(client: SubscriptionClient, carrier_id: str, msisdn: str,
                    first: datetime | None = None) -> StartedSubscription:
    carrier = REGISTRY.carriers[carrier_id]
    price = next(p for p in carrier.price_points if p.period is Period.MONTHLY)
    return await client.start_subscription(StartSubscriptionRequest(
        msisdn=msisdn, product_id=price.product, period=price.period,
        amount_minor=REGISTRY.amount_minor(carrier_id, price),
        currency=REGISTRY.currency_of(carrier_id), first_charge_at=first))


def op(engine: Engine, key: str) -> CarrierOperation | None:
    with Session(engine) as session:
        return operations.find(session, key)


def ledger_of(engine: Engine, subscription_id: int) -> list[LedgerEntry]:
    with Session(engine) as session:
        return list(session.exec(select(LedgerEntry).where(
            LedgerEntry.subscription_id == subscription_id)))


def sends(engine: Engine, key: str, operation_name: str = "charge") -> int:
    with Session(engine) as session:
        return len(session.exec(select(CarrierInteraction).where(
            CarrierInteraction.idempotency_key == key,
            CarrierInteraction.operation == operation_name)).all())


async def debits(simulator: Simulator, carrier_id: str, msisdn: str) -> list[dict[str, Any]]:
    return [t for t in await simulator.transactions(carrier_id, msisdn) if t["kind"] == "charge"]


async def wait_state(engine: Engine, key: str, states: tuple[str, ...],
                     seconds: float = 10.0) -> CarrierOperation:
    for _ in range(int(seconds / 0.05)):
        found = op(engine, key)
        if found is not None and found.state in states:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{key} never reached {states}: {op(engine, key)}")


async def run_until(env: WorkflowEnvironment, handle: WorkflowHandle[Any, Any], done: Any,
                    step: timedelta, rounds: int = 200) -> BillingState:
    state: BillingState = await handle.query(SubscriptionWorkflow.state)
    for _ in range(rounds):
        state = await handle.query(SubscriptionWorkflow.state)
        if done(state):
            return state
        await env.sleep(step)
    raise AssertionError(f"not reached: {state}")


async def closed(env: WorkflowEnvironment, handle: WorkflowHandle[Any, Any],
                 step: timedelta = timedelta(seconds=30)) -> None:
    for _ in range(200):
        if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            return
        await env.sleep(step)
    raise AssertionError("workflow never ended")


# -- 1. "not found" before the carrier commits: a second debit ------------------------------------


@pytest.mark.parametrize("carrier_id", ["de-alpen", "br-ipe"])
async def test_a_charge_the_carrier_took_but_has_not_committed_is_never_sent_again(
    carrier_id: str, client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """The carrier takes the charge and answers "pending"/"processing" *with its own reference*,
    but commits (becomes visible to look-ups and to its key de-duplication) only a few seconds
    later. The workflow's first settle look-up (after a 1 s / 20 s durable timer) gets "not
    found"; since the carrier "deduplicates", settlement.settle resends under the same key — and
    the carrier, not seeing the uncommitted first charge, debits again."""
    msisdn = msisdn_for(carrier_id, f"commit-{carrier_id}")
    await simulator.fault(carrier_id, "commit_after_reply", msisdn, delay_seconds=6)
    started = await subscribe(client, carrier_id, msisdn)
    key = f"{started.key_prefix}-c1-a0"
    handle = client.handle(started.subscription_id)
    await wait_state(engine, key, (OperationState.PENDING,))
    # look-ups say "not found" while the carrier has not committed; none may send again
    await temporal_env.sleep(timedelta(minutes=30))
    assert sends(engine, key) == 1
    await asyncio.sleep(6.5)  # let the simulator commit everything it took
    state = await run_until(temporal_env, handle, lambda s: s.recent_cycles,
                            step=timedelta(seconds=30))
    taken = await debits(simulator, carrier_id, msisdn)
    await client.cancel_subscription(started.subscription_id)
    assert len(taken) == 1, (f"subscriber debited {len(taken)} times for one cycle "
                             f"(sent {sends(engine, key)} times): {state.recent_cycles}, "
                             f"ledger {len(ledger_of(engine, started.subscription_id))}")


async def test_a_crash_between_send_and_record_never_leads_to_a_second_debit(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Crash window send → conclude on a synchronous OneAPI carrier (fr-azur, "replay"): the
    carrier debits and answers, but the worker loses the answer (database restart / worker
    killed before ``_conclude`` writes it). The activity retry finds the operation SENDING, looks
    it up at once (no wait at all), gets "not found" because the carrier commits a few seconds
    after replying, and resends: a second debit, one ledger row."""
    msisdn = msisdn_for("fr-azur", "crash-window")
    crashed: list[str] = []
    original = BillingActivities._conclude

    def crash_once(self: BillingActivities, operation: CarrierOperation, *args: Any,
                   **kwargs: Any) -> None:
        if operation.idempotency_key.endswith("-c1-a0") and not crashed \
                and operation.carrier_id == "fr-azur":
            crashed.append(operation.idempotency_key)
            raise ConnectionError("database restarting: answer not written")
        original(self, operation, *args, **kwargs)

    monkeypatch.setattr(BillingActivities, "_conclude", crash_once)
    await simulator.fault("fr-azur", "commit_after_reply", msisdn, delay_seconds=6)
    started = await subscribe(client, "fr-azur", msisdn)
    key = f"{started.key_prefix}-c1-a0"
    handle = client.handle(started.subscription_id)
    await temporal_env.sleep(timedelta(minutes=30))  # many "not found" look-ups meanwhile
    assert sends(engine, key) == 1
    await asyncio.sleep(6.5)  # the carrier commits what it took
    state = await run_until(temporal_env, handle, lambda s: s.recent_cycles,
                            step=timedelta(seconds=30))
    monkeypatch.setattr(BillingActivities, "_conclude", original)
    await client.cancel_subscription(started.subscription_id)
    taken = await debits(simulator, "fr-azur", msisdn)
    assert crashed == [key]
    assert len(taken) == 1, (f"subscriber debited {len(taken)} times for one cycle "
                             f"(sent {sends(engine, key)} times): {state.recent_cycles}, "
                             f"ledger {len(ledger_of(engine, started.subscription_id))}")


# -- 2. a transient answer to the *resend* erases the ambiguity of the first send --------------


async def test_a_debit_whose_answer_is_late_is_in_the_ledger_or_listed_after_a_cancel(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """The first send was taken (pending, with the carrier's reference) but is not yet visible;
    the look-up says "not found", the resend is answered 503 (busy). ``_conclude`` moves the
    operation SENDING → RETRYABLE ("the carrier did nothing") although the *first* send did
    debit, and since a cancel arrived the settler returns ``not_sent``: the cycle is recorded
    "cancelled", no ledger entry, and the operation is RETRYABLE — not UNSETTLED, so nobody will
    ever look at the debit (not listed, no BillingIssue, late results relayed to a closed
    workflow are dropped)."""
    carrier_id = "de-alpen"
    msisdn = msisdn_for(carrier_id, "resend-503")
    await simulator.fault(carrier_id, "commit_after_reply", msisdn, delay_seconds=30)
    await simulator.fault(carrier_id, "error_503", msisdn)
    started = await subscribe(client, carrier_id, msisdn)
    key = f"{started.key_prefix}-c1-a0"
    await wait_state(engine, key, (OperationState.PENDING,))
    handle = client.handle(started.subscription_id)
    cancelled = await asyncio.wait_for(client.cancel_subscription(started.subscription_id), 10)
    assert cancelled.status == "cancelled"
    await closed(temporal_env, handle, step=timedelta(minutes=10))
    state = await handle.result()
    taken = await debits(simulator, carrier_id, msisdn)
    record = op(engine, key)
    assert record is not None
    assert len(taken) == 1  # the carrier did take the money, once
    accounted = bool(ledger_of(engine, started.subscription_id)) or \
        record.state == OperationState.UNSETTLED
    assert accounted, (f"debit {taken[0]['serverReferenceCode']} has no ledger row and its "
                       f"operation is {record.state!r} (cycle: {state.recent_cycles})")


# -- 3. relay vs the workflow giving up: a genuine late result is never applied ---------------


async def test_a_success_pushed_while_the_workflow_gives_up_is_applied(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Race relay ↔ workflow: the settler has given up (look-ups failing) and the workflow is
    running ``record_unsettled_operation``. The carrier's genuine "completed" callback arrives
    in that window: the relay reads the operation as PENDING, stores the report and signals the
    workflow, which no longer waits for it and drops it. Then the operation becomes UNSETTLED.
    No LateSettlementWorkflow is ever started (the relay only starts one for an operation it
    already saw UNSETTLED), so the debit the carrier confirmed stays unsettled with no ledger
    row, although the design promises "pushed results ... reaching no running workflow are
    still read"."""
    import workflows.settle

    monkeypatch.setattr(workflows.settle, "MAX_SETTLE_ATTEMPTS", 3)
    carrier_id = "fr-cote"
    msisdn = msisdn_for(carrier_id, "relay-race")
    await simulator.fault(carrier_id, "no_callback", msisdn)
    await simulator.control("faults", {"carrier": carrier_id, "kind": "lookup_error",
                                       "count": 3})
    delivered: list[Any] = []
    original = BillingActivities._mark_unsettled

    def callback_first(self: BillingActivities, request: Any) -> Any:
        if request.idempotency_key.startswith(started_prefix[0]):
            answer = httpx.post(f"{simulator.url}/_control/callback", json={
                "carrier": carrier_id, "key": request.idempotency_key, "outcome": "success"},
                timeout=10)
            delivered.append(answer.json())
        return original(self, request)

    started_prefix: list[str] = ["<none>"]
    monkeypatch.setattr(BillingActivities, "_mark_unsettled", callback_first)
    started = await subscribe(client, carrier_id, msisdn)
    started_prefix[0] = started.key_prefix
    key = f"{started.key_prefix}-c1-a0"
    handle = client.handle(started.subscription_id)
    state = await run_until(temporal_env, handle, lambda s: s.recent_cycles,
                            step=timedelta(hours=2))
    await asyncio.sleep(1.0)  # give any late settlement every chance
    record = op(engine, key)
    await client.cancel_subscription(started.subscription_id)
    # the result pushed while the workflow gave up is applied then: the cycle is charged
    assert [c.outcome for c in state.recent_cycles] == ["succeeded"]
    assert [e.idempotency_key for e in ledger_of(engine, started.subscription_id)] == [key]
    assert delivered and delivered[0]["status"] == 200, delivered
    assert record is not None and record.reported_outcome == "succeeded"
    assert len(await debits(simulator, carrier_id, msisdn)) == 1
    assert record.state == OperationState.SETTLED, (
        f"a genuine success the carrier pushed is stored on the record but never applied: "
        f"state {record.state!r}, ledger {ledger_of(engine, started.subscription_id)}")


# -- 4. SMPP receipts matched by a reused message id, whatever the number ----------------------


def test_an_smpp_receipt_never_settles_another_subscribers_charge_on_a_reused_id(
    engine: Engine,
) -> None:
    """SMSCs reuse message ids (the store's own comment says so). A receipt for subscriber A's
    earlier, already settled submission (redelivered after a rebind, as the adapter invites by
    leaving receipts unacknowledged) carries id M; subscriber B's open submission was later given
    the same id M. ``_match_receipt`` filters by message id only — not by the receipt's source
    number — and prefers the open row: A's DELIVRD settles B's charge (a ledger row with no
    debit if B's was refused), or A's REJECTD:088 fails B's (a new retry slot, a second debit).
    For SMPP the "confirming look-up" reads the very row the receipt just wrote."""
    import uuid

    from models.smpp_store import SubmissionStore

    store = SubmissionStore(engine)
    carrier_id = "gb-mersey"
    reused = f"reused-{uuid.uuid4().hex[:8]}"
    key_a, key_b = f"attack-a-{reused}", f"attack-b-{reused}"
    a_msisdn, b_msisdn = "+447700900101", "+447700900202"

    row_a, _ = store._reserve(carrier_id, key_a, a_msisdn)
    store._submitted(carrier_id, key_a, reused)
    assert row_a.id is not None
    store._settled(row_a.id, True, reused, "DELIVRD", "000")
    store._reserve(carrier_id, key_b, b_msisdn)
    store._submitted(carrier_id, key_b, reused)

    # the SMSC redelivers A's receipt: source is A's number
    matched = store._match_receipt(carrier_id, reused, None, a_msisdn)
    assert matched is None or matched.idempotency_key == key_a, (
        f"A's receipt (from {a_msisdn}) was matched to {matched.idempotency_key} "
        f"for {matched.msisdn}")


# -- 5. classifications of answers that may follow a debit -------------------------------------


def test_a_generic_service_error_on_a_charge_is_unknown_not_a_rejection(
) -> None:
    """A charge answered HTTP 500 with the generic ServiceException SVC0001 ("A service error
    occurred" — what the simulator itself answers for a server-side failure) is mapped to
    REJECTED: final, no settling, no look-up, no ledger, cycle failed. A 5xx generic service
    error says nothing about whether the debit happened before the failure; the module's own
    rule ("an unlisted service error is not known to be [final]") is overridden by the explicit
    SVC0001 → REJECTED entry in carriers/exceptions.py. The Parlay X mapping shares it."""
    import json

    from carriers.base import Outcome
    from carriers.http import HttpReply
    from carriers.oneapi import map_reply

    reply = HttpReply(500, json.dumps({"requestError": {"serviceException": {
        "messageId": "SVC0001", "text": "A service error occurred. Error code is %1"}}}),
        httpx.Headers({"Content-Type": "application/json"}))
    result = map_reply(reply, "Charged")
    assert result.outcome is not Outcome.REJECTED, result
    assert result.outcome is Outcome.UNKNOWN, result


# -- 6. the transient loop is bounded neither in attempts nor in waiting ------------------------


async def test_retry_after_one_second_is_resent_on_our_backoff_and_bounded(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """A carrier throttling with ``Retry-After: 1`` (the simulator's own 503 outage answer does
    this) is obeyed as is: ``OperationSettler.run`` counts settle attempts against
    MAX_SETTLE_ATTEMPTS ("rather than let the history grow toward Temporal's limit") but never
    transient ones, and takes ``retry_after_seconds`` with no floor. One day of it is 86 400
    activities (~10 events each) in one workflow run: far past the 51 200-event limit, at
    which Temporal terminates the subscription workflow."""
    from workflows.settle import MAX_SETTLE_ATTEMPTS

    carrier_id = "fr-lumiere"
    msisdn = msisdn_for(carrier_id, "throttle-floor")
    await simulator.fault(carrier_id, "throttle", msisdn, count=MAX_SETTLE_ATTEMPTS + 60,
                          delay_seconds=1)
    started = await subscribe(client, carrier_id, msisdn)
    key = f"{started.key_prefix}-c1-a0"
    handle = client.handle(started.subscription_id)
    state = await run_until(temporal_env, handle, lambda s: s.recent_cycles,
                            step=timedelta(hours=1), rounds=30)
    events = 0
    async for _ in handle.fetch_history_events():
        events += 1
    sent = sends(engine, key)
    await client.cancel_subscription(started.subscription_id)
    # a day of refusals, sent again on our backoff (not the carrier's 1 s), then given up:
    # nothing was charged, and the history stays small
    assert [c.outcome for c in state.recent_cycles] == ["not_charged"]
    assert sent <= 60 and events < 1000, (
        f"{sent} sends of one charge ({events} history events) in a day of Retry-After: 1")
    assert sent <= MAX_SETTLE_ATTEMPTS


async def test_a_huge_retry_after_cannot_stall_a_cycle_past_the_transient_limit(
    client: SubscriptionClient, simulator: Simulator, temporal_env: WorkflowEnvironment,
) -> None:
    """``Retry-After`` has no ceiling either, and the transient limit (one day) is checked only
    before the wait: one 429 with ``Retry-After: 100000000`` parks the charge for ~3 years.
    The cycle neither charges nor is recorded "not_charged", the next cycle never comes, and no
    BillingIssue says so."""
    carrier_id = "it-tirreno"
    msisdn = msisdn_for(carrier_id, "retry-after-ceiling")
    await simulator.fault(carrier_id, "throttle", msisdn, delay_seconds=100_000_000)
    started = await subscribe(client, carrier_id, msisdn)
    handle = client.handle(started.subscription_id)
    try:
        state = await run_until(temporal_env, handle, lambda s: s.recent_cycles,
                                step=timedelta(hours=12), rounds=6)
    except AssertionError as stalled:
        state = None
        reason = str(stalled)
    await client.cancel_subscription(started.subscription_id)
    assert state is not None, f"cycle 1 still open after 3 days: {reason}"


# -- 7. a refund owed is silently dropped after a day of carrier throttling ---------------------


async def test_a_refund_throttled_for_a_day_is_still_sent(
    client: SubscriptionClient, simulator: Simulator, engine: Engine,
    temporal_env: WorkflowEnvironment,
) -> None:
    """RefundWorkflow says "a refund is owed to the subscriber: nothing stops resending one the
    carrier refused" (stop_sending=lambda: False), yet the shared transient limit (one day)
    ends it as ``not_sent``: the workflow completes with outcome "transient", the operation
    stays RETRYABLE (not listed as unsettled, no BillingIssue), and nothing ever sends it. Two
    long throttles (Retry-After 50 000 s) are enough; the third attempt would have gone
    through."""
    carrier_id = "fr-azur"
    msisdn = msisdn_for(carrier_id, "refund-dropped")
    started = await subscribe(client, carrier_id, msisdn)
    handle = client.handle(started.subscription_id)
    await run_until(temporal_env, handle, lambda s: s.charges_succeeded == 1,
                    step=timedelta(seconds=30))
    await simulator.fault(carrier_id, "throttle", msisdn, count=3, delay_seconds=50_000)
    refund = await client.refund(started.subscription_id, 1)
    await client.cancel_subscription(started.subscription_id)
    key = f"{started.key_prefix}-r1"
    record = op(engine, key)
    refunds = [t for t in await simulator.transactions(carrier_id, msisdn) if t["kind"] == "refund"]
    assert refund.outcome == "succeeded", (
        f"refund ended {refund.outcome!r} after {sends(engine, key, 'refund')} sends; "
        f"operation {record.state if record else None!r}, carrier refunds {len(refunds)}")
