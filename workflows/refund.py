"""RefundWorkflow: refunds one charged cycle. Its id makes a second refund of a cycle impossible."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.billing import BillingActivities
    from activities.messages import CarrierReport, RefundInput, RefundOutput
    from workflows.settle import (
        CANCEL_ENDS_LIKE_THE_UPDATE,
        OperationSettler,
        SettleBounds,
        record_unsettled,
    )
    from workflows.types import RefundRequestInput

REFUND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=["NotRefundable", "ConfigurationError"],
)


def refund_workflow_id(subscription_id: int, cycle: int) -> str:
    return f"refund-subscription-{subscription_id}-cycle-{cycle}"


@workflow.defn(name="RefundWorkflow")
class RefundWorkflow:
    def __init__(self) -> None:
        self._settler = OperationSettler()

    @workflow.signal(name="carrier_result")
    def carrier_result(self, report: CarrierReport) -> None:
        self._settler.offer(report)

    @workflow.signal(name="end_soon")
    def end_soon(self) -> None:
        """The subscription that asked for this refund is ending: stop waiting for the carrier
        (the refund listed and looked up once) and return what happened."""
        self._settler.end_soon()

    @workflow.run
    async def run(self, request: RefundRequestInput) -> RefundOutput:
        """A Temporal cancellation never interrupts the refund: the attempt in flight
        finishes, a refund with no final answer is listed and looked up once, and the workflow
        returns what happened (its parent must hear of a refund that was made)."""
        refunding = asyncio.ensure_future(self._refund(request))
        try:
            return await asyncio.shield(refunding)
        except asyncio.CancelledError:
            if not workflow.patched(CANCEL_ENDS_LIKE_THE_UPDATE):
                refunding.cancel()
                return await refunding
            self._settler.end_soon()
            return await refunding

    async def _refund(self, request: RefundRequestInput) -> RefundOutput:
        if request.idempotency_key is None:
            raise ApplicationError("a refund needs its idempotency key",
                                            non_retryable=True)
        key = request.idempotency_key
        refund = RefundInput(request.subscription_id, request.cycle, request.reason,
                             idempotency_key=key, amount_minor=request.amount_minor,
                             at_most=request.at_most)

        async def attempt(report: CarrierReport | None, summary: str) -> RefundOutput:
            return await workflow.execute_activity_method(
                BillingActivities.refund_charge, replace(refund, reported=report),
                task_queue=request.carrier_task_queue,
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=timedelta(minutes=5),
                retry_policy=REFUND_RETRY, summary=summary)

        summary = f"refund cycle {request.cycle} of subscription {request.subscription_id}"
        # a refund is owed: a carrier refusing it is asked again for a week, not a day
        bounds = SettleBounds(request.settle_delays_seconds,
                              deadline_seconds=request.settle_deadline_seconds,
                              transient_delays=[5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0],
                              transient_limit_seconds=7 * 86400.0)
        # a refund is owed to the subscriber: nothing stops resending one the carrier refused
        settled = await self._settler.run(key, request.carrier_id, attempt, summary, bounds,
                                          lambda: False)
        if settled.kind == "final" and settled.result is not None:
            return settled.result
        if settled.kind == "error" and settled.reason.startswith("NotRefundable"):
            raise ApplicationError(settled.reason, type="NotRefundable",
                                            non_retryable=True)
        # not settled, or never accepted: either way the refund is owed, so it is listed
        # (asking for it again looks it up, and sends only where that is safe)
        reason = (f"refund owed, never accepted: {settled.reason}"
                  if settled.kind == "not_sent" else settled.reason)
        late = await record_unsettled(key, reason, look_up=self._settler.ending)
        last = settled.result
        if late is not None and late.state == "settled" and late.outcome is not None:
            return RefundOutput(late.outcome, last.amount_minor if last else 0,
                                last.currency if last else "", late.carrier_reference)
        return RefundOutput("unsettled", last.amount_minor if last else 0,
                            last.currency if last else "", None,
                            last.carrier_code if last else None, settled.reason)
