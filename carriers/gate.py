"""How many calls one worker process has in flight to a carrier, and how fast it starts them
on the local path.

A charge is first tried as a local activity, in the worker that runs the workflow: no task
queue round trip, half the server's work and history. A local activity is paced by no server,
so each worker paces it here: a carrier's calls share ``slots`` (its queue's slot count), and
the local path takes a token from a bucket filled at this worker's share of the carrier's rate
limit. A local call that finds no slot or no token sends nothing and records nothing: the
workflow sends the charge to the carrier's own task queue instead, paced by the server at the
rest of the carrier's rate. Calls arriving there wait for a slot here, so a slow carrier still
holds its own slots only, and all paths together stay within the carrier's declared rate:

    local (all workers) ≤ rate × local_share, queue ≤ rate × (1 − local_share).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from carriers.loader import CarrierConfig, Registry, carrier_task_queue

# at most this share of a carrier's rate goes to local calls: the queue keeps the rest, so an
# overflow always has somewhere to go
MAX_LOCAL_SHARE = 0.9


class LocalBudget:
    """Local calls in flight in this worker, all carriers together, and how many may be: the
    rest of the worker's local activity slots stay free for answers, an overflow included,
    so slow carriers cannot hold every slot and keep the others from even overflowing."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0


class CarrierGate:
    """One carrier (or carrier group) in one worker process."""

    def __init__(self, slots: int, local_rate: float,
                 clock: Callable[[], float] = time.monotonic,
                 budget: LocalBudget | None = None) -> None:
        if slots < 1:
            raise ValueError(f"a carrier gate needs at least one slot, not {slots}")
        self.slots = slots
        self.local_rate = max(local_rate, 0.0)
        self._clock = clock
        self._budget = budget
        self._in_flight = 0
        self._freed = asyncio.Condition()
        # a second's worth of burst at most: every worker's bucket full at once stays within
        # the carrier's rate share; below one call a second the local path is shut (the
        # queue alone paces such a carrier)
        self._capacity = self.local_rate
        self._tokens = self._capacity
        self._filled_at = clock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._capacity,
                           self._tokens + (now - self._filled_at) * self.local_rate)
        self._filled_at = now

    def try_enter_local(self) -> bool:
        """A slot and a token now, or nothing taken (the call goes to the queue)."""
        if self._in_flight >= self.slots:
            return False
        if self._budget is not None and self._budget.in_flight >= self._budget.limit:
            return False
        self._refill()
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        self._in_flight += 1
        if self._budget is not None:
            self._budget.in_flight += 1
        return True

    async def enter_queued(self) -> None:
        """Waits for a slot (the server paced this call already)."""
        async with self._freed:
            await self._freed.wait_for(lambda: self._in_flight < self.slots)
            self._in_flight += 1

    async def leave(self, local: bool = False) -> None:
        if local and self._budget is not None:
            self._budget.in_flight -= 1
        async with self._freed:
            self._in_flight -= 1
            self._freed.notify()


class CarrierGates:
    """Every carrier's gate in this worker, keyed as its task queue is (a group shares one,
    at its lowest declared rate)."""

    def __init__(self, registry: Registry, slots: int, local_share: float,
                 worker_processes: int, local_limit: int | None = None) -> None:
        if not 0.0 <= local_share <= MAX_LOCAL_SHARE:
            raise ValueError(f"local_share must be within 0 and {MAX_LOCAL_SHARE}, "
                             f"not {local_share}")
        if worker_processes < 1:
            raise ValueError(f"worker_processes must be at least 1, not {worker_processes}")
        self.local_share = local_share
        self._key: dict[str, str] = {}
        rates: dict[str, float] = {}
        for carrier in registry.carriers.values():
            key = carrier_task_queue("", carrier)
            self._key[carrier.id] = key
            rates[key] = min(rates.get(key, carrier.rate_limit_per_second),
                             carrier.rate_limit_per_second)
        budget = None if local_limit is None else LocalBudget(local_limit)
        self._gates = {key: CarrierGate(slots, rate * local_share / worker_processes,
                                        budget=budget)
                       for key, rate in rates.items()}

    def of(self, carrier_id: str) -> CarrierGate:
        return self._gates[self._key[carrier_id]]

    @staticmethod
    def queue_rate(carrier: CarrierConfig, local_share: float) -> float:
        """What the server lets the carrier's task queue start per second."""
        return carrier.rate_limit_per_second * (1.0 - local_share)
