"""Workflows run through a worker whose client seals payloads: the history the Temporal server
stores holds no MSISDN, carrier reference or amount in plain text; the codec (and the codec
server, for the ``temporal`` CLI) gives them back.

SubscriptionWorkflow itself never carries an MSISDN (its activities read it from the
database), so a small probe workflow carries one through each kind of payload: workflow input
and result, activity input and result, signal, update and its result, memo, failure."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from google.protobuf.message import Message
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType, IndexedValueType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from carriers.loader import default_registry
from codec import AesGcmCodec, codec_from, data_converter, new_key
from codec.aesgcm import ENCODING
from codec.server import codec_app, start_codec_server
from settings import Settings, venv_binary
from starter import StartSubscriptionRequest, SubscriptionClient
from tests.conftest import Simulator
from worker import build_worker, make_adapter_pool
from workflows import search_attributes as sa
from workflows.subscription import SubscriptionWorkflow

PROBE_QUEUE_SUFFIX = "-probe"

CARRIER = "fr-azur"
TOKEN = "operator-token-for-tests"


@dataclass
class Keys:
    codec_keys: dict[str, SecretStr] = field(default_factory=dict)
    codec_current_key: str | None = None


KEYS = Keys({"k1": SecretStr(new_key())}, "k1")


@dataclass
class Probe:
    msisdn: str
    amount: str


@activity.defn(name="codec_probe_charge")
async def probe_charge(probe: Probe) -> str:
    if probe.amount == "refuse":
        raise ApplicationError(f"carrier refused {probe.msisdn}", non_retryable=True)
    return f"REF-{probe.msisdn[1:]}-{probe.amount}"


@workflow.defn(name="CodecProbe", sandboxed=False)
class ProbeWorkflow:
    def __init__(self) -> None:
        self.notes: list[str] = []

    @workflow.run
    async def run(self, probe: Probe) -> str:
        await workflow.wait_condition(lambda: len(self.notes) == 2)
        reference: str = await workflow.execute_activity(
            probe_charge, probe, start_to_close_timeout=timedelta(seconds=10))
        try:
            await workflow.execute_activity(probe_charge, Probe(probe.msisdn, "refuse"),
                                            start_to_close_timeout=timedelta(seconds=10))
        except ActivityError as exc:
            self.notes.append(str(exc.cause))
        return f"{reference} {' '.join(self.notes)}"

    @workflow.signal
    def note(self, text: str) -> None:
        self.notes.append(text)

    @workflow.update
    def amend(self, text: str) -> str:
        self.notes.append(text)
        return f"amended {text}"

    @workflow.query
    def seen(self) -> list[str]:
        return self.notes


@dataclass
class EncryptedStack:
    env: WorkflowEnvironment
    client: SubscriptionClient
    codec: AesGcmCodec
    task_queue: str


@pytest.fixture(scope="module")
async def encrypted(settings: Settings, engine: Engine) -> AsyncIterator[EncryptedStack]:
    """A time-skipping server of its own whose every client (the worker's too) seals payloads."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=venv_binary("temporal-test-server"),
        data_converter=data_converter(KEYS))
    await env.client.operator_service.add_search_attributes(AddSearchAttributesRequest(
        namespace=env.client.namespace,
        search_attributes={k.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for k in sa.ALL}))
    own = settings.model_copy(update={"task_queue": f"codec-{uuid.uuid4()}"})
    adapters = make_adapter_pool(default_registry(), own, engine, env.client)
    codec = codec_from(KEYS)
    assert codec is not None
    try:
        async with build_worker(env.client, own, engine, adapters), Worker(
                env.client, task_queue=f"{own.task_queue}{PROBE_QUEUE_SUFFIX}", workflows=[ProbeWorkflow],
                activities=[probe_charge], workflow_runner=UnsandboxedWorkflowRunner()):
            yield EncryptedStack(env, SubscriptionClient(
                env.client, engine, default_registry(), own.task_queue, own.deployment_id), codec,
                own.task_queue)
    finally:
        await adapters.aclose()
        await env.shutdown()


def payloads_in(message: Message, path: str = "") -> Iterator[tuple[str, Payload]]:
    """Every Payload inside a history event, with the field path that leads to it."""
    if isinstance(message, Payload):
        yield path, message
        return
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        where = f"{path}.{descriptor.name}"
        if descriptor.message_type.GetOptions().map_entry:
            for key, item in value.items():  # (the key names a marker's detail)
                if isinstance(item, Message):
                    yield from payloads_in(item, f"{where}[{key}]")
            continue
        elif descriptor.is_repeated:
            items = list(value)
        else:
            items = [value]
        for item in items:
            yield from payloads_in(item, where)


@dataclass
class Histories:
    subscription_id: str
    probe_id: str
    subscriber_msisdn: str
    probe_msisdn: str
    reference: str
    # what must be sealed in the stored history, and found again once decoded
    needles: tuple[bytes, ...]
    events: list[HistoryEvent]


@pytest.fixture(scope="module")
async def histories(encrypted: EncryptedStack, simulator: Simulator) -> Histories:
    """One subscriber charged, queried and cancelled (an update); one probe run carrying an
    MSISDN through a memo, a signal, an update, two activities (one failing) and its result."""
    subscriber = "+336199" + str(uuid.uuid4().int)[:5]
    started = await encrypted.client.start_subscription(StartSubscriptionRequest(
        msisdn=subscriber, product_id="game-pass", amount_minor=499, currency="EUR",
        period="monthly"))
    handle = encrypted.client.handle(started.subscription_id)
    for _ in range(100):
        if (await handle.query(SubscriptionWorkflow.state)).charges_succeeded == 1:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the first charge never succeeded")
    await encrypted.client.cancel_subscription(started.subscription_id)
    assert (await handle.result()).status == "cancelled"
    (transaction, *_) = await simulator.transactions(CARRIER, subscriber)
    reference = transaction["serverReferenceCode"]

    probe_msisdn = "+336128" + str(uuid.uuid4().int)[:5]
    probe = await encrypted.env.client.start_workflow(
        ProbeWorkflow.run, Probe(probe_msisdn, "7.31"), id=f"codec-probe-{uuid.uuid4()}",
        task_queue=encrypted.task_queue + PROBE_QUEUE_SUFFIX, memo={"msisdn": probe_msisdn})
    await probe.signal(ProbeWorkflow.note, f"signal-for-{probe_msisdn}")
    assert await probe.execute_update(ProbeWorkflow.amend, f"update-for-{probe_msisdn}") == (
        f"amended update-for-{probe_msisdn}")
    assert await probe.query(ProbeWorkflow.seen) == [f"signal-for-{probe_msisdn}",
                                                     f"update-for-{probe_msisdn}"]
    result = await probe.result()
    assert result.startswith(f"REF-{probe_msisdn[1:]}-7.31 signal-for-{probe_msisdn}")
    assert f"carrier refused {probe_msisdn}" in result

    events = [*(await handle.fetch_history()).events, *(await probe.fetch_history()).events]
    needles = (reference.encode(), b'"amount_minor":499', probe_msisdn.encode(),
               f"REF-{probe_msisdn[1:]}-7.31".encode(), f"signal-for-{probe_msisdn}".encode(),
               f"update-for-{probe_msisdn}".encode(), f"carrier refused {probe_msisdn}".encode())
    return Histories(handle.id, probe.id, subscriber, probe_msisdn, reference, needles, events)


def test_stored_history_holds_no_plain_msisdn_reference_or_amount(histories: Histories) -> None:
    raw = b"".join(event.SerializeToString() for event in histories.events)
    assert histories.events[0].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED
    for needle in (*histories.needles, histories.subscriber_msisdn.encode(),
                   histories.probe_msisdn[1:].encode(), b"7.31"):
        assert needle not in raw, needle

    found = [(path, p) for event in histories.events for path, p in payloads_in(event)]
    # search attributes stay indexable, so they are the only plain payloads (carrier, country…),
    # with the SDK's own markers: a local activity's record (type, id, attempt, times: the
    # needles above are not in it) and a patch's name; the local activity's result is sealed
    plain = {path for path, p in found if p.metadata["encoding"] != ENCODING}
    sdk_records = (".marker_recorded_event_attributes.details[data]",
                   ".marker_recorded_event_attributes.details[patch-data]")
    assert plain and all(".search_attributes.indexed_fields" in path
                         or path.startswith(sdk_records) for path in plain), plain
    sealed_kinds = {path.split(".")[1] for path, p in found if p.metadata["encoding"] == ENCODING}
    assert {"workflow_execution_started_event_attributes", "activity_task_scheduled_event_attributes",
            "activity_task_completed_event_attributes", "activity_task_failed_event_attributes",
            "workflow_execution_signaled_event_attributes",
            "workflow_execution_update_accepted_event_attributes",
            "workflow_execution_update_completed_event_attributes",
            "workflow_execution_completed_event_attributes"} <= sealed_kinds


async def test_decoding_the_stored_payloads_gives_the_plain_values_back(
        histories: Histories, encrypted: EncryptedStack) -> None:
    sealed = [p for event in histories.events for _, p in payloads_in(event)
              if p.metadata["encoding"] == ENCODING]
    opened = b"".join(p.data for p in await encrypted.codec.decode(sealed))
    for needle in histories.needles:
        assert needle in opened, needle


async def test_a_client_without_the_key_cannot_read_results(
        histories: Histories, encrypted: EncryptedStack) -> None:
    keyless = Client(encrypted.env.client.service_client,
                     namespace=encrypted.env.client.namespace)
    with pytest.raises(KeyError, match="binary/encrypted"):
        await keyless.get_workflow_handle(histories.probe_id).result()


async def test_temporal_cli_reads_the_history_through_the_codec_server(
        histories: Histories, encrypted: EncryptedStack) -> None:
    runner, port = await start_codec_server(codec_app(encrypted.codec, TOKEN))
    try:
        address = encrypted.env.client.service_client.config.target_host

        async def show(workflow_id: str, *codec_flags: str) -> str:
            process = await asyncio.create_subprocess_exec(
                venv_binary("temporal"), "workflow", "show", "-w", workflow_id,
                "--address", address, "--output", "json", *codec_flags,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await process.communicate()
            assert process.returncode == 0, err.decode()
            return out.decode()

        codec_flags = ("--codec-endpoint", f"http://127.0.0.1:{port}",
                       "--codec-auth", f"Bearer {TOKEN}")
        shown = [await show(wid, *flags) for flags in ((), codec_flags)
                 for wid in (histories.probe_id, histories.subscription_id)]
    finally:
        await runner.cleanup()
    # the CLI prints payloads as proto JSON: their data base64, their encoding too
    plain = [p for output in shown[:2] for p in shown_payloads(output)]
    decoded = [p for output in shown[2:] for p in shown_payloads(output)]
    assert {encoding for encoding, _ in plain} == {ENCODING}
    assert ENCODING not in {encoding for encoding, _ in decoded}
    shown_plain = b"".join(data for _, data in plain)
    shown_decoded = b"".join(data for _, data in decoded)
    for needle in histories.needles:
        assert needle not in shown_plain and needle in shown_decoded, needle


def shown_payloads(output: str) -> list[tuple[bytes, bytes]]:
    """(encoding, data) of every payload in ``temporal workflow show --output json`` output,
    search attributes aside."""
    found: list[tuple[bytes, bytes]] = []

    def walk(node: object) -> None:
        if isinstance(node, dict) and "markerName" in node:
            # a local activity's marker: the SDK's own plain record (type, id, attempt, times)
            # aside, its result is a payload like any other
            walk(node.get("details", {}).get("result"))
            return
        if isinstance(node, dict):
            if "metadata" in node and "encoding" in node["metadata"]:
                found.append((base64.b64decode(node["metadata"]["encoding"]),
                              base64.b64decode(node.get("data", ""))))
                return
            for key, value in node.items():
                if key != "searchAttributes":
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(output))
    return found
