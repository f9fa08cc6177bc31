"""SubscriptionWorkflow: one per subscription, billing it on durable timers until cancelled."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.billing import BillingActivities
    from activities.messages import (
        CarrierReport,
        ChargeInput,
        ChargeOutput,
        StatusInput,
        charge_key,
    )
    from models.money import format_major
    from workflows import search_attributes as sa
    from workflows.schedule import due_at
    from workflows.settle import PendingSettler, SettlementAbandoned
    from workflows.types import BillingState, CycleResult, SubscriptionInput

# A charge is retried with the same idempotency key until the carrier gives a final answer:
# the key makes repeats harmless, and giving up on an ambiguous charge could lose money.
CHARGE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
)
CHARGE_TIMEOUT = timedelta(seconds=30)
RECENT_CYCLES_KEPT = 12

ACTIVE, PAST_DUE, CANCELLED, COMPLETED = "active", "past_due", "cancelled", "completed"


@workflow.defn(name="SubscriptionWorkflow")
class SubscriptionWorkflow:
    @workflow.init
    def __init__(self, subscription: SubscriptionInput) -> None:
        self._input = subscription
        self._settler = PendingSettler()
        if subscription.state is not None:
            self._state = subscription.state
        else:
            anchor = subscription.first_charge_at or workflow.now()
            self._state = BillingState(anchor=anchor, next_cycle=1, next_charge_at=anchor,
                                       status=ACTIVE)

    # -- operator and client handlers ---------------------------------------------------------

    @workflow.query(name="state")
    def state(self) -> BillingState:
        return self._state

    @workflow.signal(name="request_cancel")
    def request_cancel(self) -> None:
        self._state.cancel_requested = True

    @workflow.signal(name="carrier_result")
    def carrier_result(self, report: CarrierReport) -> None:
        """A callback or receipt relayed by the receiver. Only the operation being waited for
        is kept: duplicates and late arrivals change nothing."""
        self._settler.offer(report)

    @workflow.update(name="cancel")
    async def cancel(self) -> BillingState:
        """Stops all future billing; returns once the workflow has recorded the cancellation.
        A charge already in flight is allowed to finish, since it may already have debited."""
        self._state.cancel_requested = True
        await workflow.wait_condition(lambda: self._state.status == CANCELLED)
        return self._state

    @cancel.validator
    def _validate_cancel(self) -> None:
        if self._state.status == COMPLETED:
            raise ValueError("subscription has already completed")

    # -- the billing loop ---------------------------------------------------------------------

    @workflow.run
    async def run(self, subscription: SubscriptionInput) -> BillingState:
        state = self._state
        cycles_this_run = 0
        while not state.cancel_requested:
            if not await self._sleep_until(state.next_charge_at, f"cycle {state.next_cycle} due"):
                break
            await self._bill_cycle(state.next_cycle, state.next_charge_at)
            cycles_this_run += 1
            if subscription.plan.period == "one_off":
                await self._finish(COMPLETED)
                return state
            state.next_cycle += 1
            state.next_charge_at = self._due(state.next_cycle)
            if (cycles_this_run >= subscription.cycles_per_run
                    or workflow.info().is_continue_as_new_suggested()):
                # a cancel update waits for this run to finish: never make it wait for us
                await workflow.wait_condition(
                    lambda: workflow.all_handlers_finished() or state.cancel_requested)
                if not state.cancel_requested:
                    state.runs += 1
                    workflow.continue_as_new(replace(subscription, state=state))
        await self._finish(CANCELLED)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return state

    def _due(self, cycle: int) -> datetime:
        plan = self._input.plan
        return due_at(self._state.anchor, plan.period, cycle, plan.interval_seconds)

    async def _sleep_until(self, when: datetime, summary: str) -> bool:
        """Sleeps on a durable timer until ``when``; False if a cancel arrived first."""
        delay = (when - workflow.now()).total_seconds()
        if delay > 0:
            try:
                await workflow.wait_condition(
                    lambda: self._state.cancel_requested, timeout=delay, timeout_summary=summary
                )
            except TimeoutError:
                pass
        return not self._state.cancel_requested

    async def _bill_cycle(self, cycle: int, due: datetime) -> None:
        state, plan = self._state, self._input.plan
        price = f"{format_major(plan.amount_minor, plan.currency)} {plan.currency}"
        attempts = 0
        last_code: str | None = None
        for slot, delay in enumerate([0, *plan.retry_delays_seconds]):
            if slot > 0:
                self._set_status(PAST_DUE)
                retry_at = workflow.now() + timedelta(seconds=delay)
                if not await self._sleep_until(retry_at, f"cycle {cycle} retry {slot}"):
                    self._remember(CycleResult(cycle, due, "cancelled", attempts, None, last_code))
                    return
                state.insufficient_funds_retries += 1
            attempts += 1
            workflow.set_current_details(f"charging cycle {cycle}, attempt {attempts}: {price}")
            charge = ChargeInput(
                subscription_id=self._input.subscription_id,
                subscriber_id=self._input.subscriber_id,
                carrier_id=self._input.carrier_id,
                cycle=cycle,
                attempt_slot=slot,
                idempotency_key=charge_key(self._input.subscription_id, cycle, slot),
                amount_minor=plan.amount_minor,
                currency=plan.currency,
                due_at=due,
                description=f"{self._input.product_id} cycle {cycle}",
            )
            try:
                result = await self._charge(charge,
                                            f"charge cycle {cycle} attempt {attempts}: {price}")
            except SettlementAbandoned:
                # money may have moved: no retry, no failure count; reconciliation settles it
                self._remember(CycleResult(cycle, due, "unsettled", attempts, None, None))
                self._set_status(ACTIVE)
                return
            last_code = result.carrier_code
            if result.outcome == "succeeded":
                state.charges_succeeded += 1
                state.amount_charged_minor += plan.amount_minor
                self._remember(CycleResult(cycle, due, "succeeded", attempts,
                                           result.carrier_reference, result.carrier_code))
                self._set_status(ACTIVE)
                return
            if result.outcome != "insufficient_funds":
                break  # permanently rejected: retrying cannot help
        state.cycles_failed += 1
        self._remember(CycleResult(cycle, due, "failed", attempts, None, last_code))
        self._set_status(ACTIVE)

    async def _charge(self, charge: ChargeInput, summary: str) -> ChargeOutput:
        """Charges; a pending answer is settled (cancelling does not stop a settlement)."""

        async def settle(report: CarrierReport | None) -> ChargeOutput:
            charge.settling, charge.reported = True, report
            source = "reported result" if report else "status look-up"
            return await self._run_charge(charge, f"settle {charge.idempotency_key} by {source}")

        return await self._settler.run(
            charge.idempotency_key, lambda: self._run_charge(charge, summary),
            self._input.plan.settle_delays_seconds, settle)

    async def _run_charge(self, charge: ChargeInput, summary: str) -> ChargeOutput:
        return await workflow.execute_activity_method(
            BillingActivities.charge_subscription,
            charge,
            start_to_close_timeout=CHARGE_TIMEOUT,
            retry_policy=CHARGE_RETRY,
            summary=summary,
        )

    def _remember(self, result: CycleResult) -> None:
        recent = self._state.recent_cycles
        recent.append(result)
        del recent[:-RECENT_CYCLES_KEPT]

    def _set_status(self, status: str) -> None:
        if self._state.status == status:
            return
        self._state.status = status
        workflow.upsert_search_attributes([sa.SUBSCRIPTION_STATUS.value_set(status)])

    async def _finish(self, status: str) -> None:
        await workflow.execute_activity_method(
            BillingActivities.record_subscription_status,
            StatusInput(self._input.subscription_id, status, workflow.now()),
            start_to_close_timeout=timedelta(seconds=30),
            summary=f"mark subscription {status}",
        )
        workflow.set_current_details(f"subscription {status}")
        self._set_status(status)
