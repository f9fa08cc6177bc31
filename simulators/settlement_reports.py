"""Daily settlement reports, the way carriers publish them: one CSV file per carrier and UTC
day, in its family's format (``simulators/report_formats.toml``), written from the books.

    GET  /_reports/{carrier}/{YYYY-MM-DD}.csv   the day's charges and refunds
    POST /_control/reports/close                {"carrier": ..., "date": ...}: the carrier
                                                 publishes that day's report as final now

The answer's ``X-Report-Status`` header is ``final`` for a day that has ended (or was closed),
``preliminary`` otherwise: a preliminary report may still grow.
"""

from __future__ import annotations

import csv
import io
import tomllib
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web

from models.money import from_decimal
from simulators.books import Transaction
from simulators.core import SimulatorCore

FORMATS_PATH = Path(__file__).resolve().parent / "report_formats.toml"
STATUS_HEADER = "X-Report-Status"


@dataclass(frozen=True)
class _Format:
    delimiter: str
    header: bool
    date_format: str
    amount: str
    decimal: str
    columns: tuple[tuple[str, str], ...]  # (name, field)
    reference_source: str


def _load_formats(path: Path = FORMATS_PATH) -> dict[str, _Format]:
    """The format of each family, by family."""
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    formats: dict[str, _Format] = {}
    for spec in data["formats"].values():
        formats[spec["family"]] = _Format(
            spec["delimiter"], bool(spec["header"]), spec["date_format"], spec["amount"],
            spec.get("decimal", "."), tuple((c["name"], c["field"]) for c in spec["columns"]),
            spec.get("reference_source", "server_reference"))
    return formats


def _booked_at(txn: Transaction) -> datetime:
    moment = datetime.fromisoformat(txn.created_at)
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def _amount(fmt: _Format, txn: Transaction) -> str:
    if fmt.amount == "minor":
        return str(from_decimal(txn.amount, txn.currency))
    return format(Decimal(txn.amount), "f").replace(".", fmt.decimal)


def _value(fmt: _Format, field: str, txn: Transaction) -> str:
    match field:
        case "booked_at":
            return _booked_at(txn).strftime(fmt.date_format)
        case "key":
            return txn.client_correlator
        case "message_id":
            return txn.client_correlator.removeprefix("smpp-")
        case "reference":
            return str(getattr(txn, fmt.reference_source))
        case "msisdn":
            return txn.msisdn
        case "kind":
            return txn.kind
        case "amount":
            return _amount(fmt, txn)
        case "currency":
            return txn.currency
    raise ValueError(f"unknown report field {field!r}")


def render(fmt: _Format, transactions: list[Transaction]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, delimiter=fmt.delimiter, lineterminator="\r\n")
    if fmt.header:
        writer.writerow([name for name, _ in fmt.columns])
    for txn in transactions:
        writer.writerow([_value(fmt, field, txn) for _, field in fmt.columns])
    return out.getvalue()


class SettlementReports:
    def __init__(self, core: SimulatorCore, formats_path: Path = FORMATS_PATH) -> None:
        self.core = core
        self.formats = _load_formats(formats_path)
        # (carrier, day) published as final before the day ended
        self.closed: set[tuple[str, date]] = set()
        core.reset_hooks.append(self.closed.clear)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/_reports/{carrier}/{day}.csv", self.report)
        app.router.add_post("/_control/reports/close", self.close)

    def _day(self, text: str) -> date:
        try:
            return date.fromisoformat(text)
        except ValueError:
            raise web.HTTPNotFound(text="no such report") from None

    def final(self, carrier_id: str, day: date) -> bool:
        return day < datetime.now(UTC).date() or (carrier_id, day) in self.closed

    async def report(self, request: web.Request) -> web.Response:
        carrier = self.core.carriers.get(request.match_info["carrier"])
        day = self._day(request.match_info["day"])
        if carrier is None or carrier.protocol not in self.formats:
            raise web.HTTPNotFound(text="no such report")
        self.core.refuse_if_unavailable(carrier.carrier_id)
        book = self.core.books[carrier.carrier_id]
        rows = sorted((t for t in book.by_reference.values() if _booked_at(t).date() == day),
                      key=lambda t: (t.created_at, t.server_reference))
        status = "final" if self.final(carrier.carrier_id, day) else "preliminary"
        return web.Response(text=render(self.formats[carrier.protocol], rows),
                            content_type="text/csv", charset="utf-8",
                            headers={STATUS_HEADER: status})

    async def close(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        if body.get("carrier") not in self.core.carriers:
            raise web.HTTPBadRequest(text=f"unknown carrier {body.get('carrier')!r}")
        self.closed.add((str(body["carrier"]), self._day(str(body.get("date")))))
        return web.json_response({"ok": True})
