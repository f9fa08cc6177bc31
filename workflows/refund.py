"""RefundWorkflow: refunds one charged cycle. Its id makes a second refund of a cycle impossible."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.billing import BillingActivities
    from activities.messages import CarrierReport, RefundInput, RefundOutput, refund_key
    from workflows.settle import PendingSettler
    from workflows.types import RefundRequestInput

REFUND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    maximum_interval=timedelta(minutes=5),
    non_retryable_error_types=["NotRefundable"],
)


def refund_workflow_id(subscription_id: int, cycle: int) -> str:
    return f"refund-subscription-{subscription_id}-cycle-{cycle}"


@workflow.defn(name="RefundWorkflow")
class RefundWorkflow:
    def __init__(self) -> None:
        self._settler = PendingSettler()

    @workflow.signal(name="carrier_result")
    def carrier_result(self, report: CarrierReport) -> None:
        self._settler.offer(report)

    @workflow.run
    async def run(self, request: RefundRequestInput) -> RefundOutput:
        refund = RefundInput(request.subscription_id, request.cycle, request.reason)

        async def attempt(refund: RefundInput, summary: str) -> RefundOutput:
            return await workflow.execute_activity_method(
                BillingActivities.refund_charge, refund,
                start_to_close_timeout=timedelta(seconds=30), retry_policy=REFUND_RETRY,
                summary=summary)

        async def settle(report: CarrierReport | None) -> RefundOutput:
            source = "reported result" if report else "status look-up"
            return await attempt(replace(refund, settling=True, reported=report),
                                 f"settle refund by {source}")

        summary = f"refund cycle {request.cycle} of subscription {request.subscription_id}"
        return await self._settler.run(refund_key(request.subscription_id, request.cycle),
                                       lambda: attempt(refund, summary),
                                       request.settle_delays_seconds, settle)
