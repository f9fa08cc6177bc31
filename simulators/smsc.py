"""A premium-SMS SMSC speaking SMPP v3.4 over TCP (asyncio): binds carriers' ESMEs by
system_id, debits the short code's tariff on submit_sm, sends the deliver_sm receipt later
in that carrier's own receipt wording, on whatever session is bound at the time, and answers
``query_sm`` about any message it took.

Like a real SMSC it keeps a receipt until the ESME acknowledges it with deliver_sm_resp: one
sent on a session that drops before the answer (or answered with an error) is delivered again,
on the next session the carrier binds.

Mobile-originated messages (a subscriber texting a short code) arrive by ``POST /_control/mo``
and go to the carrier's ESME as a plain ``deliver_sm`` (esm_class 0), kept and redelivered like
receipts. A ``submit_sm`` whose service_type is ``FREE`` is a free-to-end-user notice: never
debited, whatever its source address. ``GET /_control/sms`` lists the MO messages and the
notices: what the subscriber's phone sent and received outside charges.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets as pysecrets
import struct
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from aiohttp import web
from aiosmpplib import PhoneNumber, SmppCommandStatus
from aiosmpplib.protocol import (
    MESSAGE_TYPE_MAP,
    BindTransceiver,
    BindTransceiverResp,
    DeliverSm,
    EnquireLinkResp,
    GenericNack,
    SmppMessage,
    SubmitSm,
    SubmitSmResp,
    UnbindResp,
)
from aiosmpplib.state import OptionalParam, SmppCommand

from carriers.sms_text import sms_encoding
from simulators.books import InsufficientFunds
from simulators.core import SimCarrier, SimulatorCore

PROTOCOL = "smpp"
RECEIPT_DELAY_SECONDS = 0.2
# a deliver_sm answered with an error status is offered again after this long
REDELIVERY_DELAY_SECONDS = 1.0
RECEIPTED_MESSAGE_ID, USER_MESSAGE_REFERENCE, MESSAGE_STATE = 0x001E, 0x0204, 0x0427
STATE_CODES = {"DELIVRD": 2, "EXPIRED": 3, "UNDELIV": 5, "REJECTD": 8}
ENROUTE = 1
INSUFFICIENT_FUNDS_ERROR = "088"
# free-to-end-user: the service_type that marks a submit_sm as a notice nobody pays for
FREE_SERVICE_TYPE = "FREE"
# vendor-specific TLV carrying this SMSC's id of a mobile-originated message (as many SMSCs do),
# the same on every redelivery of it
MO_MESSAGE_ID = 0x1501


@dataclass
class Session:
    carrier: SimCarrier
    writer: asyncio.StreamWriter
    sequence: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # receipts sent on this session and not yet acknowledged, by sequence number
    unacked: dict[int, DeliverSm] = field(default_factory=dict)

    async def send(self, message: SmppMessage) -> None:
        self.writer.write(message.pdu())
        await self.writer.drain()


@dataclass
class Message:
    """The SMSC's own record of a message it took, for query_sm."""

    carrier_id: str
    source: str
    stat: str
    err: str
    final_at: float  # time.monotonic() when it reaches its final state
    final_date: str  # SMPP absolute time of that


def receipt_text(carrier: SimCarrier, message_id: str, stat: str, err: str, text: str) -> str:
    """The SMSC's own wording: the SMPP appendix B format, or a key=value style some use."""
    if "receipt-format-kv" in carrier.options:
        return f"msgid={message_id};state={stat};errcode={err}"
    stamp = datetime.now(UTC).strftime("%y%m%d%H%M")
    delivered = "001" if stat == "DELIVRD" else "000"
    return (f"id:{message_id} sub:001 dlvrd:{delivered} submit date:{stamp} done date:{stamp} "
            f"stat:{stat} err:{err} text:{text[:20].encode('ascii', 'replace').decode()}")


def _c_string(pdu: bytes, start: int) -> tuple[str, int]:
    end = pdu.index(b"\x00", start)
    return pdu[start:end].decode("ascii"), end + 1


def parse_query_sm(pdu: bytes) -> tuple[str, str]:
    """(message_id, source_addr) of a query_sm PDU (SMPP 3.4 section 4.8.1)."""
    message_id, index = _c_string(pdu, 16)
    source, _ = _c_string(pdu, index + 2)  # after source_addr_ton and source_addr_npi
    return message_id, source


def query_sm_resp(sequence: int, status: SmppCommandStatus, message_id: str = "",
                  final_date: str = "", state: int = 0, error: int = 0) -> bytes:
    """A query_sm_resp PDU (SMPP 3.4 section 4.8.2); an error answer has no body."""
    body = b"" if status != SmppCommandStatus.ESME_ROK else (
        message_id.encode("ascii") + b"\x00" + final_date.encode("ascii") + b"\x00"
        + struct.pack("!BB", state, error))
    return struct.pack("!IIII", 16 + len(body), SmppCommand.QUERY_SM_RESP, status,
                       sequence) + body


class Smsc:
    def __init__(self, core: SimulatorCore, tariffs: dict[str, dict[str, Decimal]]) -> None:
        self.core = core
        # carrier id -> short code -> price
        self.tariffs = tariffs
        # bound sessions per carrier, newest last: an account may hold several binds (as real
        # SMSCs allow), and a receipt goes back on the bind that submitted its message
        self.sessions: dict[str, list[Session]] = {}
        self.origin: dict[str, Session] = {}
        self.queued: dict[str, list[DeliverSm]] = {}
        # message id -> what query_sm answers; message ids of this run start with the epoch
        self.messages: dict[str, Message] = {}
        self.epoch = pysecrets.token_hex(4)
        # what subscribers' phones sent (mo) and received outside charges (notice), in order
        self.sms_log: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._control: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    def add_routes(self, app: web.Application) -> None:
        """The SMSC's control endpoints, on an HTTP simulator app (or its own, below)."""
        app.router.add_post("/_control/mo", self.post_mo)
        app.router.add_get("/_control/sms", self.get_sms)

    async def start_control(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serves the control endpoints on their own port; returns it."""
        app = web.Application()
        self.add_routes(app)
        self._control = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._control.setup()
        await web.TCPSite(self._control, host, port).start()
        return int(self._control.addresses[0][1])

    async def stop(self) -> None:
        if self._control is not None:
            await self._control.cleanup()
            self._control = None
        if self._server is not None:
            self._server.close()
            for sessions in list(self.sessions.values()):
                for session in sessions:
                    session.writer.close()
            await self._server.wait_closed()

    def _later(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session: Session | None = None
        try:
            while True:
                head = await reader.readexactly(16)
                header = SmppMessage.parse_header(head)
                pdu = head + await reader.readexactly(header.pdu_length - 16)
                if header.smpp_command == SmppCommand.BIND_TRANSCEIVER:
                    session = await self._bind(BindTransceiver.from_pdu(pdu, header), writer)
                elif session is None:
                    writer.write(GenericNack(sequence_num=header.sequence_num,
                                             command_status=SmppCommandStatus.ESME_RINVBNDSTS).pdu())
                elif header.smpp_command == SmppCommand.SUBMIT_SM:
                    await self._submit(session, SubmitSm.from_pdu(pdu, header))
                elif header.smpp_command == SmppCommand.DELIVER_SM_RESP:
                    self._acknowledged(session, header.sequence_num, header.command_status)
                elif header.smpp_command == SmppCommand.QUERY_SM:
                    writer.write(self._query(session, pdu, header.sequence_num))
                    await writer.drain()
                elif header.smpp_command == SmppCommand.ENQUIRE_LINK:
                    await session.send(EnquireLinkResp(sequence_num=header.sequence_num))
                elif header.smpp_command == SmppCommand.UNBIND:
                    await session.send(UnbindResp(sequence_num=header.sequence_num))
                    break
                elif header.smpp_command not in MESSAGE_TYPE_MAP:
                    writer.write(GenericNack(sequence_num=header.sequence_num,
                                             command_status=SmppCommandStatus.ESME_RINVCMDID).pdu())
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            if session is not None:
                bound = self.sessions.get(session.carrier.carrier_id, [])
                if session in bound:
                    bound.remove(session)
                # never acknowledged: the ESME may not have them; offer them again
                for receipt in self._take_unacked(session):
                    await self._deliver(session.carrier.carrier_id, receipt)

    @staticmethod
    def _take_unacked(session: Session) -> list[DeliverSm]:
        receipts = [session.unacked[s] for s in sorted(session.unacked)]
        session.unacked.clear()
        return receipts

    async def _bind(self, bind: BindTransceiver, writer: asyncio.StreamWriter) -> Session | None:
        carrier = next((c for c in self.core.carriers.values() if c.protocol == PROTOCOL
                        and c.username == bind.system_id), None)
        if carrier is None or not pysecrets.compare_digest(bind.password, carrier.password):
            writer.write(BindTransceiverResp(system_id="SIMSMSC", sequence_num=bind.sequence_num,
                                             command_status=SmppCommandStatus.ESME_RINVPASWD).pdu())
            await writer.drain()
            return None
        pending: list[DeliverSm] = []
        session = Session(carrier, writer)
        self.sessions.setdefault(carrier.carrier_id, []).append(session)
        await session.send(BindTransceiverResp(system_id="SIMSMSC", sequence_num=bind.sequence_num))
        # kept while nobody was bound, or sent and never acknowledged
        pending += self.queued.pop(carrier.carrier_id, [])
        for receipt in pending:
            await self._deliver(carrier.carrier_id, receipt)
        return session

    def _acknowledged(self, session: Session, sequence: int, status: SmppCommandStatus) -> None:
        receipt = session.unacked.pop(sequence, None)
        if receipt is not None and status != SmppCommandStatus.ESME_ROK:
            # the ESME could not take it now: offer it again a little later
            self._later(self._deliver(session.carrier.carrier_id, receipt,
                                      REDELIVERY_DELAY_SECONDS, prefer=session))

    async def _deliver(self, carrier_id: str, receipt: DeliverSm, delay: float = 0.0,
                       prefer: Session | None = None) -> None:
        """Sends a receipt on the bind that submitted its message (else the carrier's newest
        bind), or keeps it until one binds."""
        if delay:
            await asyncio.sleep(delay)
        bound = [s for s in self.sessions.get(carrier_id, []) if not s.writer.is_closing()]
        session = prefer if prefer in bound else (bound[-1] if bound else None)
        if session is None:
            self.queued.setdefault(carrier_id, []).append(receipt)
            return
        sequence = next(session.sequence)
        receipt.sequence_num = sequence
        session.unacked[sequence] = receipt
        try:
            await session.send(receipt)
        except (ConnectionError, RuntimeError):
            # if the session's own clean-up has not taken it back yet, keep it here
            if session.unacked.pop(sequence, None) is not None:
                self.queued.setdefault(carrier_id, []).append(receipt)

    def _query(self, session: Session, pdu: bytes, sequence: int) -> bytes:
        """query_sm: the state of a message this carrier submitted (an SMSC whose carrier
        does not promise look-ups does not know the command)."""
        if not session.carrier.status_lookup:
            return bytes(GenericNack(sequence_num=sequence,
                                     command_status=SmppCommandStatus.ESME_RINVCMDID).pdu())
        try:
            message_id, source = parse_query_sm(pdu)
        except (ValueError, UnicodeDecodeError):
            return bytes(GenericNack(sequence_num=sequence,
                                     command_status=SmppCommandStatus.ESME_RINVCMDLEN).pdu())
        carrier_id = session.carrier.carrier_id
        if self.core.take_lookup_fault(carrier_id) is not None or self.core.unavailable(carrier_id):
            return query_sm_resp(sequence, SmppCommandStatus.ESME_RQUERYFAIL)
        message = self.messages.get(message_id)
        if message is None or message.carrier_id != carrier_id:
            if message_id.startswith(self.epoch):  # one of this run's ids, not this carrier's
                return query_sm_resp(sequence, SmppCommandStatus.ESME_RINVMSGID)
            if self._debited(carrier_id, message_id):  # from before a restart: the books know
                return query_sm_resp(sequence, SmppCommandStatus.ESME_ROK, message_id, "",
                                     STATE_CODES["DELIVRD"], 0)
            # from before a restart and not debited: whether it was ever taken is not known
            return query_sm_resp(sequence, SmppCommandStatus.ESME_RQUERYFAIL)
        if source and source != message.source:
            return query_sm_resp(sequence, SmppCommandStatus.ESME_RQUERYFAIL)
        if time.monotonic() < message.final_at:
            return query_sm_resp(sequence, SmppCommandStatus.ESME_ROK, message_id, "", ENROUTE)
        return query_sm_resp(sequence, SmppCommandStatus.ESME_ROK, message_id, message.final_date,
                             STATE_CODES[message.stat], int(message.err))

    def _debited(self, carrier_id: str, message_id: str) -> bool:
        """Whether the books hold the debit for a message (they may outlive this process)."""
        book = self.core.books.get(carrier_id)
        found = book.find(f"smpp-{message_id}") if book is not None else None
        return found is not None and found.kind == "charge"

    async def _submit(self, session: Session, submit: SubmitSm) -> None:
        carrier = session.carrier
        msisdn = "+" + submit.destination.number.lstrip("+")
        fault = self.core.take_fault(carrier.carrier_id, msisdn)
        kind = fault.kind if fault else ""
        answer = SubmitSmResp(sequence_num=submit.sequence_num)
        if kind in ("throttle", "error_503"):
            answer.command_status = (SmppCommandStatus.ESME_RTHROTTLED if kind == "throttle"
                                     else SmppCommandStatus.ESME_RMSGQFUL)
            await session.send(answer)
            return
        if kind == "malformed":
            await session.send(GenericNack(sequence_num=submit.sequence_num,
                                           command_status=SmppCommandStatus.ESME_RINVCMDLEN))
            return
        if kind == "latency" and fault:
            await asyncio.sleep(fault.delay)
        notice = submit.service_type == FREE_SERVICE_TYPE
        price = None if notice else self.tariffs.get(carrier.carrier_id, {}).get(
            submit.source.number)
        if submit.registered_delivery and price is None and not notice:
            answer.command_status = SmppCommandStatus.ESME_RINVSRCADR  # not a premium short code
            await session.send(answer)
            return
        message_id = self.epoch + pysecrets.token_hex(6)
        answer.message_id = message_id
        self.origin[message_id] = session
        stat, err = "DELIVRD", "000"
        if price is None:  # a notice: free-marked, or from no premium short code
            self._log("notice", carrier.carrier_id, msisdn, submit.source.number,
                      submit.short_message or submit.message_payload, message_id)
        if price is not None:
            try:
                if kind == "insufficient_funds":
                    raise InsufficientFunds()
                self.core.books[carrier.carrier_id].charge(
                    msisdn, price, f"smpp-{message_id}", submit.source.number,
                    visible_at=fault.visible_at() if fault else 0.0)
            except InsufficientFunds:
                stat, err = "REJECTD", INSUFFICIENT_FUNDS_ERROR
        # late_callback: the receipt (and the final state query_sm sees) come only later
        delay = RECEIPT_DELAY_SECONDS + (fault.delay if fault and kind == "late_callback" else 0)
        self.messages[message_id] = Message(
            carrier.carrier_id, submit.source.number, stat, err, time.monotonic() + delay,
            datetime.now(UTC).strftime("%y%m%d%H%M%S") + "000+")
        reference = next((p.value for p in submit.optional_params or []
                          if p.tag == USER_MESSAGE_REFERENCE), None)
        # no_callback: the message reaches its final state, but no receipt ever says so
        copies = {"no_callback": 0, "duplicate_callback": 2}.get(kind, 1)
        if submit.registered_delivery:
            for _ in range(copies):
                self._later(self._receipt(carrier, msisdn, submit, message_id, stat, err,
                                          reference, delay))
        if kind == "timeout_after_debit" and fault:
            self._later(self._answer_late(session, answer, fault.delay))
            return
        if kind == "reset_after_debit":
            session.writer.close()
            return
        await session.send(answer)

    @staticmethod
    async def _answer_late(session: Session, answer: SubmitSmResp, delay: float) -> None:
        await asyncio.sleep(delay)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await session.send(answer)

    async def _receipt(self, carrier: SimCarrier, msisdn: str, submit: SubmitSm, message_id: str,
                       stat: str, err: str, reference: object, delay: float) -> None:
        await asyncio.sleep(delay)
        params = [OptionalParam(RECEIPTED_MESSAGE_ID, message_id),
                  OptionalParam(MESSAGE_STATE, STATE_CODES[stat])]
        if isinstance(reference, int):
            params.append(OptionalParam(USER_MESSAGE_REFERENCE, reference))
        receipt = DeliverSm(
            short_message=receipt_text(carrier, message_id, stat, err, submit.short_message),
            source=PhoneNumber(msisdn.lstrip("+")), destination=submit.source,
            esm_class=0b00000100, registered_delivery=0, optional_params=params)
        await self._deliver(carrier.carrier_id, receipt, prefer=self.origin.pop(message_id, None))

    # -- mobile-originated messages and the phone's view --------------------------------------------

    def _log(self, direction: str, carrier_id: str, msisdn: str, short_code: str, text: str,
             message_id: str) -> None:
        self.sms_log.append({"direction": direction, "carrier_id": carrier_id, "msisdn": msisdn,
                             "short_code": short_code, "text": text, "message_id": message_id,
                             "at": datetime.now(UTC).isoformat()})

    def mobile_originated(self, carrier_id: str, msisdn: str, short_code: str, text: str,
                          copies: int = 1) -> str:
        """A subscriber's text to a short code, as a deliver_sm to the carrier's ESME (kept
        until one is bound and acknowledges it). ``copies`` > 1 delivers the same message
        again, as an SMSC does when it did not see the acknowledgement."""
        carrier = self.core.carriers.get(carrier_id)
        if carrier is None or carrier.protocol != PROTOCOL:
            raise KeyError(carrier_id)
        message_id = self.epoch + "mo" + pysecrets.token_hex(6)
        self._log("mo", carrier_id, msisdn, short_code, text, message_id)
        for _ in range(copies):
            deliver = DeliverSm(
                short_message=text, source=PhoneNumber(msisdn.lstrip("+")),
                destination=PhoneNumber(short_code), esm_class=0, registered_delivery=0,
                encoding="gsm0338" if sms_encoding(text).encoding == "GSM-7" else "ucs2",
                optional_params=[OptionalParam(MO_MESSAGE_ID, message_id)])
            self._later(self._deliver(carrier_id, deliver))
        return message_id

    async def post_mo(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            message_id = self.mobile_originated(
                str(body["carrier_id"]), "+" + str(body["msisdn"]).lstrip("+"),
                str(body["short_code"]), str(body["text"]), int(body.get("copies", 1)))
        except KeyError as exc:
            return web.json_response({"error": f"unknown or missing {exc}"}, status=400)
        return web.json_response({"message_id": message_id})

    async def get_sms(self, request: web.Request) -> web.Response:
        """The log, optionally for one carrier and/or number (?carrier=&msisdn=)."""
        carrier, msisdn = request.query.get("carrier"), request.query.get("msisdn")
        return web.json_response([e for e in self.sms_log if carrier in (None, e["carrier_id"])
                                  and msisdn in (None, e["msisdn"])])
