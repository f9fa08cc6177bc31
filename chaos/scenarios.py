"""The phases: each starts fresh subscriptions on 10-second plans across all six carrier
families, injects its faults while they bill, cancels them, waits (bounded) until nothing is in
flight, and checks the carriers' books against our records for its own subscriptions."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy.engine import Engine
from temporalio.client import WorkflowExecutionStatus

from carriers.loader import CarrierConfig, Registry
from carriers.numbers import sample_msisdn
from chaos.books import (
    Check,
    Snapshot,
    debits_from_books,
    evidence,
    fetch_books,
    read_records,
    reconcile,
)
from chaos.stack import ChaosStack
from models.money import to_decimal
from models.tables import Period
from starter import StartSubscriptionRequest, SubscriptionClient

log = logging.getLogger("chaos")

# at least two carriers per family, including one that promises neither deduplication nor a
# look-up (mx-maya), JPY/KWD exponents, and four SMPP carriers
CARRIERS = (
    "fr-azur", "de-rheinfunk", "jp-sakura",  # oneapi (basic, oauth2, JPY)
    "kw-dasman", "mx-maya", "za-karoo",  # parlayx (wsse + KWD, no dedup/no look-up, header)
    "br-ipe", "jp-fuji",  # camara
    "de-alpen", "it-pagamobile",  # polling aggregator
    "es-cobromovil", "ng-niger",  # callback aggregator
    "gb-mersey", "pl-wisla", "ke-safari", "bh-dilmun",  # smpp
)
# carriers whose credentials the carrier rotates mid-run (basic, oauth2, wsse, hmac)
ROTATED = ("fr-azur", "de-rheinfunk", "kw-dasman", "de-alpen")
CALLBACK_FAULTS = ("no_callback", "duplicate_callback", "late_callback", "forged_callback",
                   "foreign_callback")
HTTP_FAULTS = ("latency", "error_503", "error_500", "insufficient_funds", "throttle",
               "timeout_after_debit", "reset_after_debit", "commit_after_reply",
               "fault_code_variant", "lookup_error", "unavailable_for", "malformed")
SMPP_FAULTS = ("latency", "error_503", "throttle", "malformed", "insufficient_funds",
               "timeout_after_debit", "reset_after_debit", "commit_after_reply", "no_callback",
               "duplicate_callback", "late_callback", "lookup_error", "unavailable_for")


def fault_kinds(carrier: CarrierConfig) -> tuple[str, ...]:
    if carrier.protocol == "smpp":
        return SMPP_FAULTS
    if carrier.protocol in ("camara", "callback-aggregator"):
        return HTTP_FAULTS + CALLBACK_FAULTS
    return HTTP_FAULTS


def fault_body(carrier: CarrierConfig, kind: str) -> dict[str, Any]:
    body: dict[str, Any] = {"carrier": carrier.id, "kind": kind, "count": 1}
    if kind == "timeout_after_debit":  # answer only after our client gave up
        wait = carrier.smpp.submit_timeout_seconds if carrier.smpp else carrier.timeout_seconds
        body["delay_seconds"] = wait + 2
    elif kind in ("latency", "throttle"):
        body["delay_seconds"] = 2
    elif kind in ("commit_after_reply", "late_callback"):
        body["delay_seconds"] = 8
    elif kind == "unavailable_for":
        body["delay_seconds"] = 6
    elif kind == "lookup_error":
        body["count"] = 2
    return body


def unsettleable(carrier: CarrierConfig) -> bool:
    """A carrier with no look-up, no deduplication and no pushed results: an ambiguous charge
    there stays pending until the settle deadline (days) by design."""
    return (not carrier.promises.status_lookup and carrier.promises.deduplicates_by_key == "no"
            and carrier.interaction == "sync")


@dataclass
class Config:
    subscriptions: int = 32
    seconds: float = 45.0
    quiesce_seconds: float = 75.0
    seed: int = 7
    short_of_credit: float = 0.15


@dataclass
class Context:
    stack: ChaosStack
    client: SubscriptionClient
    engine: Engine
    registry: Registry
    config: Config
    rng: random.Random
    taken: set[str] = field(default_factory=set)
    all_subscriptions: list[int] = field(default_factory=list)
    carrier_of: dict[int, str] = field(default_factory=dict)


@dataclass
class PhaseResult:
    name: str
    faults: int = 0
    check: Check = field(default_factory=Check)
    seconds: float = 0.0
    subscriptions: int = 0
    timed_out: bool = False
    still_open: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.timed_out or self.check.failed


Injector = Callable[[Context, float, PhaseResult], Awaitable[None]]


# -- the phases' faults ------------------------------------------------------------------------


async def _post(sim_url: str, path: str, body: dict[str, Any]) -> bool:
    try:
        async with httpx.AsyncClient(base_url=sim_url, timeout=5) as sim:
            return (await sim.post(path, json=body)).status_code == 200
    except httpx.HTTPError:
        return False


async def carrier_faults(ctx: Context, seconds: float, result: PhaseResult) -> None:
    """Every applicable fault kind for every carrier of the phase, one carrier at a time at
    most every few seconds (so most are met before the phase ends), and credentials rotated
    by four carriers for a while."""
    carriers = [ctx.registry.carriers[c] for c in CARRIERS]
    queues = {c.id: _queue(ctx.rng, fault_kinds(c)) for c in carriers}
    subs_per_carrier = max(1, ctx.config.subscriptions // len(CARRIERS))
    began = time.monotonic()
    rotated = False
    restored = False
    # about one charge per fault: a fault not met before the phase ends is wasted
    per_carrier_gap = 10.0 / subs_per_carrier + 0.5
    last: dict[str, float] = {}
    while (elapsed := time.monotonic() - began) < seconds:
        if not rotated and elapsed >= seconds * 0.2:
            for carrier_id in ROTATED:
                if await _post(ctx.stack.sim_url, "/_control/credentials",
                               {"carrier": carrier_id, "password": f"rotated-{ctx.rng.random()}"}):
                    result.faults += 1
            rotated = True
        if rotated and not restored and elapsed >= seconds * 0.5:
            await restore_credentials(ctx)
            restored = True
        now = time.monotonic()
        for carrier in ctx.rng.sample(carriers, len(carriers)):
            if now - last.get(carrier.id, 0.0) < per_carrier_gap or not queues[carrier.id]:
                continue
            kind = queues[carrier.id].pop()
            if await _post(ctx.stack.sim_url, "/_control/faults", fault_body(carrier, kind)):
                result.faults += 1
            last[carrier.id] = now
            break
        await asyncio.sleep(0.3)
    if not restored:
        await restore_credentials(ctx)


async def restore_credentials(ctx: Context) -> None:
    for carrier_id in ROTATED:
        ref = ctx.registry.carriers[carrier_id].auth.secret_ref
        await _post(ctx.stack.sim_url, "/_control/credentials",
                    {"carrier": carrier_id, "password": ctx.stack.secrets[ref]})


# the faults after which money may have moved with no answer, met first
REPLY_LOST = ("reset_after_debit", "timeout_after_debit", "commit_after_reply", "no_callback",
              "late_callback", "lookup_error")


def _queue(rng: random.Random, kinds: tuple[str, ...]) -> list[str]:
    """A carrier's faults in the order they are popped (from the end): reply-lost first."""
    first = [k for k in kinds if k in REPLY_LOST]
    rest = [k for k in kinds if k not in REPLY_LOST]
    rng.shuffle(first)
    rng.shuffle(rest)
    return rest + first


async def reply_lost_background(ctx: Context, seconds: float, result: PhaseResult,
                                every: float = 3.0) -> None:
    """Alongside a process fault: a reply-lost carrier fault every few seconds, so kills and
    restarts meet operations that are being settled."""
    carriers = [ctx.registry.carriers[c] for c in CARRIERS]
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        carrier = ctx.rng.choice(carriers)
        kind = ctx.rng.choice([k for k in fault_kinds(carrier) if k in REPLY_LOST])
        if await _post(ctx.stack.sim_url, "/_control/faults", fault_body(carrier, kind)):
            result.faults += 1
        await asyncio.sleep(every)


def _kill_times(rng: random.Random, seconds: float, count: int) -> list[float]:
    """Spread over the phase, each jittered so kills meet charges at any point."""
    slot = seconds / (count + 1)
    return [slot * (i + 1) + rng.uniform(-slot / 3, slot / 3) for i in range(count)]


async def _at_times(ctx: Context, seconds: float, count: int, result: PhaseResult,
                    action: Callable[[], Awaitable[None]]) -> None:
    background = asyncio.create_task(reply_lost_background(ctx, seconds, result))
    try:
        began = time.monotonic()
        for at in _kill_times(ctx.rng, seconds, count):
            await asyncio.sleep(max(0.0, began + at - time.monotonic()))
            await action()
        await asyncio.sleep(max(0.0, began + seconds - time.monotonic()))
    finally:
        background.cancel()


def _restart(ctx: Context, name: str, down_seconds: float, result: PhaseResult
             ) -> Callable[[], Awaitable[None]]:
    async def action() -> None:
        log.info("SIGKILL %s", name)
        ctx.stack.kill(name)
        result.faults += 1
        await asyncio.sleep(down_seconds)
        await asyncio.to_thread(ctx.stack.launch, name)
    return action


async def worker_kills(ctx: Context, seconds: float, result: PhaseResult) -> None:
    """SIGKILL the worker four times while it bills (and the callback receiver once)."""
    kill_worker = _restart(ctx, "worker", 1.0, result)
    kill_receiver = _restart(ctx, "callbacks", 1.0, result)
    count = 0

    async def action() -> None:
        nonlocal count
        count += 1
        await kill_worker()
        if count == 2:
            await kill_receiver()
    await _at_times(ctx, seconds, 4, result, action)


async def simulator_kills(ctx: Context, seconds: float, result: PhaseResult) -> None:
    """SIGKILL the simulator (HTTP carriers and the SMSC) twice; it restarts on its books."""
    await _at_times(ctx, seconds, 3, result, _restart(ctx, "simulator", 2.0, result))


async def postgres_restart(ctx: Context, seconds: float, result: PhaseResult) -> None:
    """Stops PostgreSQL at once (immediate: no checkpoint) under load, 4 s down, starts it."""
    postgres = ctx.stack.postgres
    assert postgres is not None

    async def action() -> None:
        log.info("PostgreSQL immediate stop, restart")
        result.faults += 1
        await asyncio.to_thread(postgres.restart, 4.0)
    await _at_times(ctx, seconds, 1, result, action)


async def temporal_restart(ctx: Context, seconds: float, result: PhaseResult) -> None:
    """SIGKILL the Temporal dev server; it restarts on the same SQLite file."""
    await _at_times(ctx, seconds, 2, result, _restart(ctx, "temporal", 3.0, result))


PHASES: dict[str, tuple[str, Injector]] = {
    "carriers": ("carrier misbehaviour, every family", carrier_faults),
    "worker": ("worker SIGKILLed 4x (receiver 1x), reply-lost faults", worker_kills),
    "simulator": ("simulator + SMSC SIGKILLed 3x, reply-lost faults", simulator_kills),
    "postgres": ("PostgreSQL stopped 4 s under load, reply-lost faults", postgres_restart),
    "temporal": ("Temporal dev server SIGKILLed 2x, reply-lost faults", temporal_restart),
}


# -- the common run ----------------------------------------------------------------------------


async def start_subscriptions(ctx: Context, count: int) -> list[int]:
    registry, rng = ctx.registry, ctx.rng
    limiter = asyncio.Semaphore(8)
    ids: list[int] = []

    async def one(index: int) -> None:
        carrier = registry.carriers[CARRIERS[index % len(CARRIERS)]]
        price = next(p for p in carrier.price_points if p.period is Period.INTERVAL)
        currency = registry.currency_of(carrier.id)
        amount = registry.amount_minor(carrier.id, price)
        msisdn = sample_msisdn(carrier, registry, rng, ctx.taken)
        short = rng.random() < ctx.config.short_of_credit
        async with limiter:
            if short:  # runs out after a few cycles: insufficient-funds retry slots
                balance = to_decimal(amount * rng.randint(1, 3), currency)
                await _post(ctx.stack.sim_url, "/_control/accounts",
                            {"carrier": carrier.id, "msisdn": msisdn, "balance": str(balance)})
            # first charges spread over one interval: kills meet charges at every stage
            first = datetime.now(UTC) + timedelta(seconds=rng.uniform(1, price.interval_seconds
                                                                      or 10))
            started = await ctx.client.start_subscription(StartSubscriptionRequest(
                msisdn=msisdn, product_id=price.product, amount_minor=amount,
                currency=currency, period=Period.INTERVAL, carrier_id=carrier.id,
                first_charge_at=first))
        ids.append(started.subscription_id)
        ctx.carrier_of[started.subscription_id] = carrier.id

    await asyncio.gather(*(one(i) for i in range(count)))
    ctx.all_subscriptions.extend(ids)
    return sorted(ids)


async def cancel_all(ctx: Context, ids: list[int], bound: float) -> list[int]:
    """Cancels each (update; a signal when the update cannot get through): the ones not
    confirmed within the bound are returned."""
    deadline = time.monotonic() + bound
    limiter = asyncio.Semaphore(10)
    failed: list[int] = []

    async def one(sid: int) -> None:
        async with limiter:
            while time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(ctx.client.cancel_subscription(sid), 15)
                    return
                except Exception as exc:  # noqa: BLE001 (any failure: try again, then signal)
                    log.info("cancel %s: %s", sid, exc)
                    try:
                        handle = ctx.client.handle(sid)
                        described = await asyncio.wait_for(handle.describe(), 5)
                        if described.status != WorkflowExecutionStatus.RUNNING:
                            return
                        await asyncio.wait_for(handle.signal("request_cancel"), 5)
                        return
                    except Exception:  # noqa: BLE001
                        await asyncio.sleep(2)
            failed.append(sid)

    await asyncio.gather(*(one(sid) for sid in ids))
    return failed


async def _busy_workflows(ctx: Context, ids: list[int]) -> int:
    """Workflows still running a charge activity (one may be about to send)."""
    busy = 0
    for sid in ids:
        try:
            described = await asyncio.wait_for(ctx.client.handle(sid).describe(), 5)
        except Exception as exc:  # noqa: BLE001 (unreachable counts as busy)
            log.info("describe subscription %s: %r", sid, exc)
            busy += 1
            continue
        if described.status != WorkflowExecutionStatus.RUNNING:
            continue
        charging = [a for a in described.raw_description.pending_activities
                    if a.activity_type.name in ("charge_subscription", "refund_charge")]
        if charging:
            log.info("subscription %s still runs %s (attempt %d)", sid,
                     charging[0].activity_type.name, charging[0].attempt)
            busy += 1
    return busy


async def quiesce(ctx: Context, ids: list[int], bound: float) -> int:
    """Waits until no operation of these subscriptions is in flight and no workflow runs an
    activity, twice in a row; carriers that cannot settle by design are not waited for.
    Returns what is still in flight at the bound (0: quiet)."""
    from chaos.books import open_operations

    waited = [sid for sid in ids
              if not unsettleable(ctx.registry.carriers[ctx.carrier_of[sid]])]
    deadline = time.monotonic() + bound
    quiet_once = False
    remaining = 0
    while time.monotonic() < deadline:
        try:
            open_ops = await asyncio.to_thread(open_operations, ctx.engine, waited)
            remaining = sum(open_ops.values()) + await _busy_workflows(ctx, waited)
        except Exception as exc:  # noqa: BLE001 (database or Temporal still recovering)
            log.info("quiesce: %s", exc)
            remaining = -1
        if remaining == 0:
            if quiet_once:
                return 0
            quiet_once = True
        else:
            quiet_once = False
        await asyncio.sleep(2)
    return max(remaining, 1)


async def check(ctx: Context, scope: set[int] | None) -> Check:
    books = await fetch_books(ctx.stack.sim_url)
    ledger, ops, submissions, subscribers = await asyncio.to_thread(read_records, ctx.engine)
    return reconcile(Snapshot(debits_from_books(books), ledger, ops, submissions, subscribers),
                     scope)


async def heal(ctx: Context, result: PhaseResult) -> None:
    """Whatever is down after a phase (a child that died of its own accord) is started again
    and noted: a process that exits on a dependency's outage is itself a finding."""
    for name in ctx.stack.down():
        result.notes.append(f"{name} was down after the phase (exited on its own); restarted")
        await asyncio.to_thread(ctx.stack.launch, name)


async def run_phase(ctx: Context, name: str) -> PhaseResult:
    title, inject = PHASES[name]
    result = PhaseResult(name)
    began = time.monotonic()
    config = ctx.config
    bound = 90 + config.seconds + 90 + config.quiesce_seconds + 60
    try:
        await asyncio.wait_for(_phase(ctx, name, inject, result), bound)
    except TimeoutError:
        result.timed_out = True
        result.notes.append(f"phase exceeded its bound of {bound:.0f}s")
    result.seconds = time.monotonic() - began
    log.info("phase %s (%s) done in %.0fs", name, title, result.seconds)
    return result


async def _phase(ctx: Context, name: str, inject: Injector, result: PhaseResult) -> None:
    config = ctx.config
    ids = await asyncio.wait_for(start_subscriptions(ctx, config.subscriptions), 90)
    result.subscriptions = len(ids)
    log.info("phase %s: %d subscriptions billing for %.0fs", name, len(ids), config.seconds)
    await inject(ctx, config.seconds, result)
    await heal(ctx, result)
    if name == "carriers":
        # faults not met yet would leak into the next phase, and the simulator has no endpoint
        # to clear them: a graceful restart does (the books are durable)
        await asyncio.to_thread(_graceful_restart, ctx.stack, "simulator")
    not_cancelled = await cancel_all(ctx, ids, 90)
    if not_cancelled:
        result.notes.append(f"{len(not_cancelled)} subscriptions not cancelled: {not_cancelled}")
    result.still_open = await quiesce(ctx, ids, config.quiesce_seconds)
    if result.still_open:
        result.notes.append(f"{result.still_open} operations/activities still in flight "
                            f"after {config.quiesce_seconds:.0f}s")
    result.check = await asyncio.wait_for(check(ctx, set(ids)), 60)
    await write_evidence(ctx, name, result.check)


async def write_evidence(ctx: Context, name: str, found: Check) -> None:
    """What each problem key went through, and what is still waiting, into the data dir."""
    lines = [*found.problems, "", *found.waiting, ""]
    if found.problem_keys:
        lines += await asyncio.to_thread(evidence, ctx.engine, found.problem_keys)
    path = ctx.stack.data_dir / f"evidence-{name}.txt"
    path.write_text("\n".join(lines) + "\n")


def _graceful_restart(stack: ChaosStack, name: str) -> None:
    child = stack.children[name]
    if child.process is not None and child.process.poll() is None:
        child.process.terminate()
        child.process.wait(timeout=15)
    stack.launch(name)
