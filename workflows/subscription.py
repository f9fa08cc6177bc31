"""SubscriptionWorkflow: one per subscription, billing it on durable timers until cancelled."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    # modules whose dataclasses cross the payload converter must be in the sandbox's own
    # module table: type hints are resolved there
    import activities.delivery_messages  # noqa: F401
    import activities.notices  # noqa: F401
    import rules.types  # noqa: F401
    from activities.billing import BillingActivities
    from activities.messages import (
        OVERFLOW,
        CarrierReport,
        ChargeInput,
        ChargeOutput,
        LateSettlementOutput,
        SettledNotice,
        StatusInput,
        charge_key,
    )
    from models.money import format_major
    from rules import windows
    from workflows import search_attributes as sa
    from workflows.ruled_cycle import RuledCycles
    from workflows.schedule import due_at
    from workflows.settle import (
        CANCEL_ENDS_LIKE_THE_UPDATE,
        LATE_WORK_AWAITED_TO_THE_END,
        OperationSettler,
        SettleBounds,
        Settled,
        record_unsettled,
    )
    from workflows.types import (
        BillingState,
        ChangePlanRequest,
        CycleResult,
        RefundCycleRequest,
        RefundRecord,
        SubscriptionInput,
    )

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
PENDING_OPT_IN, OPT_IN_EXPIRED, PAUSED = "pending_opt_in", "opt_in_expired", "paused"
OPT_IN_TRIES = 3
CALENDAR_PERIODS = ("daily", "weekly", "monthly")
RENEWAL_SPREAD_STRIDE = 7919  # seconds; prime, so consecutive ids spread over the hour
REFUND_REQUESTS_KEPT = 50
# BillingIssue values, the most urgent first
ISSUE_PRIORITY = ("configuration", "refund_owed", "unsettled", "revoke_owed",
                  "credentials_rejected")


@workflow.defn(name="SubscriptionWorkflow")
class SubscriptionWorkflow:
    @workflow.init
    def __init__(self, subscription: SubscriptionInput) -> None:
        self._input = subscription
        self._settler = OperationSettler()
        self._cancel_recorded: asyncio.Task[None] | None = None
        self._transient_issue: str | None = None
        self._cycles = RuledCycles(self)
        # deliveries of charges settled late (started by a signal, awaited before the run ends)
        self._late_work: list[asyncio.Task[None]] = []
        self._pin: str | None = None
        if subscription.state is not None:
            self._state = subscription.state
        else:
            anchor = subscription.first_charge_at or workflow.now()
            if subscription.plan.trial_days:
                anchor += timedelta(days=subscription.plan.trial_days)
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
        if self._input.rules is not None and notice.outcome == "succeeded":
            # paid after all: what was paid for is delivered now (or refunded)
            self._late_work.append(asyncio.create_task(self._cycles.paid_late(
                notice.idempotency_key, notice.amount_minor)))

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

    @workflow.update(name="cancel_at_period_end")
    def cancel_at_period_end(self) -> BillingState:
        """No further charge: the subscription ends when the paid period does."""
        self._state.cancel_at_period_end = True
        return self._state

    @cancel_at_period_end.validator
    def _validate_cancel_at_period_end(self) -> None:
        self._validate_cancel()

    @workflow.update(name="pause")
    async def pause(self) -> BillingState:
        """No charge falls due while paused; a charge already under way finishes."""
        self._state.paused = True
        await self._persist_status(PAUSED)
        return self._state

    @pause.validator
    def _validate_pause(self) -> None:
        self._require_live("pause")
        if self._state.paused:
            raise ValueError("subscription is already paused")

    @workflow.update(name="resume")
    async def resume(self) -> BillingState:
        """Billing starts again; a cycle that fell due meanwhile is charged now and the
        following ones count from now."""
        state = self._state
        state.paused = state.suspended = False
        if state.next_charge_at < workflow.now():
            state.anchor, state.anchor_cycle = workflow.now(), state.next_cycle
            state.next_charge_at = workflow.now()
        await self._persist_status(ACTIVE)
        return state

    @resume.validator
    def _validate_resume(self) -> None:
        self._require_live("resume")
        if not (self._state.paused or self._state.suspended):
            raise ValueError("subscription is neither paused nor suspended")

    @workflow.update(name="change_plan")
    def change_plan(self, change: ChangePlanRequest) -> BillingState:
        """The new plan takes effect from the next cycle: its due time stays, the ones after
        follow the new period."""
        self._state.pending_plan = change.plan
        self._state.pending_rules = change.rules
        return self._state

    @change_plan.validator
    def _validate_change_plan(self, change: ChangePlanRequest) -> None:
        self._require_live("change the plan of")
        if self._input.plan.period == "one_off" or change.plan.period == "one_off":
            raise ValueError("a one-off purchase has no plan to change")
        if change.plan.currency != self._input.plan.currency:
            raise ValueError(f"the plan must be priced in {self._input.plan.currency}")
        if change.plan.amount_minor <= 0:
            raise ValueError("a plan's price must be positive")

    @workflow.update(name="confirm_opt_in")
    def confirm_opt_in(self, pin: str) -> BillingState:
        """The code the subscriber typed. A wrong one counts; the third ends the opt-in."""
        if self._pin is None or self._state.opt_in_failures >= OPT_IN_TRIES:
            # (updates validated together in one task: the count decides, not the validator)
            raise ApplicationError("this subscription is not waiting for a code",
                                   type="WrongCode")
        if pin.strip() == self._pin:
            self._state.opted_in = True
            return self._state
        self._state.opt_in_failures += 1
        if self._state.opt_in_failures >= OPT_IN_TRIES:
            self._pin = None  # no more guesses: the opt-in ends
        raise ApplicationError("the code does not match", type="WrongCode")

    @confirm_opt_in.validator
    def _validate_confirm_opt_in(self, pin: str) -> None:
        if self._state.status != PENDING_OPT_IN or self._pin is None or (
                self._state.opt_in_failures >= OPT_IN_TRIES):
            raise ValueError("this subscription is not waiting for a code")
        if not pin.strip().isdigit():
            raise ValueError("a code is digits only")

    @workflow.update(name="request_refund")
    async def request_refund(self, request: RefundCycleRequest) -> RefundRecord:
        """Refunds (part of) a charged cycle. Validated before anything is sent; the same
        request id always gives the same refund, never a second one."""
        state = self._state
        earlier = next((r for r in state.refund_requests if r.request_id == request.request_id),
                       None)
        if earlier is not None:
            await workflow.wait_condition(lambda: earlier.outcome != "requested")
            return earlier
        charged = self._charged_cycle(request.cycle)
        # checked again here: two updates' validators may both run before either handler
        if charged is None or charged.refunded_minor or any(
                r.cycle == request.cycle and r.outcome != "failed"
                for r in state.refund_requests):
            raise ApplicationError(f"cycle {request.cycle} is already refunded or being "
                                   "refunded", type="RefundRefused")
        amount = request.amount_minor or charged.paid_minor - charged.refunded_minor
        record = RefundRecord(request.request_id, request.cycle, amount, reason=request.reason)
        state.refund_requests.append(record)
        del state.refund_requests[:-REFUND_REQUESTS_KEPT]
        output = await self._cycles.refund(request.cycle, request.amount_minor, request.reason)
        record.outcome = output.outcome if output.outcome in ("succeeded", "unsettled") \
            else "failed"
        return record

    @request_refund.validator
    def _validate_request_refund(self, request: RefundCycleRequest) -> None:
        if not request.request_id.strip():
            raise ValueError("a refund needs a request id")
        for record in self._state.refund_requests:
            if record.request_id == request.request_id:
                if (record.cycle, record.amount_minor) != (
                        request.cycle, request.amount_minor or record.amount_minor):
                    raise ValueError(f"request id {request.request_id} was used for another "
                                     "refund")
                return
        charged = self._charged_cycle(request.cycle)
        if charged is None:
            raise ValueError(f"cycle {request.cycle} has no charge this subscription still "
                             "knows of")
        if charged.refunded_minor or any(r.cycle == request.cycle and r.outcome != "failed"
                                         for r in self._state.refund_requests):
            raise ValueError(f"cycle {request.cycle} is already refunded")
        if request.amount_minor is not None and not (
                0 < request.amount_minor <= charged.paid_minor):
            raise ValueError(f"a refund must be between 0 and the {charged.paid_minor} "
                             f"charged for cycle {request.cycle}")

    def _charged_cycle(self, cycle: int) -> CycleResult | None:
        for result in self._state.recent_cycles:
            if result.cycle == cycle and result.outcome == "succeeded" and result.amount_minor:
                return result
        return None

    def _require_live(self, action: str) -> None:
        if self._state.status in (CANCELLED, COMPLETED, OPT_IN_EXPIRED) or (
                self._state.cancel_requested):
            raise ValueError(f"cannot {action} a subscription that has ended")

    # -- what RuledCycles borrows -------------------------------------------------------------

    @property
    def billing(self) -> BillingState:
        return self._state

    @property
    def subscription(self) -> SubscriptionInput:
        return self._input

    def key(self, cycle: int, slot: int) -> str:
        return self._key(cycle, slot)

    def key_prefix(self) -> str:
        return self._input.key_prefix or f"sub-{self._input.subscription_id}"

    async def sleep_until(self, when: datetime, summary: str) -> bool:
        return await self._sleep_until(when, summary)

    async def charge(self, charge: ChargeInput, summary: str) -> Settled[ChargeOutput]:
        return await self._charge(charge, summary)

    async def settle_unsettled(self, charge: ChargeInput, settled: Settled[ChargeOutput]
                               ) -> Settled[ChargeOutput] | None:
        late = await self._leave_unsettled(charge.idempotency_key, settled.reason,
                                           settled.kind == "error")
        if late is None or late.state != "settled" or late.outcome is None:
            return None
        return Settled("final", ChargeOutput(late.outcome, late.carrier_reference))

    def remember(self, result: CycleResult) -> None:
        self._remember(result)

    def set_status(self, status: str) -> None:
        self._set_status(status)

    def refresh_issue(self) -> None:
        self._refresh_issue()

    # -- the billing loop ---------------------------------------------------------------------

    @workflow.run
    async def run(self, subscription: SubscriptionInput) -> BillingState:
        """A Temporal cancellation (the UI's Cancel) ends the subscription as the cancel update
        does, never by interrupting what is in flight: a charge's call finishes, a paid cycle
        is delivered (or refunded), a charge with no final answer is listed and looked up once;
        then the workflow closes as cancelled."""
        if workflow.cancellation_reason() is not None \
                and workflow.patched(CANCEL_ENDS_LIKE_THE_UPDATE):
            # cancelled before this first task ran: nothing is charged
            self._state.cancel_requested = True
            self._settler.end_soon()
        billing = asyncio.ensure_future(self._bill(subscription))
        try:
            return await asyncio.shield(billing)
        except asyncio.CancelledError:
            if not workflow.patched(CANCEL_ENDS_LIKE_THE_UPDATE):
                # (histories from before: the cancellation reached whatever billing awaited)
                billing.cancel()
                return await billing
            workflow.logger.warning("cancelled in Temporal: ending as the cancel update does")
            self._state.cancel_requested = True
            self._settler.end_soon()
            if self._input.rules is not None:
                await self._cycles.end_refunds_soon()
            await billing
            raise

    async def _bill(self, subscription: SubscriptionInput) -> BillingState:
        state = self._state
        cycles_this_run = 0
        if subscription.rules is not None and not await self._consent():
            await workflow.wait_condition(workflow.all_handlers_finished)
            return state
        while not state.cancel_requested:
            if subscription.rules is not None:
                if not await self._before_cycle():
                    break
                subscription = self._input
                await self._cycles.bill(state.next_cycle, state.next_charge_at)
            else:
                if not await self._sleep_until(state.next_charge_at,
                                               f"cycle {state.next_cycle} due"):
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
                await self._finish_late_work()
                # a cancel update waits for this run to finish: never make it wait for us
                await workflow.wait_condition(
                    lambda: workflow.all_handlers_finished() or state.cancel_requested)
                if not state.cancel_requested:
                    state.runs += 1
                    workflow.continue_as_new(replace(self._input, state=state))
        await self._record_cancellation()
        if workflow.patched(LATE_WORK_AWAITED_TO_THE_END):
            # a charge settled late while this run ends is still delivered (or refunded)
            while True:
                await self._finish_late_work()
                await workflow.wait_condition(
                    lambda: workflow.all_handlers_finished() or bool(self._late_work))
                if not self._late_work:
                    return state
        await self._finish_late_work()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return state

    def _due(self, cycle: int) -> datetime:
        plan, state = self._input.plan, self._state
        due = due_at(state.anchor, plan.period, cycle - state.anchor_cycle + 1,
                     plan.interval_seconds)
        if self._input.rules is not None and plan.period in CALENDAR_PERIODS:
            # renewals in the carrier's best local hour (an interval plan keeps its pace),
            # each subscription at its own minute of it, so a carrier's renewals do not all
            # fall due at once and queue behind its rate limit
            due = windows.local_charge_time(due, self._input.rules) + timedelta(
                seconds=self._input.subscription_id * RENEWAL_SPREAD_STRIDE % 3600)
        return due

    async def _consent(self) -> bool:
        """Double opt-in where the rules ask for it: a one-time code by SMS, typed back before
        the deadline. Without it nothing is ever charged. False: the subscription ended."""
        rules, state = self._input.rules, self._state
        assert rules is not None
        if rules.opt_in == "none" or state.opted_in or state.runs > 1:
            if state.runs == 1 and state.next_cycle == 1 and rules.welcome_text:
                await self._welcome()
            return True
        await self._persist_status(PENDING_OPT_IN)
        digits = max(rules.pin_digits, 4)
        self._pin = f"{workflow.random().randrange(10 ** digits):0{digits}d}"
        state.opt_in_deadline = workflow.now() + timedelta(seconds=rules.opt_in_deadline_seconds)
        await self._cycles.notify("opt_in_pin", f"{self.key_prefix()}-optin",
                                  {"pin": self._pin,
                                   "price": self._cycles.price_text(self._input.plan.amount_minor)})
        try:
            await workflow.wait_condition(
                lambda: state.opted_in or state.cancel_requested
                or state.opt_in_failures >= OPT_IN_TRIES,
                timeout=rules.opt_in_deadline_seconds, timeout_summary="opt-in deadline")
        except TimeoutError:
            pass
        self._pin = None
        if state.opted_in and not state.cancel_requested:
            await self._persist_status(ACTIVE)
            if rules.welcome_text:
                await self._welcome()
            # the first charge follows the consent, never precedes it
            if state.next_charge_at < workflow.now():
                state.anchor, state.next_charge_at = workflow.now(), workflow.now()
            return True
        if state.cancel_requested:
            await self._record_cancellation()
            return False
        why = (f"{state.opt_in_failures} wrong codes" if state.opt_in_failures >= OPT_IN_TRIES
               else f"no code within {rules.opt_in_deadline_seconds // 60} minutes")
        self._cycles.decide("refused", f"{rules.country_code}.opt_in", f"opt-in failed: {why}")
        await self._finish(OPT_IN_EXPIRED)
        return False

    async def _welcome(self) -> None:
        await self._cycles.notify("welcome", f"{self.key_prefix()}-welcome",
                                  {"price": self._cycles.price_text(self._input.plan.amount_minor)})

    async def _before_cycle(self) -> bool:
        """Everything before a ruled cycle's charge: the renewal reminder, the due time, a
        pause, a cancel at the period's end, a plan change. False: stop billing."""
        state, rules = self._state, self._input.rules
        assert rules is not None
        cycle = state.next_cycle
        days = rules.renewal_reminder_days_before or (3 if rules.monthly_reminder else None)
        if days and cycle > 1 and self._input.plan.period == "monthly":
            remind_at = state.next_charge_at - timedelta(days=days)
            if remind_at > workflow.now():
                if not await self._sleep_until(remind_at, f"cycle {cycle} reminder"):
                    return False
                if not (state.paused or state.suspended or state.cancel_at_period_end):
                    await self._cycles.notify(
                        "renewal_reminder", f"{self.key_prefix()}-n{cycle}",
                        {"price": self._cycles.price_text(self._input.plan.amount_minor),
                         "date": state.next_charge_at.date().isoformat()})
        if not await self._sleep_until(state.next_charge_at, f"cycle {cycle} due"):
            return False
        if state.paused or state.suspended:
            await workflow.wait_condition(
                lambda: not (state.paused or state.suspended) or state.cancel_requested)
            if state.cancel_requested:
                return False
            if not await self._sleep_until(state.next_charge_at, f"cycle {cycle} due"):
                return False
        if state.cancel_at_period_end:
            state.cancel_requested = True
            return False
        if state.pending_plan is not None:
            plan, rules = state.pending_plan, state.pending_rules or rules
            self._input = replace(self._input, plan=plan, rules=rules,
                                  price_point_id=plan.price_point_id or self._input.price_point_id)
            state.pending_plan = state.pending_rules = None
            state.anchor, state.anchor_cycle = state.next_charge_at, cycle
        return True

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
        return charge_key(self.key_prefix(), cycle, slot)

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
            if self._input.local_charges:
                # in this worker first (no queue round trip, half the history); a worker with
                # no room for the carrier sends it to the carrier's queue
                here: ChargeOutput = await workflow.execute_local_activity_method(
                    BillingActivities.charge_subscription, charge,
                    # (the key names the attempt in the history, where a local activity's
                    # input is not kept)
                    activity_id=charge.idempotency_key,
                    start_to_close_timeout=CHARGE_TIMEOUT,
                    schedule_to_close_timeout=CHARGE_SCHEDULE_TO_CLOSE,
                    retry_policy=CHARGE_RETRY,
                    # a fault of ours (the database away) is retried on durable timers, not
                    # inside a workflow task held open meanwhile
                    local_retry_threshold=timedelta(seconds=1), summary=summary)
                if here.outcome != OVERFLOW:
                    return here
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
        late = await record_unsettled(key, reason, look_up=self._settler.ending)
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
            "refund_owed": bool(self._state.refunds_owed),
            "revoke_owed": bool(self._state.revokes_owed),
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

    async def _finish_late_work(self) -> None:
        while self._late_work:
            await self._late_work.pop()

    async def _persist_status(self, status: str) -> None:
        """A status the database must hold too (it keeps one live subscription per product)."""
        self._set_status(status)
        await workflow.execute_activity_method(
            BillingActivities.record_subscription_status,
            StatusInput(self._input.subscription_id, status, workflow.now()),
            start_to_close_timeout=timedelta(seconds=30), summary=f"mark subscription {status}")

    async def _finish(self, status: str) -> None:
        await workflow.execute_activity_method(
            BillingActivities.record_subscription_status,
            StatusInput(self._input.subscription_id, status, workflow.now()),
            start_to_close_timeout=timedelta(seconds=30),
            summary=f"mark subscription {status}",
        )
        workflow.set_current_details(f"subscription {status}")
        self._set_status(status)
