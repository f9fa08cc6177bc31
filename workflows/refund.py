"""RefundWorkflow: refunds one charged cycle. Its id makes a second refund of a cycle impossible."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.billing import BillingActivities
    from activities.messages import RefundInput, RefundOutput
    from workflows.types import RefundRequestInput


def refund_workflow_id(subscription_id: int, cycle: int) -> str:
    return f"refund-subscription-{subscription_id}-cycle-{cycle}"


@workflow.defn(name="RefundWorkflow")
class RefundWorkflow:
    @workflow.run
    async def run(self, request: RefundRequestInput) -> RefundOutput:
        return await workflow.execute_activity_method(
            BillingActivities.refund_charge,
            RefundInput(request.subscription_id, request.cycle, request.reason),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=2),
                maximum_interval=timedelta(minutes=5),
                non_retryable_error_types=["NotRefundable"],
            ),
            summary=f"refund cycle {request.cycle} of subscription {request.subscription_id}",
        )
