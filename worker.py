"""Runs the billing worker: subscription and refund workflows, and the billing activities."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from sqlalchemy.engine import Engine
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.worker import Worker

import codec
from activities.billing import BillingActivities
from activities.delivery import DeliveryActivities
from activities.notices import NoticeActivities
from activities.reconciliation import ReconciliationActivities
from carriers.gate import CarrierGates
from carriers.loader import Registry, carrier_task_queue, default_registry
from carriers.pool import AdapterPool
from keywords.service import attach_mobile_originated
from models.db import make_engine, migrate, setup_lock
from models.interactions import InteractionStore
from models.seed import seed_reference_data
from models.smpp_store import SubmissionStore
from reconciliation.schedule import ensure_schedule
from report_relay import ReportRelay
from settings import Settings, get_settings
from statistics_service.metrics import install_prometheus
from traceability.indexer import OutboxDrainer, make_client
from workflows.late_settlement import LateSettlementWorkflow
from workflows.reconciliation import DailyReconciliationWorkflow, ReconciliationWorkflow
from workflows.refund import RefundWorkflow
from workflows.subscription import SubscriptionWorkflow

WORKFLOWS = [SubscriptionWorkflow, RefundWorkflow, LateSettlementWorkflow,
             ReconciliationWorkflow, DailyReconciliationWorkflow]


def prepare_database(settings: Settings, registry: Registry) -> Engine:
    engine = make_engine(settings.database_url)
    with setup_lock(settings.database_url):
        migrate(settings.database_url)
        seed_reference_data(engine, registry)
    return engine


def make_adapter_pool(registry: Registry, settings: Settings, engine: Engine,
                      client: Client) -> AdapterPool:
    """Adapters record interactions in the database; SMPP receipts are relayed as signals."""
    interactions = InteractionStore(engine).record
    relay = ReportRelay(client, engine, interactions, settings.task_queue)
    return AdapterPool(registry, settings, interactions, SubmissionStore(engine), relay.relay)


class WorkerGroup:
    """The workflow worker and one activity worker per carrier task queue, run together, so a
    slow carrier fills its own slots only and each carrier's rate limit holds across workers."""

    def __init__(self, workers: list[Worker],
                 closers: list[Callable[[], Awaitable[None]]] | None = None) -> None:
        self.workers = workers
        self._stack = AsyncExitStack()
        for close in closers or []:
            self._stack.push_async_callback(close)

    async def __aenter__(self) -> WorkerGroup:
        for worker in self.workers:
            await self._stack.enter_async_context(worker)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


def build_worker(
    client: Client, settings: Settings, engine: Engine, adapters: AdapterPool,
    registry: Registry | None = None,
) -> WorkerGroup:
    registry = registry or default_registry()
    # local charges may hold half the worker's local activity slots; the rest answer at once
    gates = CarrierGates(registry, settings.max_concurrent_activities_per_carrier,
                         settings.local_call_share, settings.worker_processes,
                         local_limit=max(settings.max_concurrent_local_activities // 2, 1))
    activities = BillingActivities(engine, adapters, registry, settings.deployment_id, gates)
    delivery = DeliveryActivities(engine, settings.game_backend_url,
                                  settings.game_backend_token.get_secret_value(),
                                  settings.deployment_id, settings.game_backend_timeout_seconds)
    notices = NoticeActivities(engine, adapters, registry, settings.notice_carrier_id)
    workers = [Worker(
        client,
        task_queue=settings.task_queue,
        workflows=WORKFLOWS,
        activities=[*activities.all(), *delivery.all(), notices.send_notice,
                    *ReconciliationActivities(engine, registry, settings.simulator_urls).all()],
        max_concurrent_activities=settings.max_concurrent_activities,
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
        max_concurrent_local_activities=settings.max_concurrent_local_activities,
        max_cached_workflows=settings.max_cached_workflows,
    )]
    queues: dict[str, float] = {}
    for carrier in registry.carriers.values():
        queue = carrier_task_queue(settings.task_queue, carrier)
        # carriers sharing a group share its lowest declared rate; local calls take their
        # share of it (carriers/gate.py), the queue the rest
        rate = CarrierGates.queue_rate(carrier, settings.local_call_share)
        queues[queue] = min(queues.get(queue, rate), rate)
    for queue, rate in sorted(queues.items()):
        workers.append(Worker(
            client,
            task_queue=queue,
            activities=activities.carrier_calls(),
            max_concurrent_activities=settings.max_concurrent_activities_per_carrier,
            max_concurrent_activity_task_polls=settings.activity_pollers_per_carrier,
            max_task_queue_activities_per_second=rate,
        ))
    return WorkerGroup(workers, [delivery.aclose])


async def run_worker(settings: Settings) -> None:
    registry = default_registry()
    engine = prepare_database(settings, registry)
    runtime = install_prometheus(settings.metrics_port) if settings.metrics_port else None
    client = await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace,
                                  runtime=runtime, data_converter=codec.data_converter(settings))
    adapters = make_adapter_pool(registry, settings, engine, client)
    for carrier_id in registry.carriers:  # a promise an adapter cannot keep stops the start
        adapters.get(carrier_id)
    # texts from subscribers (JOIN, STOP, HELP, a PIN) reach the platform through the SMSCs
    mobile_originated = await attach_mobile_originated(client, engine, registry, adapters,
                                                       settings)
    adapters.start_sessions()
    try:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # the outbox drains into OpenSearch (a backlog waits while it is away; nothing is lost)
        drainer = (asyncio.create_task(OutboxDrainer(
            engine, make_client(settings.opensearch_url)).run(stop))
            if settings.opensearch_url else None)
        async with build_worker(client, settings, engine, adapters, registry):
            if settings.gc_freeze_after_start:
                gc.collect()
                gc.freeze()
            # each carrier's settlement report of the day before, compared with the ledger
            try:
                await ensure_schedule(client, settings.task_queue, sorted(registry.carriers))
            except RPCError as exc:  # (a server without schedules: reconcile on demand)
                logging.warning("reconciliation schedule not set: %s", exc)
            logging.info("worker polling %s and its carrier queues on %s", settings.task_queue,
                         settings.temporal_address)
            await stop.wait()
        if drainer is not None:
            await drainer
            logging.info("worker stopping: finishing the tasks in hand")
    finally:
        await mobile_originated.aclose()
        await adapters.aclose()
        engine.dispose()


def watch_gc_pauses(threshold_seconds: float = 0.05) -> None:
    """Logs each garbage collection that stops the worker longer than the threshold: a
    collection holds the GIL, so every charge in flight waits for it."""
    began = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
            return
        paused = time.perf_counter() - began[0]
        if paused >= threshold_seconds:
            logging.warning("garbage collection (generation %d) paused the worker %.0f ms, "
                            "%d objects freed", info["generation"], paused * 1000,
                            info["collected"])

    gc.callbacks.append(on_gc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-concurrent-activities", type=int)
    parser.add_argument("--max-concurrent-workflow-tasks", type=int)
    args = parser.parse_args()
    settings = get_settings()
    overrides = {
        k: v for k, v in vars(args).items() if v is not None
    }
    settings = settings.model_copy(update=overrides)
    # the event loop and the database thread hand the GIL to each other several times per
    # charge; a waiting thread takes it after this long (CPython's default: 5 ms)
    sys.setswitchinterval(settings.gil_switch_interval_seconds)
    gc.set_threshold(*settings.gc_thresholds)
    watch_gc_pauses()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # one line per bulk request is noise; failures still show
    logging.getLogger("opensearch").setLevel(logging.WARNING)
    # httpx logs every URL at INFO, and carrier URLs hold MSISDNs: interactions are recorded
    # (redacted) by the transport instead
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(run_worker(settings))


if __name__ == "__main__":
    main()
