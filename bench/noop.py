"""The ceiling: a workflow that only loops timer + no-op activity, measured like billing.

Its worker is a process of its own (``bench.noop_worker``), so that its CPU is measured apart
from the bench's, as the billing worker's is; each completed activity records its time in
``COMPLETIONS``, which that process writes to a file the bench counts in its window.
"""

from __future__ import annotations

import time
from datetime import timedelta

from temporalio import activity, workflow

COMPLETIONS: list[float] = []


@activity.defn(name="noop")
async def noop() -> None:
    COMPLETIONS.append(time.time())


@workflow.defn(name="NoopCycleWorkflow")
class NoopCycleWorkflow:
    def __init__(self) -> None:
        self._stop = False

    @workflow.signal
    def stop(self) -> None:
        self._stop = True

    @workflow.run
    async def run(self, period_seconds: float) -> None:
        while not self._stop:
            try:
                await workflow.wait_condition(lambda: self._stop, timeout=period_seconds)
            except TimeoutError:
                pass
            if self._stop:
                return
            await workflow.execute_activity(noop, start_to_close_timeout=timedelta(seconds=30))
