"""Reading the carriers' daily settlement reports: each family's CSV format as described in
``simulators/report_formats.toml``, and which format and address each carrier uses
(``reconciliation/carriers.toml``: carrier data, kept out of the registry).

A report is read whole or refused: a row that cannot be read raises ``ReportFormatError``,
never skipped, so no money is dropped on the way in.
"""

from __future__ import annotations

import csv
import io
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any

from models.money import MoneyError, from_decimal

ROOT = Path(__file__).resolve().parent.parent
FORMATS_PATH = ROOT / "simulators" / "report_formats.toml"
CARRIERS_PATH = Path(__file__).resolve().parent / "carriers.toml"
FIELDS = frozenset({"booked_at", "key", "message_id", "reference", "msisdn", "kind", "amount",
                    "currency"})
KINDS = frozenset({"charge", "refund"})


class ReportFormatError(ValueError):
    """A report (or a format description) that cannot be read as described."""


@dataclass(frozen=True)
class ReportFormat:
    name: str
    family: str
    delimiter: str
    header: bool
    date_format: str
    amount: str  # "major" | "minor"
    decimal: str
    columns: tuple[tuple[str, str], ...]  # (name, field), in order


@dataclass(frozen=True)
class ReportRow:
    """One booking in a carrier's report, amounts in minor units."""

    booked_at: datetime
    reference: str
    msisdn: str
    kind: str
    amount_minor: int
    currency: str
    key: str | None = None
    message_id: str | None = None


@dataclass(frozen=True)
class ReportSource:
    carrier_id: str
    format: ReportFormat
    url_template: str

    def url(self, addresses: dict[str, str], day: str) -> str:
        return self.url_template.format(**addresses, carrier=self.carrier_id, date=day)


def _format_of(name: str, spec: dict[str, object]) -> ReportFormat:
    columns = spec.get("columns")
    if not isinstance(columns, list) or not columns:
        raise ReportFormatError(f"{name}: no columns")
    pairs = tuple((str(c["name"]), str(c["field"])) for c in columns)
    fields = [f for _, f in pairs]
    unknown = set(fields) - FIELDS
    if unknown or len(set(fields)) != len(fields):
        raise ReportFormatError(f"{name}: unknown or repeated fields {sorted(unknown)}")
    needed = {"booked_at", "reference", "msisdn", "kind", "amount", "currency"}
    if not needed <= set(fields) or not {"key", "message_id"} & set(fields):
        raise ReportFormatError(f"{name}: needs {sorted(needed)} and key or message_id")
    amount, decimal = str(spec.get("amount")), str(spec.get("decimal", "."))
    if amount not in ("major", "minor") or decimal not in (".", ","):
        raise ReportFormatError(f"{name}: amount {amount!r} / decimal {decimal!r}")
    return ReportFormat(name, str(spec["family"]), str(spec["delimiter"]), bool(spec["header"]),
                        str(spec["date_format"]), amount, decimal, pairs)


@lru_cache(maxsize=4)
def load_formats(path: Path = FORMATS_PATH) -> dict[str, ReportFormat]:
    """Every described format, by name."""
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    return {name: _format_of(name, spec) for name, spec in data["formats"].items()}


@lru_cache(maxsize=4)
def _carrier_data(path: Path = CARRIERS_PATH) -> dict[str, Any]:
    with path.open("rb") as handle:
        return tomllib.load(handle)


def report_source(carrier_id: str, family: str, carriers_path: Path = CARRIERS_PATH,
                  formats_path: Path = FORMATS_PATH) -> ReportSource:
    """Where ``carrier_id`` publishes its report and in which format: its own entry, else its
    family's."""
    data = _carrier_data(carriers_path)
    own: dict[str, str] = data.get("carriers", {}).get(carrier_id, {})
    by_family: dict[str, str] = data.get("families", {}).get(family, {})
    defaults: dict[str, str] = data.get("defaults", {})
    name = own.get("report_format") or by_family.get("report_format")
    if name is None:
        raise ReportFormatError(f"no report format known for {carrier_id} ({family})")
    formats = load_formats(formats_path)
    if name not in formats:
        raise ReportFormatError(f"{carrier_id}: unknown report format {name!r}")
    url = own.get("report_url") or by_family.get("report_url") or defaults.get("report_url")
    if not url:
        raise ReportFormatError(f"no report address known for {carrier_id}")
    return ReportSource(carrier_id, formats[name], url)


def _amount_minor(fmt: ReportFormat, text: str, currency: str) -> int:
    try:
        if fmt.amount == "minor":
            if not text.strip().isdigit():
                raise ReportFormatError(f"not an amount in minor units: {text!r}")
            value = int(text)
        else:
            if fmt.decimal == "," and "." in text or fmt.decimal == "." and "," in text:
                raise ReportFormatError(f"unexpected separator in {text!r}")
            value = from_decimal(Decimal(text.strip().replace(",", ".")), currency)
    except (InvalidOperation, MoneyError, OverflowError, ValueError) as exc:
        raise ReportFormatError(f"not an amount in {currency}: {text!r} ({exc})") from None
    if value <= 0:
        raise ReportFormatError(f"amount must be positive: {text!r}")
    return value


def parse(fmt: ReportFormat, text: str) -> list[ReportRow]:
    """Every row of a report in format ``fmt``."""
    reader = csv.reader(io.StringIO(text), delimiter=fmt.delimiter)
    lines = [line for line in reader if any(cell.strip() for cell in line)]
    names = [name for name, _ in fmt.columns]
    if fmt.header:
        if not lines or [c.strip() for c in lines[0]] != names:
            raise ReportFormatError(f"{fmt.name}: header is not {names}")
        lines = lines[1:]
    rows = []
    for number, line in enumerate(lines, start=2 if fmt.header else 1):
        if len(line) != len(fmt.columns):
            raise ReportFormatError(f"{fmt.name} line {number}: {len(line)} fields, "
                                    f"expected {len(fmt.columns)}")
        cell = {field: value.strip() for (_, field), value in zip(fmt.columns, line, strict=True)}
        try:
            booked_at = datetime.strptime(cell["booked_at"], fmt.date_format).replace(tzinfo=UTC)
        except ValueError:
            raise ReportFormatError(
                f"{fmt.name} line {number}: date {cell['booked_at']!r}") from None
        if cell["kind"] not in KINDS:
            raise ReportFormatError(f"{fmt.name} line {number}: kind {cell['kind']!r}")
        currency = cell["currency"]
        rows.append(ReportRow(
            booked_at=booked_at, reference=cell["reference"], msisdn=cell["msisdn"],
            kind=cell["kind"], amount_minor=_amount_minor(fmt, cell["amount"], currency),
            currency=currency, key=cell.get("key") or None,
            message_id=cell.get("message_id") or None))
    return rows
