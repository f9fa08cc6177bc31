"""Premium SMS over SMPP v3.4 (TCP): a bound transceiver session per carrier (aiosmpplib). A
charge is a ``submit_sm`` from the tariff's short code with ``registered_delivery``=1; the
``deliver_sm`` receipt (``stat:DELIVRD|UNDELIV|EXPIRED|REJECTD``, the ``message_state`` and
``receipted_message_id`` TLVs) says whether the subscriber was charged.

SMPP has no idempotency key, so each submission is recorded before it is sent
(``SubmissionStore``): a key is submitted at most once, and a receipt is matched to its key by
message id, or by the ``user_message_reference`` we sent when the submit_sm_resp was lost.
Receipt texts differ by SMSC; each carrier's pattern is registry data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiosmpplib import ESME, PhoneNumber, SmppCommandStatus, SmppSessionState, SubmitSm
from aiosmpplib.broker import SimpleBroker
from aiosmpplib.hook import AbstractHook
from aiosmpplib.protocol import BindTransceiverResp, DeliverSm, GenericNack, SmppMessage, SubmitSmResp
from aiosmpplib.state import OptionalParam

from carriers.base import (
    Capability,
    CarrierAdapter,
    ChargeRequest,
    OperationResult,
    Outcome,
    StatusRequest,
)
from carriers.http import InteractionRecord, InteractionSink
from carriers.loader import CarrierConfig
from carriers.redaction import redact
from carriers.reports import CarrierReport
from carriers.sms_text import charge_notice, sms_encoding
from models.money import to_decimal
from models.smpp_store import SubmissionStore
from models.tables import SmppSubmission

log = logging.getLogger(__name__)

RECEIPTED_MESSAGE_ID = 0x001E
USER_MESSAGE_REFERENCE = 0x0204
MESSAGE_STATE = 0x0427
# SMPP 3.4 message_state values
_STATE_NAMES = {2: "DELIVRD", 3: "EXPIRED", 4: "DELETED", 5: "UNDELIV", 6: "ACCEPTD",
                7: "UNKNOWN", 8: "REJECTD"}
_RETRY_LATER = {SmppCommandStatus.ESME_RTHROTTLED, SmppCommandStatus.ESME_RMSGQFUL}
_BAD_LOGIN = {SmppCommandStatus.ESME_RINVPASWD, SmppCommandStatus.ESME_RINVSYSID,
              SmppCommandStatus.ESME_RBINDFAIL}

ReceiptSink = Callable[[CarrierReport, InteractionRecord], Awaitable[Any]]


class _RedactingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """aiosmpplib logs whole PDUs (numbers included) when a send fails: mask them first."""

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = redact(record.getMessage()), ()
        super().emit(record)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.removeprefix("smpp://").rpartition(":")
    return host, int(port)


class SmppAdapter(CarrierAdapter, AbstractHook):
    capabilities = frozenset({Capability.CHARGE, Capability.STATUS, Capability.SEND_SMS})
    gives_retry_after = False
    # no query_sm in aiosmpplib: a receipt that never comes is left to reconciliation
    status_asks_carrier = False

    def __init__(self, carrier: CarrierConfig, endpoint: str, password: str,
                 store: SubmissionStore, on_receipt: ReceiptSink, sink: InteractionSink,
                 locale: str, timeout_seconds: float | None = None) -> None:
        assert carrier.smpp is not None
        self.carrier_id = carrier.id
        self._config = carrier.smpp
        self._timeout = min(timeout_seconds or carrier.smpp.submit_timeout_seconds,
                            carrier.smpp.submit_timeout_seconds)
        self._pattern = re.compile(carrier.smpp.receipt_pattern)
        self._host, self._port = parse_endpoint(endpoint)
        self._tariffs = {p.short_code: p for p in carrier.price_points}
        self._store = store
        self._on_receipt = on_receipt
        self._sink = sink
        self._locale = locale
        self._secret = password
        self._responses: dict[str, asyncio.Future[SubmitSmResp | GenericNack]] = {}
        self._bind_status: SmppCommandStatus | None = None
        self._sequences: dict[int, str] = {}
        self._broker = SimpleBroker()
        self._esme = ESME(smsc_host=self._host, smsc_port=self._port, system_id=carrier.auth.username,
                          password=password, hook=self, broker=self._broker,
                          enquire_link_interval=30.0, socket_timeout=10.0,
                          client_id=f"cb-{carrier.id}", log_level=logging.WARNING,
                          log_handler=_RedactingHandler())
        self._task: asyncio.Task[None] | None = None

    # -- session --------------------------------------------------------------------------------

    def start(self) -> None:
        """Binds in the background (and rebinds after any drop); receipts flow from then on."""
        if self._task is None:
            self._task = asyncio.create_task(self._esme.start(), name=f"smpp-{self.carrier_id}")

    async def _ready(self) -> SmppCommandStatus | None:
        """None once bound; otherwise why not: the SMSC refused our login, or (ESME_RBINDFAIL)
        no bind came about in time. Nothing is queued for a session that is not bound, so no
        submission can sit in memory and be lost."""
        self.start()
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            if self._bind_status in _BAD_LOGIN:
                return self._bind_status
            if self._esme.session_state == SmppSessionState.BOUND_TRX:
                return None
            await asyncio.sleep(0.02)
        return SmppCommandStatus.ESME_RBINDFAIL

    async def aclose(self) -> None:
        if self._task is not None:
            # stop() unbinds at once, then sits out the reconnect timer: no need to wait for it
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._esme.stop(), 0.2)
            self._task.cancel()
            # the library's clean-up after a cancel can linger; it is not ours to wait for
            await asyncio.wait({self._task}, timeout=0.1)
            self._task = None

    # -- aiosmpplib hook --------------------------------------------------------------------------

    async def sending(self, smpp_message: SmppMessage, pdu: bytes, client_id: str) -> None:
        if isinstance(smpp_message, SubmitSm):  # a generic_nack names only the sequence
            self._sequences[smpp_message.sequence_num] = smpp_message.log_id

    async def send_error(self, smpp_message: SmppMessage, error: Exception, client_id: str) -> None:
        if isinstance(smpp_message, SubmitSm):
            future = self._responses.get(smpp_message.log_id)
            if future is not None and not future.done():
                future.set_exception(error)

    async def received(self, smpp_message: SmppMessage | None, pdu: bytes, client_id: str) -> None:
        if isinstance(smpp_message, BindTransceiverResp):
            self._bind_status = smpp_message.command_status
        elif isinstance(smpp_message, SubmitSmResp | GenericNack):
            key = self._sequences.pop(smpp_message.sequence_num, None) or str(
                getattr(smpp_message, "log_id", ""))
            future = self._responses.get(key)
            if future is not None and not future.done():
                future.set_result(smpp_message)
        elif isinstance(smpp_message, DeliverSm) and smpp_message.is_receipt():
            await self._receipt(smpp_message)

    # -- receipts ---------------------------------------------------------------------------------

    def _read_receipt(self, deliver: DeliverSm) -> tuple[str | None, str, str, int | None]:
        """(message id, final state, error code, user reference) from the text and the TLVs."""
        tlvs = {p.tag: p.value for p in deliver.optional_params or []}
        found = self._pattern.search(deliver.short_message or "")
        groups = found.groupdict() if found else {}
        message_id = str(tlvs.get(RECEIPTED_MESSAGE_ID) or groups.get("id") or "") or None
        state = groups.get("stat") or _STATE_NAMES.get(int(tlvs.get(MESSAGE_STATE, 7)), "UNKNOWN")
        reference = tlvs.get(USER_MESSAGE_REFERENCE)
        return message_id, state, groups.get("err") or "", int(reference) if reference else None

    def _outcome(self, row: SmppSubmission) -> OperationResult:
        if row.state == "delivered":
            return OperationResult(outcome=Outcome.SUCCEEDED, carrier_reference=row.message_id)
        if row.state == "failed":
            poor = row.error_code in self._config.insufficient_funds_errors
            return OperationResult(
                outcome=Outcome.INSUFFICIENT_FUNDS if poor else Outcome.REJECTED,
                carrier_code=f"{row.receipt_status}:{row.error_code}", carrier_reference=row.message_id)
        if row.state == "submitted":
            return OperationResult(outcome=Outcome.PENDING, carrier_reference=row.message_id)
        # sent, but the SMSC's answer was lost: only a receipt can settle it, never a resend
        return OperationResult(outcome=Outcome.UNKNOWN, message="submitted; awaiting receipt")

    async def _receipt(self, deliver: DeliverSm) -> None:
        started = time.perf_counter()
        message_id, state, error, reference = self._read_receipt(deliver)
        msisdn = "+" + deliver.source.number.lstrip("+")
        row = await self._store.match_receipt(self.carrier_id, message_id, reference, msisdn)
        summary = (f"deliver_sm receipt id={message_id} stat={state} err={error} "
                   f"user_ref={reference} from={msisdn}")
        if row is None or row.id is None:
            log.warning("unmatched receipt on %s: %s", self.carrier_id, redact(summary))
            await self._sink(self._record("receipt", "", summary, "", "unmatched", started))
            return
        if row.state not in ("delivered", "failed"):  # a repeated receipt changes nothing
            delivered = state in self._config.delivered_states
            row = await self._store.update(row.id, state="delivered" if delivered else "failed",
                                           message_id=row.message_id or message_id,
                                           receipt_status=state, error_code=error)
        result = self._outcome(row)
        report = CarrierReport(idempotency_key=row.idempotency_key, outcome=result.outcome.value,
                               carrier_reference=result.carrier_reference,
                               carrier_code=result.carrier_code)
        try:
            await self._on_receipt(report, self._record("receipt", row.idempotency_key, summary,
                                                        "", result.outcome.value, started))
        except Exception:  # the row holds the result: the workflow's status look-up finds it
            log.exception("receipt for %s not relayed", row.idempotency_key)

    def _record(self, operation: str, key: str, request: str, response: str, outcome: str,
                started: float, error: str | None = None) -> InteractionRecord:
        return InteractionRecord(
            carrier_id=self.carrier_id, operation=operation, idempotency_key=key,
            method="submit_sm" if operation != "receipt" else "deliver_sm",
            url=f"smpp://{self._host}:{self._port}", request_body=redact(request, [self._secret]),
            status_code=None, response_body=redact(response), outcome=outcome, error=error,
            latency_ms=int((time.perf_counter() - started) * 1000))

    # -- operations -------------------------------------------------------------------------------

    async def _submit(self, operation: str, key: str, msisdn: str, source: str, text: str,
                      reference: int | None, registered: bool
                      ) -> tuple[OperationResult, str | None, bool]:
        """Sends one submit_sm: the result, the message id the SMSC gave it, and whether the
        SMSC answered that it did not take the message (so sending it again is safe)."""
        started = time.perf_counter()
        encoding = sms_encoding(text)
        summary = (f"submit_sm src={source} dst={msisdn} registered_delivery={int(registered)} "
                   f"coding={encoding.encoding} segments={encoding.segments} user_ref={reference}")
        if registered and encoding.segments > 1:
            # each segment from a premium short code is billed: a charge is one segment
            result = OperationResult(outcome=Outcome.REJECTED, carrier_code="SEGMENTS",
                                     message=f"charge notice needs {encoding.segments} segments")
            await self._sink(self._record(operation, key, summary, "", "rejected", started))
            return result, None, True
        unbound = await self._ready()
        if unbound is not None:
            result = OperationResult(
                outcome=Outcome.REJECTED if unbound in _BAD_LOGIN else Outcome.TRANSIENT,
                carrier_code=unbound.name, message="no bound session with the SMSC")
            await self._sink(self._record(operation, key, summary, "", result.outcome.value,
                                          started))
            return result, None, True
        params = [OptionalParam(USER_MESSAGE_REFERENCE, reference)] if reference is not None else []
        submit = SubmitSm(short_message=text, source=PhoneNumber(source),
                          destination=PhoneNumber(msisdn.lstrip("+")),
                          registered_delivery=1 if registered else 0,
                          encoding="gsm0338" if encoding.encoding == "GSM-7" else "ucs2",
                          optional_params=params, log_id=key)
        future: asyncio.Future[SubmitSmResp | GenericNack] = asyncio.get_running_loop().create_future()
        self._responses[key] = future
        try:
            await self._broker.enqueue(submit)
            answer = await asyncio.wait_for(future, self._timeout)
        except Exception as exc:  # sent or not, we cannot tell: never resend blindly
            await self._sink(self._record(operation, key, summary, "", "unknown", started,
                                          f"{type(exc).__name__}: no submit_sm_resp"))
            return OperationResult(outcome=Outcome.UNKNOWN,
                                   message="no submit_sm_resp: submitted or not, unknown"), None, False
        finally:
            self._responses.pop(key, None)
        status = answer.command_status
        message_id = answer.message_id if isinstance(answer, SubmitSmResp) else None
        if isinstance(answer, GenericNack):  # the SMSC could not read our submit_sm
            result = OperationResult(outcome=Outcome.UNKNOWN, carrier_code=status.name,
                                     message="malformed exchange: generic_nack")
        elif status == SmppCommandStatus.ESME_ROK:
            result = OperationResult(outcome=Outcome.PENDING, carrier_reference=message_id)
        elif status in _RETRY_LATER:
            result = OperationResult(outcome=Outcome.TRANSIENT, carrier_code=status.name)
        else:
            result = OperationResult(outcome=Outcome.REJECTED, carrier_code=status.name)
        await self._sink(self._record(operation, key, summary,
                                      f"submit_sm_resp {status.name} message_id={message_id}",
                                      result.outcome.value, started))
        return result, message_id, result.outcome is not Outcome.PENDING

    async def charge(self, request: ChargeRequest) -> OperationResult:
        tariff = next((code for code, p in self._tariffs.items()
                       if p.amount == to_decimal(request.amount_minor, request.currency)), None)
        if tariff is None:
            return OperationResult(outcome=Outcome.REJECTED, message="no short code for this price")
        row, may_send = await self._store.reserve(self.carrier_id, request.idempotency_key,
                                                  request.msisdn)
        row_id = row.id
        assert row_id is not None
        if not may_send:  # submitted before: its receipt, not a second SMS, settles it
            return self._outcome(row)
        text = charge_notice(self._locale, request.description, request.amount_minor,
                             request.currency, tariff)
        result, message_id, refused = await self._submit(
            "charge", request.idempotency_key, request.msisdn, tariff, text, row.user_reference,
            registered=True)
        if result.outcome is Outcome.PENDING:
            row = await self._store.update(row_id, state="submitted", message_id=message_id)
            return self._outcome(row)
        if refused:
            await self._store.update(row_id, state="refused")
        return result

    async def status(self, request: StatusRequest) -> OperationResult | None:
        row = await self._store.get(self.carrier_id, request.idempotency_key)
        if row is None or row.state == "refused":
            return None
        return self._outcome(row)

    async def send_sms(self, key: str, msisdn: str, text: str, source: str) -> OperationResult:
        """A free notice (no receipt asked)."""
        result, _, _ = await self._submit("send_sms", key, msisdn, source, text, None,
                                          registered=False)
        return OperationResult(outcome=Outcome.SUCCEEDED) if result.outcome is Outcome.PENDING \
            else result
