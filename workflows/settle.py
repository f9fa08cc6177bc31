"""Settling a pending carrier answer inside a workflow: wait for the carrier's pushed result or a
durable timer, then settle by that result or a status look-up, until the outcome is final."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.messages import CarrierReport


# Each attempt adds about ten history events; past this many the operation is handed to
# reconciliation rather than let the history grow toward Temporal's limit.
MAX_SETTLE_ATTEMPTS = 500


class SettlementAbandoned(ApplicationError):
    """The carrier never gave a final answer: reconciliation against its reports decides."""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="SettlementAbandoned", non_retryable=True)


class HasOutcome(Protocol):
    outcome: str


R = TypeVar("R", bound=HasOutcome)


class PendingSettler:
    """Holds pushed results for the one operation being waited for; the rest are dropped, so
    duplicate and late callbacks change nothing."""

    def __init__(self) -> None:
        self.awaiting: str | None = None
        self._reports: dict[str, CarrierReport] = {}

    def offer(self, report: CarrierReport) -> None:
        if report.idempotency_key == self.awaiting:
            self._reports[report.idempotency_key] = report

    async def run(
        self,
        key: str,
        first: Callable[[], Awaitable[R]],
        delays: list[float],
        attempt: Callable[[CarrierReport | None], Awaitable[R]],
    ) -> R:
        """``first()`` sends the operation; while it is pending, ``attempt(report)`` settles it.
        A callback may beat the first answer, so reports are accepted from the start. Never
        gives up early: an ambiguous operation may have moved money, so the last delay repeats,
        up to MAX_SETTLE_ATTEMPTS; then SettlementAbandoned hands it to reconciliation."""
        settles = 0
        delays = delays or [60.0]
        self.awaiting = key
        try:
            result = await first()
            while result.outcome == "pending":
                if settles >= MAX_SETTLE_ATTEMPTS:
                    raise SettlementAbandoned(f"{key}: no final answer after {settles} look-ups")
                delay = delays[min(settles, len(delays) - 1)]
                settles += 1
                with contextlib.suppress(TimeoutError):
                    await workflow.wait_condition(
                        lambda: key in self._reports, timeout=delay,
                        timeout_summary=f"wait for the carrier's result ({settles})")
                result = await attempt(self._reports.pop(key, None))
        finally:
            self.awaiting = None
            self._reports.clear()
        return result
