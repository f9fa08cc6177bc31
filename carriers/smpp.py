"""Premium SMS over SMPP v3.4 (TCP): a bound transceiver session per carrier (aiosmpplib). A
charge is a ``submit_sm`` from the tariff's short code with ``registered_delivery``=1; the
``deliver_sm`` receipt (``stat:DELIVRD|UNDELIV|EXPIRED|REJECTD``, the ``message_state`` and
``receipted_message_id`` TLVs) says whether the subscriber was charged.

SMPP has no idempotency key, so each submission is recorded before it is sent
(``SubmissionStore``): a key is submitted at most once, and a receipt is matched to its key by
message id, or by the ``user_message_reference`` we sent when the submit_sm_resp was lost.
Receipt texts differ by SMSC; each carrier's pattern is registry data.

A receipt is acknowledged (deliver_sm_resp) only once its result is in the submission row: a
worker that dies before that leaves it unacknowledged, and the SMSC delivers it again on the
next bind. When no receipt comes, the status look-up asks the SMSC with ``query_sm`` (which
aiosmpplib lacks: the PDUs are defined here and travel on the library's session).

A deliver_sm that is not a receipt is a subscriber's text to a short code (mobile-originated):
decoded by its data_coding and handed to the ``on_mobile_originated`` sink, and acknowledged
only once the sink took it (stored it durably); otherwise it is left for redelivery too.
Notices (``send_sms``) carry the free-to-end-user service_type so the SMSC never bills them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiosmpplib import ESME, PhoneNumber, SmppCommandStatus, SmppSessionState, SubmitSm
from aiosmpplib.broker import SimpleBroker
from aiosmpplib.hook import AbstractHook
from aiosmpplib.protocol import (
    BindTransceiverResp,
    DeliverSm,
    GenericNack,
    SmppMessage,
    SubmitSmResp,
    Trackable,
)
from aiosmpplib.state import OptionalParam, SmppCommand

from carriers.base import (
    Capability,
    CarrierAdapter,
    ChargeRequest,
    LookupResult,
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
from models.msisdn import mask_msisdn
from models.smpp_store import FINAL_STATES, OPEN_STATES, SubmissionStore
from models.tables import SmppSubmission

log = logging.getLogger(__name__)
# where aiosmpplib's own log records go, once stripped of anything but their event and safe fields
library_log = logging.getLogger("carriers.smpp.aiosmpplib")

RECEIPTED_MESSAGE_ID = 0x001E
USER_MESSAGE_REFERENCE = 0x0204
MESSAGE_STATE = 0x0427
# vendor-specific TLV in which the SMSC names a mobile-originated message (same on redelivery)
MO_MESSAGE_ID = 0x1501
# service_type of a free-to-end-user message: a notice, never billed whatever its source
FREE_SERVICE_TYPE = "FREE"
# SMPP 3.4 message_state values (0 is SMPP 5's SCHEDULED)
_STATE_NAMES = {0: "SCHEDLD", 1: "ENROUTE", 2: "DELIVRD", 3: "EXPIRED", 4: "DELETED",
                5: "UNDELIV", 6: "ACCEPTD", 7: "UNKNOWN", 8: "REJECTD"}
_NOT_YET_FINAL = {0, 1, 6}
_RETRY_LATER = {SmppCommandStatus.ESME_RTHROTTLED, SmppCommandStatus.ESME_RMSGQFUL}
_BAD_LOGIN = {SmppCommandStatus.ESME_RINVPASWD, SmppCommandStatus.ESME_RINVSYSID,
              SmppCommandStatus.ESME_RBINDFAIL}
# how long a receipt may wait for the database before it is left unacknowledged
_STORE_ATTEMPTS, _STORE_RETRY_SECONDS = 3, 0.2
# how long a receipt the relay could not take holds the session before it is dropped
_RELAY_RETRY_SECONDS = 1.0

ReceiptSink = Callable[[CarrierReport, InteractionRecord], Awaitable[Any]]
T = TypeVar("T")


@dataclass(frozen=True)
class MobileOriginated:
    """A subscriber's text to one of a carrier's short codes. ``message_id`` is the SMSC's id
    of it when the SMSC gives one (the same on every redelivery), else None."""

    carrier_id: str
    msisdn: str  # E.164 with '+'
    short_code: str
    text: str
    message_id: str | None


# takes a mobile-originated message for good (stores it) or raises; acknowledged only after
MobileOriginatedSink = Callable[[MobileOriginated], Awaitable[Any]]


# -- query_sm (SMPP 3.4 sections 4.8.1 and 4.8.2) ---------------------------------------------------

@dataclass
class QuerySm(Trackable, SmppMessage):
    """query_sm: the state of a message the SMSC accepted, by the id it gave it. ``source``
    is the submission's source address, empty when not known (allowed by the spec)."""

    message_id: str = ""
    source: str = ""

    @property
    def smpp_command(self) -> SmppCommand:
        return SmppCommand.QUERY_SM

    def pdu(self) -> bytes:
        # message_id, source_addr_ton, source_addr_npi (0: unknown), source_addr
        body = (self.message_id.encode("ascii") + b"\x00" + struct.pack("!BB", 0, 0)
                + self.source.encode("ascii") + b"\x00")
        return bytes(self.pack_header(16 + len(body))) + body


@dataclass
class QuerySmResp(SmppMessage):
    """query_sm_resp: final_date, message_state and the network error_code. An error answer
    (ESME_RQUERYFAIL, ESME_RINVMSGID) may come without a body."""

    message_id: str = ""
    final_date: str = ""
    message_state: int | None = None
    error_code: int = 0

    @property
    def smpp_command(self) -> SmppCommand:
        return SmppCommand.QUERY_SM_RESP

    @classmethod
    def read(cls, pdu: bytes) -> QuerySmResp:
        """Decodes the PDU; ValueError if it is not a well-formed query_sm_resp."""
        if len(pdu) < 16:
            raise ValueError("short PDU")
        length, command, status, sequence = struct.unpack_from("!IIII", pdu)
        if command != SmppCommand.QUERY_SM_RESP or length != len(pdu):
            raise ValueError("not a query_sm_resp")
        answer = cls(sequence_num=sequence, command_status=SmppCommandStatus(status))
        if length == 16:
            return answer
        message_end = pdu.index(b"\x00", 16)
        date_end = pdu.index(b"\x00", message_end + 1)
        if len(pdu) < date_end + 3:
            raise ValueError("query_sm_resp without message_state and error_code")
        answer.message_id = pdu[16:message_end].decode("ascii")
        answer.final_date = pdu[message_end + 1:date_end].decode("ascii")
        answer.message_state, answer.error_code = struct.unpack_from("!BB", pdu, date_end + 1)
        return answer


# -- what aiosmpplib logs ------------------------------------------------------------------------

# fields of the library's structured records that never carry a number or a PDU; the rest
# (message=, request=, receipt=, pdu=, header=, ...) are dropped, not redacted
_SAFE_FIELDS = ("smpp_command", "command_status", "sequence_num", "smsc_message_id", "log_id",
                "task", "exception", "reason", "delay", "hook_method")
_DIGIT_RUN = re.compile(r"\d{7,}")


def _scrub(text: str) -> str:
    """Masks anything that could be a number, with or without a '+'."""
    return _DIGIT_RUN.sub(lambda m: mask_msisdn(m.group(0)), redact(text))


class _RedactingHandler(logging.Handler):
    """The only handler of aiosmpplib's loggers (one per ESME, outside the logging tree). It
    keeps the event text and a few fields known to be safe, masks digit runs even there, drops
    tracebacks (an exception's text may quote a PDU), and passes the result to
    ``carriers.smpp.aiosmpplib`` where the application's logging takes over."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event, _, fields_text = record.getMessage().partition(" >>> ")
            try:
                fields = json.loads(fields_text) if fields_text else {}
            except ValueError:
                fields = {}
            if not isinstance(fields, dict):
                fields = {}
            if event == "Received unexpected SMPP response" and \
                    fields.get("smpp_command") == SmppCommand.QUERY_SM_RESP.name:
                return  # ours: the adapter reads query_sm_resp itself
            kept = {k: fields[k] for k in _SAFE_FIELDS if k in fields}
            text = event + (f" {json.dumps(kept, default=str)}" if kept else "")
            if record.exc_info and record.exc_info[0] is not None:
                text += f" ({record.exc_info[0].__name__})"
            library_log.log(record.levelno, "%s", _scrub(text))
        except Exception:  # logging must never break the session
            self.handleError(record)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.removeprefix("smpp://").rpartition(":")
    return host, int(port)


class ReceiptNotStored(ConnectionResetError):
    """Raised from the receive hook when a receipt could not be stored or relayed: aiosmpplib
    then drops the session without acknowledging it, and the SMSC delivers it again on the
    next bind. (A ConnectionError is what the library expects from a broken session and recovers from.)"""


class SmppAdapter(CarrierAdapter, AbstractHook):
    capabilities = frozenset({Capability.CHARGE, Capability.STATUS, Capability.SEND_SMS})
    gives_retry_after = False
    # the submission store never submits a key twice unless the SMSC refused it: a resend
    # after "not found" answers from the row instead of sending a second SMS
    deduplicates_locally = True

    def __init__(self, carrier: CarrierConfig, endpoint: str, password: str,
                 store: SubmissionStore, on_receipt: ReceiptSink, sink: InteractionSink,
                 locale: str, timeout_seconds: float | None = None,
                 on_mobile_originated: MobileOriginatedSink | None = None) -> None:
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
        self._on_mobile_originated = on_mobile_originated
        self._sink = sink
        self._locale = locale
        self._secret = password
        # answers awaited, by the log_id of the request (the idempotency key for a submit_sm)
        self._responses: dict[str, asyncio.Future[SmppMessage]] = {}
        self._bind_status: SmppCommandStatus | None = None
        # sequence number -> log_id of our requests (a generic_nack names only the sequence)
        self._sequences: dict[int, str] = {}
        self._queries = itertools.count(1)
        self._broker = SimpleBroker()
        self._esme = ESME(smsc_host=self._host, smsc_port=self._port, system_id=carrier.auth.username,
                          password=password, hook=self, broker=self._broker,
                          enquire_link_interval=30.0, socket_timeout=10.0,
                          client_id=f"cb-{carrier.id}", log_level=logging.WARNING,
                          log_handler=_RedactingHandler(), log_metadata={"carrier": carrier.id})
        self._task: asyncio.Task[None] | None = None

    def set_mobile_originated_sink(self, sink: MobileOriginatedSink | None) -> None:
        """Where subscribers' texts go (set once, before the session starts)."""
        self._on_mobile_originated = sink

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

    async def _exchange(self, request: SmppMessage) -> SmppMessage:
        """Sends a request on the bound session and waits for its answer (or a generic_nack).
        Raises when there is none in time: sent or not, we cannot tell."""
        future: asyncio.Future[SmppMessage] = asyncio.get_running_loop().create_future()
        self._responses[request.log_id] = future
        try:
            await self._broker.enqueue(request)
            return await asyncio.wait_for(future, self._timeout)
        finally:
            self._responses.pop(request.log_id, None)

    def _answered(self, key: str, answer: SmppMessage) -> None:
        future = self._responses.get(key)
        if future is not None and not future.done():
            future.set_result(answer)

    # -- aiosmpplib hook --------------------------------------------------------------------------

    async def sending(self, smpp_message: SmppMessage, pdu: bytes, client_id: str) -> None:
        if isinstance(smpp_message, SubmitSm | QuerySm):
            self._sequences[smpp_message.sequence_num] = smpp_message.log_id

    async def send_error(self, smpp_message: SmppMessage, error: Exception, client_id: str) -> None:
        if isinstance(smpp_message, SubmitSm | QuerySm):
            future = self._responses.get(smpp_message.log_id)
            if future is not None and not future.done():
                future.set_exception(error)

    async def received(self, smpp_message: SmppMessage | None, pdu: bytes, client_id: str) -> None:
        """Runs before aiosmpplib answers a request from the SMSC (a deliver_sm): raising a
        ConnectionError here leaves it unanswered and drops the session. Anything else must
        not escape: it would end the library's reconnect loop for good."""
        try:
            if smpp_message is None:
                with contextlib.suppress(ValueError):  # not ours to read
                    answer = QuerySmResp.read(pdu)
                    self._answered(self._sequences.pop(answer.sequence_num, ""), answer)
            elif isinstance(smpp_message, BindTransceiverResp):
                self._bind_status = smpp_message.command_status
            elif isinstance(smpp_message, SubmitSmResp | GenericNack):
                key = self._sequences.pop(smpp_message.sequence_num, None) or str(
                    getattr(smpp_message, "log_id", ""))
                if isinstance(smpp_message, SubmitSmResp):
                    await self._accepted(key, smpp_message)
                self._answered(key, smpp_message)
            elif isinstance(smpp_message, DeliverSm) and smpp_message.is_receipt():
                await self._receipt(smpp_message)
            elif isinstance(smpp_message, DeliverSm):
                await self._mobile_originated(smpp_message)
        except ConnectionError:
            raise
        except Exception as exc:
            log.error("SMPP hook on %s failed: %s", self.carrier_id, type(exc).__name__)

    async def _accepted(self, key: str, answer: SubmitSmResp) -> None:
        """Keeps the message id of an accepted charge at once, whoever waits for it (if
        anyone: an answer after our timeout still lets query_sm settle the charge)."""
        if answer.extra_data != "charge" or answer.command_status != SmppCommandStatus.ESME_ROK \
                or not answer.message_id:
            return
        try:
            await self._store.submitted(self.carrier_id, key, answer.message_id)
        except Exception as exc:  # the charge path writes it too; a receipt settles it anyway
            log.error("message id for %s not stored: %s", key, type(exc).__name__)

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

    def _poor(self, error_code: str | None) -> bool:
        """Whether an error code is one of the carrier's insufficient-funds codes ("088" in a
        receipt is 88 in a query_sm_resp)."""
        if not error_code:
            return False
        return any(error_code == code or (error_code.isdigit() and code.isdigit()
                                          and int(error_code) == int(code))
                   for code in self._config.insufficient_funds_errors)

    def _outcome(self, row: SmppSubmission) -> OperationResult:
        if row.state == "delivered":
            return OperationResult(outcome=Outcome.SUCCEEDED, carrier_reference=row.message_id)
        if row.state == "failed":
            return OperationResult(
                outcome=Outcome.INSUFFICIENT_FUNDS if self._poor(row.error_code) else Outcome.REJECTED,
                carrier_code=f"{row.receipt_status}:{row.error_code}", carrier_reference=row.message_id)
        if row.state == "submitted":
            return OperationResult(outcome=Outcome.PENDING, carrier_reference=row.message_id)
        # sent, but the SMSC's answer was lost: only a receipt can settle it, never a resend
        return OperationResult(outcome=Outcome.UNKNOWN, message="submitted; awaiting receipt")

    async def _durably(self, write: Callable[[], Awaitable[T]], what: str) -> T:
        """A store call for a receipt, retried briefly; if the database stays out of reach the
        receipt is left unacknowledged (the session drops) so the SMSC delivers it again."""
        for attempt in range(_STORE_ATTEMPTS):
            try:
                return await write()
            except Exception as exc:
                log.warning("%s on %s not stored (attempt %d): %s", what, self.carrier_id,
                            attempt + 1, type(exc).__name__)
                await asyncio.sleep(_STORE_RETRY_SECONDS)
        raise ReceiptNotStored(f"{what} not stored: left unacknowledged for redelivery")

    async def _receipt(self, deliver: DeliverSm) -> None:
        started = time.perf_counter()
        message_id, state, error, reference = self._read_receipt(deliver)
        msisdn = "+" + deliver.source.number.lstrip("+")
        row = await self._durably(lambda: self._store.match_receipt(
            self.carrier_id, message_id, reference, msisdn), "receipt")
        summary = (f"deliver_sm receipt id={message_id} stat={state} err={error} "
                   f"user_ref={reference} from={msisdn}")
        if row is None or row.id is None:
            log.warning("unmatched receipt on %s: %s", self.carrier_id, _scrub(summary))
            with contextlib.suppress(Exception):
                await self._sink(self._record("receipt", "", summary, "", "unmatched", started))
            return
        if row.state in OPEN_STATES:  # a repeated receipt changes nothing
            row_id = row.id
            delivered = state in self._config.delivered_states
            row = await self._durably(lambda: self._store.settled(
                row_id, delivered, message_id, state, error), "receipt")
        # stored: a status look-up finds it from here on. The relay must take it too before it
        # is acknowledged (a relay that raises could not hand it on: Temporal out of reach)
        result = self._outcome(row)
        report = CarrierReport(idempotency_key=row.idempotency_key, outcome=result.outcome.value,
                               carrier_reference=result.carrier_reference,
                               carrier_code=result.carrier_code, carrier_id=self.carrier_id)
        try:
            await self._on_receipt(report, self._record("receipt", row.idempotency_key, summary,
                                                        "", result.outcome.value, started))
        except Exception as exc:
            log.error("receipt for %s not relayed: %s; left unacknowledged for redelivery",
                      row.idempotency_key, type(exc).__name__)
            await asyncio.sleep(_RELAY_RETRY_SECONDS)  # the redelivery comes no faster
            raise ReceiptNotStored("receipt not relayed") from None

    # -- mobile-originated ----------------------------------------------------------------------

    async def _mobile_originated(self, deliver: DeliverSm) -> None:
        """Hands a subscriber's text to the sink; raising leaves it unacknowledged."""
        started = time.perf_counter()
        tlvs = {p.tag: p.value for p in deliver.optional_params or []}
        message_id = str(tlvs.get(MO_MESSAGE_ID) or "") or None
        # aiosmpplib decoded it by data_coding (0: GSM 03.38, 8: UCS-2); long texts reassembled
        mo = MobileOriginated(carrier_id=self.carrier_id,
                              msisdn="+" + deliver.source.number.lstrip("+"),
                              short_code=deliver.destination.number,
                              text=deliver.short_message or deliver.message_payload or "",
                              message_id=message_id)
        # the text may carry a PIN: only its length is recorded
        summary = (f"deliver_sm mo id={message_id} to={mo.short_code} from={mo.msisdn} "
                   f"coding={deliver.encoding or 'default'} chars={len(mo.text)}")
        sink = self._on_mobile_originated
        if sink is None:
            # acknowledged anyway: holding it would hold the receipts behind it on this session
            log.error("mobile-originated message on %s dropped: no handler configured",
                      self.carrier_id)
            with contextlib.suppress(Exception):
                await self._sink(self._record("mo", "", summary, "", "dropped", started))
            return
        await self._durably(lambda: sink(mo), "mobile-originated message")
        with contextlib.suppress(Exception):
            await self._sink(self._record("mo", message_id or "", summary, "", "accepted",
                                          started))

    def _record(self, operation: str, key: str, request: str, response: str, outcome: str,
                started: float, error: str | None = None) -> InteractionRecord:
        method = {"receipt": "deliver_sm", "mo": "deliver_sm",
                  "status": "query_sm"}.get(operation, "submit_sm")
        return InteractionRecord(
            carrier_id=self.carrier_id, operation=operation, idempotency_key=key,
            method=method, url=f"smpp://{self._host}:{self._port}",
            request_body=redact(request, [self._secret]), status_code=None,
            response_body=redact(response), outcome=outcome, error=error,
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
            # a login refused is the operator's to fix, never the subscriber's: transient too,
            # with the SMSC's code saying why (nothing was sent either way)
            result = OperationResult(
                outcome=Outcome.TRANSIENT, carrier_code=unbound.name,
                message="SMSC refused our bind (credentials)"
                if self._bind_status in _BAD_LOGIN else "no bound session with the SMSC")
            await self._sink(self._record(operation, key, summary, "", result.outcome.value,
                                          started))
            return result, None, True
        params = [OptionalParam(USER_MESSAGE_REFERENCE, reference)] if reference is not None else []
        submit = SubmitSm(short_message=text, source=PhoneNumber(source),
                          destination=PhoneNumber(msisdn.lstrip("+")),
                          # a charge is the premium message itself; anything else is free
                          service_type="" if registered else FREE_SERVICE_TYPE,
                          registered_delivery=1 if registered else 0,
                          encoding="gsm0338" if encoding.encoding == "GSM-7" else "ucs2",
                          optional_params=params, log_id=key, extra_data=operation)
        try:
            answer = await self._exchange(submit)
        except Exception as exc:  # sent or not, we cannot tell: never resend blindly
            await self._sink(self._record(operation, key, summary, "", "unknown", started,
                                          f"{type(exc).__name__}: no submit_sm_resp"))
            return OperationResult(outcome=Outcome.UNKNOWN,
                                   message="no submit_sm_resp: submitted or not, unknown"), None, False
        status = answer.command_status
        message_id = answer.message_id if isinstance(answer, SubmitSmResp) else None
        if not isinstance(answer, SubmitSmResp):  # the SMSC could not read our submit_sm
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
        # refused (may be sent again) only when the SMSC said so outright; a generic_nack is
        # unknown, so its submission stays open and is never sent again
        return result, message_id, result.outcome in (Outcome.TRANSIENT, Outcome.REJECTED)

    async def charge(self, request: ChargeRequest) -> OperationResult:
        tariff = next((code for code, p in self._tariffs.items()
                       if p.amount == to_decimal(request.amount_minor, request.currency)), None)
        if tariff is None:
            return OperationResult(outcome=Outcome.REJECTED, message="no short code for this price")
        row, may_send = await self._store.reserve(self.carrier_id, request.idempotency_key,
                                                  request.msisdn)
        row_id = row.id
        assert row_id is not None
        if not may_send:  # submitted before: its receipt or query_sm, not a second SMS, settles it
            return self._outcome(row)
        text = charge_notice(self._locale, request.description, request.amount_minor,
                             request.currency, tariff)
        result, message_id, refused = await self._submit(
            "charge", request.idempotency_key, request.msisdn, tariff, text, row.user_reference,
            registered=True)
        if result.outcome is Outcome.PENDING and message_id:
            # (already stored by the hook; a receipt may have overtaken it: the row decides)
            stored = await self._store.submitted(self.carrier_id, request.idempotency_key,
                                                 message_id)
            return self._outcome(stored) if stored is not None else result
        if refused:
            await self._store.refused(row_id)
        return result

    async def status(self, request: StatusRequest) -> LookupResult:
        """From the submission row when it holds a final result; otherwise the SMSC's own
        answer to query_sm. A submission that may have reached the SMSC but has no message id
        (its submit_sm_resp was lost) is unknown: FAILED, never NOT_FOUND."""
        try:
            row = await self._store.get(self.carrier_id, request.idempotency_key)
        except Exception as exc:
            return LookupResult.failed(f"submission store unreadable: {type(exc).__name__}")
        if row is None:
            return LookupResult.not_found("never submitted")
        if row.state == "refused":
            return LookupResult.not_found("refused by the SMSC: not taken")
        if row.state in FINAL_STATES:
            return LookupResult.of(self._outcome(row))
        if not row.message_id:
            return LookupResult.failed("submit_sm sent without a submit_sm_resp and no receipt "
                                       "yet: unknown whether the SMSC took it")
        return await self._query(row, request.idempotency_key)

    async def _query(self, row: SmppSubmission, key: str) -> LookupResult:
        started = time.perf_counter()
        assert row.id is not None and row.message_id is not None
        summary = f"query_sm message_id={row.message_id}"
        unbound = await self._ready()
        if unbound is not None:
            await self._sink(self._record("status", key, summary, "", "failed", started))
            return LookupResult.failed("no bound session with the SMSC", unbound.name)
        query = QuerySm(message_id=row.message_id, log_id=f"query-{next(self._queries)}")
        try:
            answer = await self._exchange(query)
        except Exception as exc:
            await self._sink(self._record("status", key, summary, "", "failed", started,
                                          f"{type(exc).__name__}: no query_sm_resp"))
            return LookupResult.failed("no query_sm_resp")
        result = await self._queried(row, answer)
        response = (f"query_sm_resp {answer.command_status.name}" if not isinstance(
            answer, QuerySmResp) else f"query_sm_resp {answer.command_status.name} "
            f"state={answer.message_state} error={answer.error_code} final={answer.final_date}")
        await self._sink(self._record("status", key, summary, response,
                                      result.found.outcome.value if result.found
                                      else result.lookup.value, started))
        return result

    async def _queried(self, row: SmppSubmission, answer: SmppMessage) -> LookupResult:
        """What a query_sm answer says about the submission; a final state is stored."""
        assert row.id is not None
        status = answer.command_status
        if not isinstance(answer, QuerySmResp):  # generic_nack: the SMSC could not read it
            return LookupResult.failed("query_sm answered with generic_nack", status.name)
        if status == SmppCommandStatus.ESME_RINVMSGID:
            return LookupResult.not_found("the SMSC knows no message with this id")
        if status != SmppCommandStatus.ESME_ROK or answer.message_state is None:
            return LookupResult.failed("query_sm refused", status.name)
        state = answer.message_state
        if state in _NOT_YET_FINAL:
            return LookupResult.of(OperationResult(outcome=Outcome.PENDING,
                                                   carrier_reference=row.message_id))
        if state == 7 or state not in _STATE_NAMES:  # UNKNOWN: the SMSC cannot say either
            return LookupResult.failed(f"message_state {state}: unknown")
        name = _STATE_NAMES[state]
        try:
            row = await self._store.settled(row.id, state == 2, row.message_id, name,
                                            f"{answer.error_code:03d}")
        except Exception as exc:
            return LookupResult.failed(f"query_sm answer not stored: {type(exc).__name__}")
        return LookupResult.of(self._outcome(row))

    async def send_sms(self, key: str, msisdn: str, text: str, source: str) -> OperationResult:
        """A free-to-end-user notice (no receipt asked, never billed)."""
        result, _, _ = await self._submit("send_sms", key, msisdn, source, text, None,
                                          registered=False)
        return OperationResult(outcome=Outcome.SUCCEEDED) if result.outcome is Outcome.PENDING \
            else result
