"""A worker's gate on each carrier: slots shared by both paths, a token bucket for local calls,
and the split of the carrier's declared rate between the local path and the queue."""

from __future__ import annotations

import asyncio

import pytest

from carriers.gate import MAX_LOCAL_SHARE, CarrierGate, CarrierGates, LocalBudget
from carriers.loader import carrier_task_queue, default_registry

REGISTRY = default_registry()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_local_calls_take_a_token_each_and_the_bucket_refills_at_the_rate() -> None:
    clock = Clock()
    gate = CarrierGate(slots=10, local_rate=2.0, clock=clock)
    assert [gate.try_enter_local() for _ in range(3)] == [True, True, False]
    for _ in range(2):
        await gate.leave()
    clock.now += 0.4  # 0.8 of a token
    assert not gate.try_enter_local()
    clock.now += 0.1
    assert gate.try_enter_local()
    assert gate.in_flight == 1


async def test_a_local_call_never_waits_for_a_slot_and_a_queued_one_does() -> None:
    clock = Clock()
    gate = CarrierGate(slots=2, local_rate=100.0, clock=clock)
    assert gate.try_enter_local() and gate.try_enter_local()
    assert not gate.try_enter_local()  # tokens left, no slot: the queue takes it
    waiting = asyncio.ensure_future(gate.enter_queued())
    await asyncio.sleep(0.05)
    assert not waiting.done() and gate.in_flight == 2
    await gate.leave()
    await asyncio.wait_for(waiting, 1)
    assert gate.in_flight == 2


async def test_a_closed_local_path_sends_everything_to_the_queue() -> None:
    gate = CarrierGate(slots=5, local_rate=0.0)
    assert not gate.try_enter_local()
    await gate.enter_queued()
    assert gate.in_flight == 1


def test_the_carriers_rate_is_split_between_the_workers_local_calls_and_the_queue() -> None:
    carrier = REGISTRY.carriers["fr-azur"]
    gates = CarrierGates(REGISTRY, slots=20, local_share=0.5, worker_processes=4)
    local_total = gates.of("fr-azur").local_rate * 4
    queue = CarrierGates.queue_rate(carrier, 0.5)
    assert local_total == pytest.approx(carrier.rate_limit_per_second * 0.5)
    assert local_total + queue == pytest.approx(carrier.rate_limit_per_second)


def test_carriers_of_one_queue_group_share_one_gate_at_the_lowest_rate() -> None:
    gates = CarrierGates(REGISTRY, slots=20, local_share=0.5, worker_processes=1)
    groups: dict[str, list[str]] = {}
    for carrier in REGISTRY.carriers.values():
        groups.setdefault(carrier_task_queue("", carrier), []).append(carrier.id)
    for members in groups.values():
        lowest = min(REGISTRY.carriers[c].rate_limit_per_second for c in members)
        assert len({id(gates.of(c)) for c in members}) == 1
        assert gates.of(members[0]).local_rate == pytest.approx(lowest * 0.5)


@pytest.mark.parametrize(("share", "workers"), [(-0.1, 1), (MAX_LOCAL_SHARE + 0.01, 1), (0.5, 0)])
def test_a_share_the_queue_could_not_take_over_is_refused(share: float, workers: int) -> None:
    with pytest.raises(ValueError):
        CarrierGates(REGISTRY, slots=20, local_share=share, worker_processes=workers)


def test_a_share_below_one_call_a_second_shuts_the_local_path() -> None:
    """Every worker's bucket holds at most a second of its share: eighty workers at 0.3 call
    a second each would otherwise burst eighty calls at once past a carrier's rate."""
    gate = CarrierGate(slots=5, local_rate=0.3)
    assert not gate.try_enter_local()


async def test_local_calls_of_all_carriers_leave_slots_free_for_answers() -> None:
    budget = LocalBudget(limit=2)
    slow, other = (CarrierGate(slots=5, local_rate=100.0, budget=budget) for _ in range(2))
    assert slow.try_enter_local() and slow.try_enter_local()
    assert not other.try_enter_local()  # overflows at once instead of waiting for a slot
    await slow.leave(local=True)
    assert other.try_enter_local()
    assert budget.in_flight == 2
