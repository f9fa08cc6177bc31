"""SubscriptionWorkflow: one per subscription, billing it on durable timers until cancelled."""

from __future__ import annotations

import asyncio
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
        LateSettlementOutput,
        SettledNotice,
        StatusInput,
        charge_key,
    )
    from models.money import format_major
    from workflows import search_attributes as sa
    from workflows.schedule import due_at
    from workflows.settle import OperationSettler, SettleBounds, Settled, record_unsettled
    from workflows.types import BillingState, CycleResult, SubscriptionInput

# Only our own faults (database, a worker lost) are retried inside the activity, briefly: every
# carrier answer comes back to the workflow, which waits on durable timers and reads callbacks
# between attempts. The operation record decides whether a call may send, so a retry never
# sends blindly.
CHARGE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=["ConfigurationError", "NotRefundable"],
)
CHARGE_TIMEOUT = timedelta(seconds=30)
CHARGE_SCHEDULE_TO_CLOSE = timedelta(minutes=5)
RECENT_CYCLES_KEPT = 12
UNSETTLED_KEYS_KEPT = 50

ACTIVE, PAST_DUE, CANCELLED, COMPLETED = "active", "past_due", "cancelled", "completed"
# BillingIssue values, the most urgent first
ISSUE_PRIORITY = ("configuration", "unsettled", "credentials_rejected")


@workflow.defn(name="SubscriptionWorkflow")
class SubscriptionWorkflow:
    @workflow.init
    def __init__(self, subscription: SubscriptionInput) -> None:
        self._input = subscription
        self._settler = OperationSettler()
        self._cancel_recorded: asyncio.Task[None] | None = None
        self._transient_issue: str | None = None
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
        """A callback or receipt relayed by the receiver. Only the operation being waited for,
        from this subscription's carrier, is kept: duplicates, late arrivals and results
        from another carrier change nothing."""
        self._settler.offer(report)

    @workflow.signal(name="operation_settled")
    def operation_settled(self, notice: SettledNotice) -> None:
        """A charge this workflow left unsettled was settled later (late result, look-up);
        the notice says how many of its charges the database still lists as unsettled."""
        if notice.idempotency_key in self._state.unsettled_keys:
            self._state.unsettled_keys.remove(notice.idempotency_key)
        self._state.unsettled_count = notice.still_unsettled
        self._refresh_issue()

    @workflow.update(name="cancel")
    async def cancel(self) -> BillingState:
        """Stops all future billing and returns once the cancellation is recorded: it waits for
        no charge. A charge already sent goes on being settled, since it may have debited."""
        self._state.cancel_requested = True
        await self._record_cancellation()
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
                if state.cancel_requested:
                    await self._record_cancellation()
                else:
                    await self._finish(COMPLETED)
                # a cancel update that arrived meanwhile gets its answer before we return
                await workflow.wait_condition(workflow.all_handlers_finished)
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
        await self._record_cancellation()
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

    def _key(self, cycle: int, slot: int) -> str:
        prefix = self._input.key_prefix or f"sub-{self._input.subscription_id}"
        return charge_key(prefix, cycle, slot)

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
                idempotency_key=self._key(cycle, slot),
                amount_minor=plan.amount_minor,
                currency=plan.currency,
                due_at=due,
                description=f"{self._input.product_id} cycle {cycle}",
            )
            settled = await self._charge(charge,
                                         f"charge cycle {cycle} attempt {attempts}: {price}")
            if settled.kind in ("unsettled", "error"):
                # money may have moved: no new key, no failure count; listed for operators.
                # (an error of ours: the operation, if it was recorded at all, is listed too)
                late = await self._leave_unsettled(charge.idempotency_key, settled.reason,
                                                   settled.kind == "error")
                if late is None or late.state != "settled" or late.outcome is None:
                    self._remember(CycleResult(cycle, due, settled.kind, attempts, None,
                                               settled.result.carrier_code if settled.result
                                               else None))
                    self._set_status(ACTIVE)
                    return
                # the carrier's own result arrived while we gave up: it decides the cycle
                settled = Settled("final", ChargeOutput(late.outcome, late.carrier_reference))
            result = settled.result
            assert result is not None
            last_code = result.carrier_code
            if settled.kind == "not_sent":
                outcome = "cancelled" if state.cancel_requested else "not_charged"
                if outcome == "not_charged":
                    state.cycles_not_charged += 1
                self._remember(CycleResult(cycle, due, outcome, attempts, None, last_code))
                self._set_status(ACTIVE)
                return
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

    async def _charge(self, charge: ChargeInput, summary: str) -> Settled[ChargeOutput]:
        """Charges, then settles any pending or unknown answer (a cancel stops resending
        after a refusal, never the settling of a charge that may have debited)."""
        plan = self._input.plan

        async def attempt(report: CarrierReport | None, summary: str) -> ChargeOutput:
            charge.reported = report
            return await workflow.execute_activity_method(
                BillingActivities.charge_subscription, charge,
                task_queue=self._input.carrier_task_queue,
                start_to_close_timeout=CHARGE_TIMEOUT,
                schedule_to_close_timeout=CHARGE_SCHEDULE_TO_CLOSE,
                retry_policy=CHARGE_RETRY, summary=summary)

        bounds = SettleBounds(plan.settle_delays_seconds,
                              deadline_seconds=plan.settle_deadline_seconds)
        return await self._settler.run(
            charge.idempotency_key, charge.carrier_id, attempt, summary, bounds,
            lambda: self._state.cancel_requested, self._set_transient_issue)

    async def _leave_unsettled(self, key: str, reason: str, configuration: bool
                               ) -> LateSettlementOutput | None:
        """Lists the charge as unsettled; a result the carrier pushed meanwhile settles it."""
        workflow.logger.warning("charge %s left unsettled: %s", key, reason)
        late = await record_unsettled(key, reason)
        if late is not None and late.state == "settled":
            return late
        if configuration:
            self._state.configuration_error = reason[:300]
        else:
            keys = self._state.unsettled_keys
            keys.append(key)
            del keys[:-UNSETTLED_KEYS_KEPT]
            self._state.unsettled_count += 1
        self._refresh_issue()
        return late

    def _set_transient_issue(self, issue: str | None) -> None:
        self._transient_issue = issue
        self._refresh_issue()

    def _refresh_issue(self) -> None:
        present = {
            "configuration": self._state.configuration_error is not None,
            "unsettled": self._state.unsettled_count > 0 or bool(self._state.unsettled_keys),
            "credentials_rejected": self._transient_issue == "credentials_rejected",
        }
        issue = next((name for name in ISSUE_PRIORITY if present[name]), None)
        if issue == self._state.billing_issue:
            return
        self._state.billing_issue = issue
        workflow.upsert_search_attributes(
            [sa.BILLING_ISSUE.value_set(issue) if issue else sa.BILLING_ISSUE.value_unset()])

    async def _record_cancellation(self) -> None:
        """Records the cancellation once, whoever asks first (the update or the loop)."""
        if self._cancel_recorded is None:
            self._cancel_recorded = asyncio.create_task(self._finish(CANCELLED))
        await self._cancel_recorded

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
