"""A premium-SMS SMSC speaking SMPP v3.4 over TCP (asyncio): binds carriers' ESMEs by
system_id, debits the short code's tariff on submit_sm, and sends the deliver_sm receipt later
in that carrier's own receipt wording, on whatever session is bound at the time."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets as pysecrets
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

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

from simulators.books import InsufficientFunds
from simulators.core import SimCarrier, SimulatorCore

PROTOCOL = "smpp"
RECEIPT_DELAY_SECONDS = 0.2
RECEIPTED_MESSAGE_ID, USER_MESSAGE_REFERENCE, MESSAGE_STATE = 0x001E, 0x0204, 0x0427
STATE_CODES = {"DELIVRD": 2, "EXPIRED": 3, "UNDELIV": 5, "REJECTD": 8}
INSUFFICIENT_FUNDS_ERROR = "088"


@dataclass
class Session:
    carrier: SimCarrier
    writer: asyncio.StreamWriter
    sequence: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def send(self, message: SmppMessage) -> None:
        self.writer.write(message.pdu())
        await self.writer.drain()


def receipt_text(carrier: SimCarrier, message_id: str, stat: str, err: str, text: str) -> str:
    """The SMSC's own wording: the SMPP appendix B format, or a key=value style some use."""
    if "receipt-format-kv" in carrier.options:
        return f"msgid={message_id};state={stat};errcode={err}"
    stamp = datetime.now(UTC).strftime("%y%m%d%H%M")
    delivered = "001" if stat == "DELIVRD" else "000"
    return (f"id:{message_id} sub:001 dlvrd:{delivered} submit date:{stamp} done date:{stamp} "
            f"stat:{stat} err:{err} text:{text[:20].encode('ascii', 'replace').decode()}")


class Smsc:
    def __init__(self, core: SimulatorCore, tariffs: dict[str, dict[str, Decimal]]) -> None:
        self.core = core
        # carrier id -> short code -> price
        self.tariffs = tariffs
        self.sessions: dict[str, Session] = {}
        self.queued: dict[str, list[DeliverSm]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for session in list(self.sessions.values()):
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
            if session is not None and self.sessions.get(session.carrier.carrier_id) is session:
                del self.sessions[session.carrier.carrier_id]
            writer.close()

    async def _bind(self, bind: BindTransceiver, writer: asyncio.StreamWriter) -> Session | None:
        carrier = next((c for c in self.core.carriers.values() if c.protocol == PROTOCOL
                        and c.username == bind.system_id), None)
        if carrier is None or not pysecrets.compare_digest(bind.password, carrier.password):
            writer.write(BindTransceiverResp(system_id="SIMSMSC", sequence_num=bind.sequence_num,
                                             command_status=SmppCommandStatus.ESME_RINVPASWD).pdu())
            await writer.drain()
            return None
        session = Session(carrier, writer)
        self.sessions[carrier.carrier_id] = session
        await session.send(BindTransceiverResp(system_id="SIMSMSC", sequence_num=bind.sequence_num))
        for receipt in self.queued.pop(carrier.carrier_id, []):  # kept while nobody was bound
            receipt.sequence_num = next(session.sequence)
            await session.send(receipt)
        return session

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
        price = self.tariffs.get(carrier.carrier_id, {}).get(submit.source.number)
        if submit.registered_delivery and price is None:
            answer.command_status = SmppCommandStatus.ESME_RINVSRCADR  # not a premium short code
            await session.send(answer)
            return
        message_id = pysecrets.token_hex(8)
        answer.message_id = message_id
        stat, err = "DELIVRD", "000"
        if price is not None:
            try:
                if kind == "insufficient_funds":
                    raise InsufficientFunds()
                self.core.books[carrier.carrier_id].charge(msisdn, price, f"smpp-{message_id}",
                                                          submit.source.number)
            except InsufficientFunds:
                stat, err = "REJECTD", INSUFFICIENT_FUNDS_ERROR
        reference = next((p.value for p in submit.optional_params or []
                          if p.tag == USER_MESSAGE_REFERENCE), None)
        copies = {"no_callback": 0, "duplicate_callback": 2}.get(kind, 1)
        if submit.registered_delivery:
            for _ in range(copies):
                self._later(self._receipt(carrier, msisdn, submit, message_id, stat, err,
                                          reference))
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
                       stat: str, err: str, reference: object) -> None:
        await asyncio.sleep(RECEIPT_DELAY_SECONDS)
        params = [OptionalParam(RECEIPTED_MESSAGE_ID, message_id),
                  OptionalParam(MESSAGE_STATE, STATE_CODES[stat])]
        if isinstance(reference, int):
            params.append(OptionalParam(USER_MESSAGE_REFERENCE, reference))
        receipt = DeliverSm(
            short_message=receipt_text(carrier, message_id, stat, err, submit.short_message),
            source=PhoneNumber(msisdn.lstrip("+")), destination=submit.source,
            esm_class=0b00000100, registered_delivery=0, optional_params=params)
        session = self.sessions.get(carrier.carrier_id)
        if session is None:
            self.queued.setdefault(carrier.carrier_id, []).append(receipt)
            return
        receipt.sequence_num = next(session.sequence)
        try:
            await session.send(receipt)
        except (ConnectionError, RuntimeError):
            self.queued.setdefault(carrier.carrier_id, []).append(receipt)
