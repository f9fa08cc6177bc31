"""Driving one carrier operation to a final answer inside a workflow.

The activity returns every answer; this loop decides what happens next, on durable timers:

* final (succeeded, insufficient funds, rejected): done;
* transient (the carrier did nothing: busy, credentials refused): sent again after a backoff,
  unless the caller stops (a cancel) or the transient limit passes: then it was not charged;
* pending or unknown (money may have moved): wait for the carrier's pushed result or a timer,
  then settle by that result or a look-up. A cancel does not stop this, since money may have
  moved; the number of attempts and a deadline do: the operation is then *unsettled*, listed
  for operators, and a late result or reconciliation settles it.

A Temporal cancellation (the UI's Cancel) never interrupts this: the workflow catches it at
its top and calls ``end_soon``. The attempt in flight finishes; a refusal is not sent again;
an operation with no final answer stops waiting, is listed as unsettled and looked up once
(never sent again), so the workflow ends in bounded time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Generic, Protocol, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from activities.billing import BillingActivities
    from activities.messages import (
        LateSettlementInput,
        LateSettlementOutput,
        SettledNotice,
        UnsettledInput,
    )
    from carriers.reports import CarrierReport


# Each attempt adds about ten history events; past this many the operation is left unsettled
# rather than let the history grow toward Temporal's limit.
MAX_SETTLE_ATTEMPTS = 200
# sends refused outright (nothing happened) before the cycle is given up as not charged
MAX_TRANSIENT_ATTEMPTS = 200
# (refused_by_rule: our own rule stopped the charge before anything was recorded or sent)
# (nothing_left: a refund of "what is left" of a charge already wholly refunded: not sent)
FINAL = ("succeeded", "insufficient_funds", "rejected", "refused_by_rule", "nothing_left")
# (a workflow.patched id: histories recorded before it replay the older cancellation, which
# reached whatever the workflow awaited)
CANCEL_ENDS_LIKE_THE_UPDATE = "temporal-cancel-ends-like-the-cancel-update"
# (a workflow.patched id: before it, work started by a late settlement while a run ended was
# dropped with it)
LATE_WORK_AWAITED_TO_THE_END = "late-work-awaited-to-the-end"
ENDING = "the workflow was cancelled in Temporal before the carrier's final answer"


class SettlementAbandoned(ApplicationError):
    """(Kept for recorded histories: unsettled operations are now results, not errors.)"""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="SettlementAbandoned", non_retryable=True)


class HasOutcome(Protocol):
    outcome: str
    carrier_code: str | None
    message: str
    retry_after_seconds: float | None
    issue: str | None


R = TypeVar("R", bound=HasOutcome)


@dataclass
class SettleBounds:
    # waits between settling attempts after a pending or unknown answer (the last repeats)
    delays: list[float]
    # how long a pending operation is settled before it is left unsettled
    deadline_seconds: float = 2 * 86400.0
    # (None: MAX_SETTLE_ATTEMPTS, read when settling)
    max_attempts: int | None = None
    # backoff after answers that say nothing happened (the last repeats), and for how long
    transient_delays: list[float] = field(
        default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0])
    transient_limit_seconds: float = 86400.0


@dataclass
class Settled(Generic[R]):
    # final | not_sent (nothing happened) | unsettled (may have moved money) | error (ours)
    kind: str
    result: R | None = None
    reason: str = ""


class OperationSettler:
    """Holds pushed results for the one operation being waited for, from its own carrier
    only; the rest are dropped, so duplicate, late and foreign callbacks change nothing."""

    def __init__(self) -> None:
        self.awaiting: str | None = None
        self.carrier_id: str | None = None
        self._reports: dict[str, CarrierReport] = {}
        # a transient answer that is an operator's problem (credentials), while it lasts
        self.issue: str | None = None
        # the workflow is ending (a Temporal cancellation): stop waiting, list what is open
        self.ending = False

    def end_soon(self) -> None:
        self.ending = True

    def offer(self, report: CarrierReport) -> bool:
        if report.idempotency_key != self.awaiting:
            return False
        if report.carrier_id and report.carrier_id != self.carrier_id:
            workflow.logger.warning("dropped a result for %s from carrier %s, not %s",
                                    report.idempotency_key, report.carrier_id, self.carrier_id)
            return False
        self._reports[report.idempotency_key] = report
        return True

    async def run(
        self,
        key: str,
        carrier_id: str,
        attempt: Callable[[CarrierReport | None, str], Awaitable[R]],
        first_summary: str,
        bounds: SettleBounds,
        stop_sending: Callable[[], bool],
        on_issue: Callable[[str | None], None] = lambda _issue: None,
    ) -> Settled[R]:
        self.awaiting, self.carrier_id = key, carrier_id
        started = workflow.now()
        settles = transients = 0
        summary = first_summary
        report: CarrierReport | None = None
        try:
            while True:
                try:
                    result = await attempt(report, summary)
                except FailureError as err:
                    # (a local activity's failure comes unwrapped, not as an ActivityError)
                    cause = err.cause if isinstance(err, ActivityError) else err
                    if isinstance(cause, ApplicationError) and cause.non_retryable:
                        return Settled("error", reason=f"{cause.type}: {cause.message}")
                    result = None  # our own fault outlasted the activity's retries: ask again
                issue = result.issue if result is not None else None
                if issue != self.issue:
                    self.issue = issue
                    on_issue(issue)
                if result is not None and result.outcome in FINAL:
                    return Settled("final", result)
                elapsed = (workflow.now() - started).total_seconds()
                if result is not None and result.outcome == "transient":
                    if stop_sending() or self.ending:
                        return Settled("not_sent", result, "cancelled while the carrier refused")
                    budget = bounds.transient_limit_seconds - elapsed
                    if budget <= 0 or transients >= MAX_TRANSIENT_ATTEMPTS:
                        return Settled("not_sent", result, "the carrier kept refusing")
                    # the carrier's Retry-After, but never sooner than our backoff (a history
                    # must stay bounded) nor past the time we are willing to wait
                    backoff = bounds.transient_delays[
                        min(transients, len(bounds.transient_delays) - 1)]
                    delay = min(max(result.retry_after_seconds or 0.0, backoff), budget)
                    transients += 1
                    with contextlib.suppress(TimeoutError):
                        await workflow.wait_condition(
                            lambda: stop_sending() or self.ending, timeout=delay,
                            timeout_summary=f"carrier refused; send again ({transients})")
                    if stop_sending() or self.ending:
                        return Settled("not_sent", result, "cancelled while the carrier refused")
                    summary, report = f"send {key} again ({transients})", None
                    continue
                if self.ending:
                    return _unsettled(result, ENDING)
                limit = bounds.max_attempts or MAX_SETTLE_ATTEMPTS
                if settles >= limit or elapsed >= bounds.deadline_seconds:
                    return _unsettled(
                        result, f"no final answer after {settles} settling attempts")
                delay = bounds.delays[min(settles, len(bounds.delays) - 1)]
                settles += 1
                with contextlib.suppress(TimeoutError):
                    await workflow.wait_condition(
                        lambda: key in self._reports or self.ending, timeout=delay,
                        timeout_summary=f"wait for the carrier's result ({settles})")
                if self.ending and key not in self._reports:
                    return _unsettled(result, ENDING)
                report = self._reports.pop(key, None)
                source = "reported result" if report else "status look-up"
                summary = f"settle {key} by {source}"
        finally:
            self.awaiting = None
            self._reports.clear()
            if self.issue is not None:
                self.issue = None
                on_issue(None)


def _unsettled(result: R | None, because: str) -> Settled[R]:
    """Given up without a final answer: the last answer, and why."""
    why = result.message if result is not None else "activity failed"
    return Settled("unsettled", result, f"{because}: {why}")


async def tell_settled(workflow_id: str, notice: SettledNotice) -> None:
    """Tells the workflow that left an operation unsettled that it is settled now (by a late
    result or reconciliation)."""
    try:
        await workflow.get_external_workflow_handle(workflow_id).signal(
            "operation_settled", notice)
    except FailureError:
        pass  # that workflow has ended: the operation record is what counts


async def record_unsettled(key: str, reason: str, look_up: bool = False
                           ) -> LateSettlementOutput | None:
    """Lists an operation as unsettled (and applies a result its carrier pushed meanwhile).
    Bounded: if our own database stays away, the workflow goes on, its state and BillingIssue
    still naming the operation. ``look_up``: then asks the carrier once (a workflow ending)."""
    listed = await _list_unsettled(key, reason)
    if look_up and (listed is None or listed.state != "settled"):
        return await _look_up_once(key) or listed
    return listed


async def _list_unsettled(key: str, reason: str) -> LateSettlementOutput | None:
    try:
        return await workflow.execute_activity_method(
            BillingActivities.record_unsettled_operation, UnsettledInput(key, reason),
            start_to_close_timeout=timedelta(seconds=60),
            schedule_to_close_timeout=timedelta(minutes=10),
            retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=30)),
            summary=f"list {key} as unsettled")
    except ActivityError as err:
        workflow.logger.error("could not list %s as unsettled: %s", key, err.cause)
        return None


async def _look_up_once(key: str) -> LateSettlementOutput | None:
    """Settles a listed operation by one look-up (or a result pushed meanwhile), never a
    send; bounded, so an ending workflow still ends."""
    try:
        return await workflow.execute_activity_method(
            BillingActivities.settle_unsettled_operation, LateSettlementInput(key),
            start_to_close_timeout=timedelta(seconds=60),
            schedule_to_close_timeout=timedelta(minutes=3),
            retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=30),
                                     non_retryable_error_types=["ConfigurationError"]),
            summary=f"look {key} up once before ending")
    except ActivityError as err:
        workflow.logger.warning("%s stays listed as unsettled: %s", key, err.cause)
        return None
