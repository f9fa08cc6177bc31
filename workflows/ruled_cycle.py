"""Billing one cycle under a subscription's rules (country, carrier, product: all data).

The steps, each shown in the workflow's history and state:

* the charging window in the subscriber's local time and the carrier's maintenance windows:
  a charge that may not run now is postponed to the next allowed moment, never dropped;
* a balance check where the carrier offers one, read by the carrier's balance policy;
* the charge, refused before anything is sent when a spend cap would be passed (a cap that
  rolls over postpones the charge to the roll-over; a per-transaction cap refuses the cycle);
* the price ladder when funds are short (a partial payment buys proportionally less);
* retries on the rules' schedule, bounded per cycle and per day, then skip, suspend or cancel;
* after payment, delivery of the product variant; a delivery that fails is compensated by a
  refund (and the entitlement revoked), so nothing is charged without delivery.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ChildWorkflowError,
    FailureError,
    WorkflowAlreadyStartedError,
)

with workflow.unsafe.imports_passed_through():
    from activities.billing import BillingActivities
    from activities.delivery_messages import (
        DeliveryInput,
        DeliveryOutput,
        RevokeInput,
        delivery_key,
    )
    from activities.messages import (
        BalanceInput,
        BalanceOutput,
        ChargeInput,
        ChargeOutput,
        DecisionNote,
        RefundOutput,
        refund_key,
    )
    from activities.notices import NoticeInput
    from models.ledger import refund_key_of_charge
    from models.money import format_major
    from rules import caps as cap_rules
    from rules import ladder as ladder_rules
    from rules import retry as retry_rules
    from rules import windows
    from rules.localtime import local_date
    from rules.types import ChargingRules, Refusal
    from workflows.refund import RefundWorkflow, refund_workflow_id
    from workflows.settle import Settled
    from workflows.types import (
        BillingState,
        CycleResult,
        RefundRequestInput,
        RuleDecision,
        SubscriptionInput,
    )

DECISIONS_KEPT = 12
NOTICE_RETRY = RetryPolicy(initial_interval=timedelta(seconds=5), maximum_attempts=5)
# the game backend dedupes grants by key, so retrying a grant is safe; past this the delivery
# is given up and the payment returned
DELIVERY_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2),
                             maximum_interval=timedelta(minutes=5),
                             non_retryable_error_types=["ConfigurationError"])
DELIVERY_DEADLINE = timedelta(hours=1)
# taking a grant back after its payment failed delivery: retried for a day, then owed
REVOKE_RETRY = RetryPolicy(initial_interval=timedelta(seconds=5),
                           maximum_interval=timedelta(minutes=10),
                           non_retryable_error_types=["ConfigurationError"])
REVOKE_DEADLINE = timedelta(days=1)
# caps that roll over with time: a charge over one waits for the roll-over
ROLLING_CAPS = ("per_day", "per_week", "per_month", "subscription_per_month",
                "max_attempts_per_day")


class Host(Protocol):
    """What the subscription workflow lends to a cycle."""

    @property
    def billing(self) -> BillingState: ...
    @property
    def subscription(self) -> SubscriptionInput: ...
    def key(self, cycle: int, slot: int) -> str: ...
    def key_prefix(self) -> str: ...
    async def sleep_until(self, when: datetime, summary: str) -> bool: ...
    async def charge(self, charge: ChargeInput, summary: str) -> Settled[ChargeOutput]: ...
    async def settle_unsettled(self, charge: ChargeInput, settled: Settled[ChargeOutput]
                               ) -> Settled[ChargeOutput] | None: ...
    def remember(self, result: CycleResult) -> None: ...
    def set_status(self, status: str) -> None: ...
    def refresh_issue(self) -> None: ...


@dataclass
class Attempt:
    slot: int = 0
    attempts: int = 0
    retries: int = 0
    rung: int = 0
    last_code: str | None = None


class RuledCycles:
    def __init__(self, host: Host) -> None:
        self._host = host
        # decisions not yet handed to a charge activity (which records them for the store)
        self._unrecorded: list[DecisionNote] = []
        self._refunds_in_flight: set[workflow.ChildWorkflowHandle[Any, RefundOutput]] = set()
        self._ending = False

    async def end_refunds_soon(self) -> None:
        """Asks each refund in flight, and any started from now on, to stop waiting for its
        carrier (the refund listed and looked up once) and return what happened: the
        subscription is ending."""
        self._ending = True
        for child in list(self._refunds_in_flight):
            await _end_soon(child)

    # -- decisions shown to operators -----------------------------------------------------

    def decide(self, kind: str, rule: str, detail: str, cycle: int = 0) -> None:
        state = self._host.billing
        decision = RuleDecision(workflow.now(), kind, rule, detail, cycle)
        state.decisions.append(decision)
        del state.decisions[:-DECISIONS_KEPT]
        self._unrecorded.append(DecisionNote(decision.at, kind, rule, detail))
        del self._unrecorded[:-DECISIONS_KEPT]
        if kind == "postponed":
            state.postponements += 1
        else:
            state.refusals += 1
        workflow.logger.info("%s by %s: %s", kind, rule, detail)
        workflow.set_current_details(f"{kind}: {detail} ({rule})")

    def _settle_status(self) -> None:
        """Active again after a cycle, unless paused or suspended meanwhile."""
        state = self._host.billing
        self._host.set_status("suspended" if state.suspended else
                              "paused" if state.paused else "active")

    async def hold_while_paused(self) -> bool:
        """A pause (or a suspension) holds new attempts, even a cycle's retries; False if a
        cancel came meanwhile."""
        state = self._host.billing
        if state.paused or state.suspended:
            await workflow.wait_condition(
                lambda: not (state.paused or state.suspended) or state.cancel_requested)
        return not state.cancel_requested

    async def wait_allowed(self, cycle: int, rules: ChargingRules) -> bool:
        """Waits until the windows allow a charge; False if a cancel came first."""
        while True:
            postponed = windows.next_allowed(workflow.now(), rules)
            if postponed is None:
                return True
            rule = ("carrier.maintenance" if "maintenance" in postponed.reason
                    else f"{rules.country_code}.window")
            self.decide("postponed", rule, f"postponed: {postponed.reason}", cycle)
            if not await self._host.sleep_until(postponed.until, f"postponed: {postponed.reason}"):
                return False

    # -- notices --------------------------------------------------------------------------

    async def notify(self, kind: str, key: str, params: dict[str, str]) -> None:
        """A text the regulation asks for. A notice that cannot be sent is logged, never a
        reason to stop billing or to charge again."""
        subscription = self._host.subscription
        notice = NoticeInput(subscription.subscription_id, subscription.subscriber_id,
                             subscription.carrier_id, kind, subscription.locale, params, key)
        try:
            await workflow.execute_activity(
                "send_notice", notice, start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=timedelta(minutes=10), retry_policy=NOTICE_RETRY,
                summary=f"text {kind}")
        except ActivityError as err:
            workflow.logger.warning("notice %s not sent: %s", key, err.cause or err)

    def take_decisions(self) -> list[DecisionNote]:
        taken, self._unrecorded = self._unrecorded, []
        return taken

    def price_text(self, amount_minor: int) -> str:
        currency = self._host.subscription.plan.currency
        return f"{format_major(amount_minor, currency)} {currency}"

    # -- one cycle ------------------------------------------------------------------------

    async def bill(self, cycle: int, due: datetime) -> None:
        host, state = self._host, self._host.billing
        subscription = host.subscription
        rules, plan = subscription.rules, subscription.plan
        assert rules is not None
        full = plan.amount_minor
        rungs = (ladder_rules.steps(rules) if rules.balance_policy == "ladder" else [full]) or [full]
        attempt = Attempt()
        if rules.blocked:
            self.decide("refused", "product.blocked", rules.blocked, cycle)
            host.remember(CycleResult(cycle, due, "refused", 0))
            return
        if rules.balance_check:
            if not await self.wait_allowed(cycle, rules):
                host.remember(CycleResult(cycle, due, "cancelled", 0))
                return
            attempt.rung = await self._rung_for_balance(cycle, rules, rungs)
        while True:
            if state.cancel_requested:
                host.remember(CycleResult(cycle, due, "cancelled", attempt.attempts, None,
                                          attempt.last_code))
                return
            if attempt.rung >= len(rungs):
                # the balance covers no price point: as if funds were short
                outcome = await self._after_short_funds(cycle, attempt, rules, len(rungs) - 1)
                if outcome is not None:
                    self._conclude_failed(cycle, due, attempt, outcome)
                    return
                continue
            if not await self.hold_while_paused() or not await self.wait_allowed(cycle, rules):
                continue
            amount = rungs[attempt.rung]
            attempt.attempts += 1
            workflow.set_current_details(
                f"charging cycle {cycle}, attempt {attempt.attempts}: {self.price_text(amount)}")
            charge = self._charge_input(cycle, attempt.slot, amount, rules,
                                        f"{subscription.product_id} cycle {cycle}")
            settled = await host.charge(
                charge, f"charge cycle {cycle} attempt {attempt.attempts}: "
                        f"{self.price_text(amount)}")
            if settled.kind in ("unsettled", "error"):
                late = await host.settle_unsettled(charge, settled)
                if late is None:
                    host.remember(CycleResult(cycle, due, settled.kind, attempt.attempts, None,
                                              settled.result.carrier_code if settled.result
                                              else None, amount_minor=0,
                                              charge_key=charge.idempotency_key))
                    self._settle_status()
                    return
                settled = late
            result = settled.result
            assert result is not None
            attempt.last_code = result.carrier_code
            if settled.kind == "not_sent":
                outcome = "cancelled" if state.cancel_requested else "not_charged"
                if outcome == "not_charged":
                    state.cycles_not_charged += 1
                host.remember(CycleResult(cycle, due, outcome, attempt.attempts, None,
                                          attempt.last_code))
                self._settle_status()
                return
            if result.outcome == "refused_by_rule":
                assert result.refusal is not None
                if not await self._wait_for_cap(cycle, due, attempt, result.refusal, rules):
                    return
                continue
            if result.outcome == "succeeded":
                await self._paid(cycle, due, attempt, amount, result)
                return
            if result.outcome != "insufficient_funds":
                self._conclude_failed(cycle, due, attempt, "failed")
                return
            attempt.slot += 1
            if attempt.rung + 1 < len(rungs):
                attempt.rung += 1  # down the ladder at once: same moment, lower price
                state.insufficient_funds_retries += 1
                continue
            outcome = await self._after_short_funds(cycle, attempt, rules, attempt.rung)
            if outcome is not None:
                self._conclude_failed(cycle, due, attempt, outcome)
                return

    def _charge_input(self, cycle: int, slot: int, amount: int, rules: ChargingRules,
                      description: str) -> ChargeInput:
        """One attempt of a cycle's charge (a partial one carries the full price it relates
        to), with the rules' decisions since the last attempt."""
        subscription = self._host.subscription
        full = subscription.plan.amount_minor
        return ChargeInput(
            subscription_id=subscription.subscription_id,
            subscriber_id=subscription.subscriber_id, carrier_id=subscription.carrier_id,
            cycle=cycle, attempt_slot=slot, idempotency_key=self._host.key(cycle, slot),
            amount_minor=amount, currency=subscription.plan.currency,
            # the attempt's own moment (workflow time): caps count charges by it
            due_at=workflow.now(), description=description, rules=rules,
            is_subscription=subscription.plan.period != "one_off",
            list_price_minor=full if amount < full else None,
            decisions=self.take_decisions())

    def _retries_today(self, rules: ChargingRules) -> int:
        """Retries made on the subscriber's local day (the count restarts each day)."""
        state = self._host.billing
        day = local_date(workflow.now(), ZoneInfo(rules.timezone)).isoformat()
        if state.retries_day != day:
            state.retries_day, state.retries_on_day = day, 0
        return state.retries_on_day

    async def _rung_for_balance(self, cycle: int, rules: ChargingRules, rungs: list[int]) -> int:
        """The first price point the balance covers (len(rungs): none), by the carrier's
        policy; an unknown balance changes nothing."""
        subscription = self._host.subscription
        try:
            answer: BalanceOutput = await workflow.execute_activity_method(
                BillingActivities.check_balance,
                BalanceInput(subscription.subscription_id, subscription.subscriber_id,
                             subscription.carrier_id, subscription.plan.currency),
                task_queue=subscription.carrier_task_queue,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=3), summary="balance check")
        except ActivityError as err:
            # a look-up that failed (ours or theirs) says nothing: charge as if unknown
            workflow.logger.warning("balance look-up failed: %s", err.cause or err)
            return 0
        available = answer.available_minor
        if available is None or available >= rungs[0] or rules.balance_policy == "charge_full":
            return 0
        if rules.balance_policy == "ladder":
            for index, amount in enumerate(rungs):
                if amount <= available:
                    return index
        self.decide("postponed", f"{subscription.carrier_id}.balance_policy",
                    f"balance {self.price_text(available)} below the price "
                    f"{self.price_text(rungs[0])}", cycle)
        return len(rungs)

    async def _after_short_funds(self, cycle: int, attempt: Attempt, rules: ChargingRules,
                                 rung: int) -> str | None:
        """Waits for the next retry; the cycle's outcome if the retries are spent."""
        state, now = self._host.billing, workflow.now()
        when = retry_rules.next_retry(now, attempt.retries, self._retries_today(rules), rules)
        if when is None:
            return self._give_up(cycle, rules)
        self._host.set_status("past_due")
        if not await self._host.sleep_until(when, f"cycle {cycle} retry {attempt.retries + 1}"):
            return "cancelled"
        attempt.retries += 1
        attempt.rung = 0  # a retry tries the full price again
        state.retries_on_day += 1
        state.insufficient_funds_retries += 1
        return None

    def _give_up(self, cycle: int, rules: ChargingRules) -> str:
        state = self._host.billing
        rule = f"{rules.country_code}.after_retries"
        self.decide("refused", rule, f"retries spent: {rules.after_retries}", cycle)
        if rules.after_retries == "suspend":
            state.suspended = True
            self._host.set_status("suspended")
        elif rules.after_retries == "cancel":
            state.cancel_requested = True
        return "failed"

    def _conclude_failed(self, cycle: int, due: datetime, attempt: Attempt, outcome: str) -> None:
        state = self._host.billing
        if outcome == "failed":
            state.cycles_failed += 1
        self._host.remember(CycleResult(cycle, due, outcome, attempt.attempts, None,
                                        attempt.last_code))
        if not state.suspended:
            self._settle_status()

    async def _wait_for_cap(self, cycle: int, due: datetime, attempt: Attempt, refusal: Refusal,
                            rules: ChargingRules) -> bool:
        """A cap that rolls over postpones the charge; one that cannot (per transaction)
        refuses the cycle. False when the cycle is over."""
        rolls = refusal.rule.split(".", 1)[-1] in ROLLING_CAPS
        if not rolls:
            self.decide("refused", refusal.rule, refusal.figure, cycle)
            self._host.remember(CycleResult(cycle, due, "refused", attempt.attempts, None,
                                            refusal.rule))
            self._settle_status()
            return False
        until = cap_rules.next_cap_reset(workflow.now(), refusal, rules)
        self._host.billing.refusals += 1  # refused now, postponed to the cap's roll-over
        self.decide("postponed", refusal.rule,
                    f"postponed: {refusal.figure}, until {until.isoformat()}", cycle)
        if not await self._host.sleep_until(until, f"postponed: {refusal.rule}"):
            self._host.remember(CycleResult(cycle, due, "cancelled", attempt.attempts))
            return False
        return True

    # -- after payment --------------------------------------------------------------------

    async def _paid(self, cycle: int, due: datetime, attempt: Attempt, amount: int,
                    result: ChargeOutput) -> None:
        host, state = self._host, self._host.billing
        subscription = host.subscription
        plan, rules = subscription.plan, subscription.rules
        assert rules is not None
        partial = amount < plan.amount_minor
        state.charges_succeeded += 1
        state.amount_charged_minor += amount
        if partial:
            state.partial_payments += 1
        cycle_result = CycleResult(cycle, due, "succeeded", attempt.attempts,
                                   result.carrier_reference, result.carrier_code,
                                   amount_minor=amount, partial=partial,
                                   charge_key=host.key(cycle, attempt.slot))
        host.remember(cycle_result)
        self._settle_status()
        if rules.receipt_after_charge:
            await self.notify("receipt", f"{host.key(cycle, attempt.slot)}-receipt",
                              {"price": self.price_text(amount)})
        await self._deliver(cycle_result, amount, host.key(cycle, attempt.slot))
        if partial and rules.remainder == "collect_later" and cycle_result.delivery == "delivered":
            await self._collect_remainder(cycle, due, attempt, plan.amount_minor - amount, rules)

    async def _collect_remainder(self, cycle: int, due: datetime, attempt: Attempt,
                                 remainder: int, rules: ChargingRules) -> None:
        """The rest of a partial payment, tried on the retry schedule within the cycle's
        retry budget; what is not collected then is written off (the rule says which)."""
        host, state = self._host, self._host.billing
        subscription = host.subscription
        rule = f"{subscription.carrier_id}.remainder"
        while not state.cancel_requested:
            when = retry_rules.next_retry(workflow.now(), attempt.retries,
                                          self._retries_today(rules), rules)
            if when is None:
                self.decide("refused", rule,
                            f"remainder {self.price_text(remainder)} written off: retries spent",
                            cycle)
                return
            if not await host.sleep_until(when, f"cycle {cycle} remainder"):
                return
            attempt.retries += 1
            state.retries_on_day += 1
            state.insufficient_funds_retries += 1
            if not await self.hold_while_paused() or not await self.wait_allowed(cycle, rules):
                return
            attempt.slot += 1
            charge = self._charge_input(cycle, attempt.slot, remainder, rules,
                                        f"{subscription.product_id} cycle {cycle} remainder")
            settled = await host.charge(
                charge, f"charge cycle {cycle} remainder: {self.price_text(remainder)}")
            if settled.kind in ("unsettled", "error"):
                late = await host.settle_unsettled(charge, settled)
                if late is None:
                    return  # listed as unsettled: money may have moved; never sent again
                settled = late
            result = settled.result
            if settled.kind != "final" or result is None:
                return
            if result.outcome == "refused_by_rule":
                self.decide("refused", result.refusal.rule if result.refusal else rule,
                            f"remainder {self.price_text(remainder)} written off: "
                            f"{result.message}", cycle)
                return
            if result.outcome == "succeeded":
                state.amount_charged_minor += remainder
                state.remainders_collected += 1
                paid = next((r for r in state.recent_cycles if r.cycle == cycle), None)
                if paid is not None:
                    paid.remainder_minor, paid.remainder_key = remainder, charge.idempotency_key
                grant = CycleResult(cycle, due, "succeeded", 1, result.carrier_reference,
                                    amount_minor=remainder, partial=True,
                                    charge_key=charge.idempotency_key)
                await self._deliver(grant, remainder, charge.idempotency_key, refund=False)
                return
            if result.outcome != "insufficient_funds":
                return

    async def paid_late(self, key: str, amount: int) -> None:
        """A charge left unsettled turned out to have succeeded: its cycle is paid, and what
        was paid for is delivered (or the payment returned, if it cannot be)."""
        state = self._host.billing
        result = next((r for r in state.recent_cycles if r.charge_key == key
                       and r.outcome in ("unsettled", "error")), None)
        if result is None or amount <= 0:
            return
        result.outcome, result.amount_minor = "succeeded", amount
        result.partial = amount < self._host.subscription.plan.amount_minor
        state.charges_succeeded += 1
        state.amount_charged_minor += amount
        await self._deliver(result, amount, key)

    def _service_seconds(self, amount: int) -> int | None:
        plan = self._host.subscription.plan
        if amount >= plan.amount_minor:
            return None
        period = (plan.interval_seconds or
                  {"daily": 86400, "weekly": 7 * 86400, "monthly": 30 * 86400}.get(plan.period, 0))
        return ladder_rules.proportion(amount, plan.amount_minor, period)

    async def _deliver(self, cycle_result: CycleResult, amount: int, charge_key: str,
                       refund: bool = True) -> None:
        host, state = self._host, self._host.billing
        subscription = host.subscription
        key = delivery_key(charge_key)
        delivery = DeliveryInput(
            subscription_id=subscription.subscription_id,
            subscriber_id=subscription.subscriber_id, cycle=cycle_result.cycle,
            idempotency_key=key, product_id=subscription.product_id,
            country_code=subscription.country_code, locale=subscription.locale,
            price_point_id=subscription.price_point_id,
            service_seconds=self._service_seconds(amount), paid_minor=amount,
            currency=subscription.plan.currency)
        reason: str
        try:
            delivered: DeliveryOutput = await workflow.execute_activity(
                "deliver_product", delivery, result_type=DeliveryOutput,
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=DELIVERY_DEADLINE, retry_policy=DELIVERY_RETRY,
                summary=f"deliver {subscription.product_id} for cycle {cycle_result.cycle}")
            if delivered.delivered:
                state.deliveries += 1
                cycle_result.delivery = "delivered"
                return
            reason = delivered.reason or "the game backend refused the grant"
        except ActivityError as err:
            reason = f"delivery failed: {err.cause or err}"
        state.delivery_failures += 1
        workflow.logger.warning("cycle %s not delivered (%s): refunding", cycle_result.cycle,
                                reason)
        # the grant may have happened with its answer lost: revoke it before the refund
        try:
            await workflow.execute_activity(
                "revoke_delivery", RevokeInput(key, reason),
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=REVOKE_DEADLINE, retry_policy=REVOKE_RETRY,
                summary=f"revoke cycle {cycle_result.cycle}")
        except ActivityError as err:
            # the money goes back all the same (nothing charged without delivery); the grant
            # the game could not take back is owed back, and shown
            workflow.logger.error("revoking %s failed: %s", key, err.cause or err)
            state.revokes_owed.append(cycle_result.cycle)
            del state.revokes_owed[:-DECISIONS_KEPT]
            host.refresh_issue()
        why = f"not delivered: {reason}"[:200]
        if refund:
            refunded = await self.refund(cycle_result.cycle, None, why)
        else:  # a remainder's own charge: only it is returned
            refunded = await self._refund_charge(cycle_result.cycle, charge_key, False, None, why)
            if refunded.outcome == "succeeded":
                state.refunds += 1
                state.refunded_minor += refunded.amount_minor
                paid = next((r for r in state.recent_cycles if r.cycle == cycle_result.cycle),
                            None)
                if paid is not None:
                    paid.refunded_minor += refunded.amount_minor
        if refunded.outcome in ("succeeded", "nothing_left"):
            cycle_result.delivery = "refunded"
            return
        # paid and not delivered, and the carrier did not take the refund: owed, and shown
        cycle_result.delivery = "not_delivered"
        state.refunds_owed.append(cycle_result.cycle)
        del state.refunds_owed[:-DECISIONS_KEPT]
        host.refresh_issue()

    async def refund(self, cycle: int, amount_minor: int | None, reason: str) -> RefundOutput:
        """Refunds ``amount_minor`` of what a cycle paid (None: all that is left), through the
        carrier: one child workflow per refund of each charge of the cycle (the first charge,
        then a remainder collected later), each under a key of its own. The activity never
        refunds more than is left of a charge, counting refunds still in flight."""
        state = self._host.billing
        result = next((r for r in state.recent_cycles if r.cycle == cycle), None)
        charges = [] if result is None else [
            (key, paid) for key, paid in ((result.charge_key, result.amount_minor),
                                          (result.remainder_key, result.remainder_minor))
            if paid > 0]
        if not charges:  # (a cycle this state no longer holds: its first charge)
            charges = [(None, amount_minor or 0)]
        left = amount_minor
        total = 0
        outcome = "nothing_left"
        last: RefundOutput | None = None
        for index, (charge_key, _paid) in enumerate(charges):
            if left is not None and left <= 0:
                break
            # each charge gives what is left of it, up to what is still to refund
            output = await self._refund_charge(cycle, charge_key, index == 0, left, reason,
                                               at_most=len(charges) > 1)
            last = output
            if output.outcome == "succeeded":
                total += output.amount_minor
                outcome = "succeeded"
                if left is not None:
                    left -= output.amount_minor
            elif output.outcome != "nothing_left":
                outcome = output.outcome
                break
        if total:
            state.refunds += 1
            state.refunded_minor += total
            if result is not None:
                result.refunded_minor += total
        currency = self._host.subscription.plan.currency
        if outcome in ("succeeded", "nothing_left"):
            return RefundOutput(outcome, total, currency)
        assert last is not None
        return RefundOutput(outcome, total, currency, last.carrier_reference, last.carrier_code,
                            last.message)

    async def _refund_charge(self, cycle: int, charge_key: str | None, first_charge: bool,
                             amount_minor: int | None, reason: str, at_most: bool = False
                             ) -> RefundOutput:
        host, state = self._host, self._host.billing
        subscription = host.subscription
        plan = subscription.plan
        ordinal_of = charge_key or f"c{cycle}"
        while True:
            ordinal = state.refund_ordinals.get(ordinal_of, 0)
            state.refund_ordinals[ordinal_of] = ordinal + 1
            if first_charge and ordinal == 0:
                # the cycle's first refund keeps the key and id an operator's refund uses
                key = refund_key(host.key_prefix(), cycle)
                workflow_id = refund_workflow_id(subscription.subscription_id, cycle)
            elif charge_key is None:
                return RefundOutput("failed", 0, plan.currency,
                                    message=f"cycle {cycle}'s charge is not known here")
            else:
                key = refund_key_of_charge(charge_key, ordinal)
                workflow_id = f"refund-{key}"
            request = RefundRequestInput(
                subscription.subscription_id, cycle, reason, plan.settle_delays_seconds,
                subscription.carrier_id, key, plan.settle_deadline_seconds,
                subscription.carrier_task_queue, amount_minor, at_most)
            try:
                child = await workflow.start_child_workflow(
                    RefundWorkflow.run, request, id=workflow_id,
                    static_summary=f"refund cycle {cycle}: {reason}")
                self._refunds_in_flight.add(child)
                if self._ending:
                    await _end_soon(child)
                try:
                    return await child
                finally:
                    self._refunds_in_flight.discard(child)
            except WorkflowAlreadyStartedError:
                # another refund holds this id (an operator's): the next key; the activity
                # counts that one in flight, so the two never return more than was paid
                continue
            except ChildWorkflowError as err:
                workflow.logger.error("refund of cycle %s failed: %s", cycle, err.cause or err)
                return RefundOutput("failed", 0, plan.currency, message=str(err.cause))



async def _end_soon(child: workflow.ChildWorkflowHandle[Any, RefundOutput]) -> None:
    with contextlib.suppress(FailureError):  # it ended meanwhile
        await child.signal(RefundWorkflow.end_soon)
