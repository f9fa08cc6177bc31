"""LateSettlementWorkflow: settles one operation its workflow left unsettled, when a late
result arrives or an operator asks, and tells that workflow. It never sends anything."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.billing import BillingActivities
    from activities.messages import LateSettlementInput, LateSettlementOutput, SettledNotice
    from workflows.settle import tell_settled


def late_settlement_id(key: str) -> str:
    return f"settle-{key}"


@workflow.defn(name="LateSettlementWorkflow")
class LateSettlementWorkflow:
    @workflow.run
    async def run(self, request: LateSettlementInput) -> LateSettlementOutput:
        settled = await workflow.execute_activity_method(
            BillingActivities.settle_unsettled_operation, request,
            start_to_close_timeout=timedelta(seconds=60),
            schedule_to_close_timeout=timedelta(minutes=10),
            retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=30),
                                     non_retryable_error_types=["ConfigurationError"]),
            summary=f"settle {request.idempotency_key}")
        if settled.state == "settled" and settled.workflow_id:
            await tell_settled(settled.workflow_id, SettledNotice(
                settled.idempotency_key, settled.still_unsettled, settled.outcome,
                settled.amount_minor))
        return settled
