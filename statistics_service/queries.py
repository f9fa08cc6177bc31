"""Live statistics over a sliding window, computed by OpenSearch aggregations on the interaction
indices (``cb-interactions-*``): charge attempts, success rate, latency percentiles from the
``carrier_call`` documents; revenue, partial payments and refunds from the ``ledger`` ones.
Each figure is broken down by carrier, country, product and subscriber-local hour of day.

Revenue is shown per currency (never summed across currencies), gross and net:

* gross = charged − refunded (minor units), from the ledger documents;
* net of VAT = gross / (1 + the country's VAT rate), prices being VAT-inclusive
  (rates in rules/data/vat.toml);
* net = net of VAT × (1 − the carrier's ``revenue_share``) (rules/data/carriers.toml): what the
  publisher is paid. Worked out exactly per (carrier, country, currency), rounded half-even to
  minor units once per row."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from rules.load import DATA_DIR, RulesData

INDEX_PATTERN = "cb-interactions-*"
DIMENSIONS = ("carrier", "country", "product", "local_hour")
PERCENTS = (50.0, 95.0, 99.0)
VAT_PATH = DATA_DIR / "vat.toml"
MISSING = "(none)"
_TERMS_SIZE = 1000
_WINDOW_RE = re.compile(r"^\s*(\d+)\s*([mhd])\s*$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


class SearchClient(Protocol):
    """The part of ``opensearchpy.OpenSearch`` used here."""

    def search(self, *args: Any, **kwargs: Any) -> Any: ...


def parse_window(text: str) -> timedelta:
    """``"15m"``, ``"6h"`` or ``"7d"`` as a timedelta (a positive whole number of a unit)."""
    match = _WINDOW_RE.match(text)
    if match is None or int(match.group(1)) <= 0:
        raise ValueError(f"window {text!r}: write a positive number and m, h or d, e.g. 60m or 24h")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def show_window(window: timedelta) -> str:
    seconds = int(window.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def load_vat(path: Path = VAT_PATH) -> dict[str, Decimal]:
    """Country code -> VAT rate (a fraction) from rules/data/vat.toml."""
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    rates: dict[str, Decimal] = {}
    for code, entry in raw.items():
        if not isinstance(entry, dict) or "rate" not in entry:
            raise ValueError(f"{path.name}: {code}.rate is missing")
        rate = Decimal(str(entry["rate"]))
        if not Decimal(0) <= rate < Decimal(1):
            raise ValueError(f"{path.name}: {code}.rate {rate} is not a fraction in [0, 1)")
        rates[code] = rate
    return rates


@dataclass(frozen=True)
class RevenueTerms:
    """What turns gross revenue into the publisher's net: VAT per country, the carrier's share."""

    vat: Mapping[str, Decimal]
    share: Mapping[str, Decimal]
    default_share: Decimal
    carrier_country: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_rules(cls, rules: RulesData, vat: Mapping[str, Decimal] | None = None) -> RevenueTerms:
        return cls(
            vat=dict(vat if vat is not None else load_vat()),
            share={cid: Decimal(str(c.entry.revenue_share)) for cid, c in rules.carriers.items()},
            default_share=Decimal(str(rules.default_carrier.entry.revenue_share)),
            carrier_country=dict(rules.registry.carrier_country),
        )

    def vat_rate(self, country: str, carrier: str) -> Decimal:
        code = country if country != MISSING else self.carrier_country.get(carrier, MISSING)
        return self.vat.get(code, Decimal(0))

    def carrier_share(self, carrier: str) -> Decimal:
        return self.share.get(carrier, self.default_share)

    def net(self, gross_minor: int, country: str, carrier: str) -> tuple[Decimal, Decimal]:
        """Exact (net of VAT, publisher net) of ``gross_minor``."""
        net_of_vat = Decimal(gross_minor) / (1 + self.vat_rate(country, carrier))
        return net_of_vat, net_of_vat * (1 - self.carrier_share(carrier))


def _minor(value: Decimal) -> int:
    return int(value.to_integral_value(ROUND_HALF_EVEN))


@dataclass
class Money:
    """One currency's revenue in a row, in minor units."""

    currency: str
    charged_minor: int = 0
    refunded_minor: int = 0
    partial_minor: int = 0
    gross_minor: int = 0
    net_of_vat_minor: int = 0
    net_minor: int = 0


@dataclass
class Row:
    """The figures of one value of a dimension (one carrier, one country, one hour...)."""

    key: str
    attempts: int = 0
    succeeded: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    partial_payments: int = 0
    refunds: int = 0
    reconciled: int = 0
    revenue: dict[str, Money] = field(default_factory=dict)
    latency_ms: dict[str, float | None] = field(default_factory=dict)

    @property
    def success_rate(self) -> float | None:
        """Succeeded charges / charge attempts; None without attempts."""
        return self.succeeded / self.attempts if self.attempts else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["success_rate"] = self.success_rate
        data["revenue"] = [asdict(m) for _, m in sorted(self.revenue.items())]
        return data


@dataclass(frozen=True)
class HourCount:
    attempts: int
    succeeded: int

    @property
    def success_rate(self) -> float | None:
        return self.succeeded / self.attempts if self.attempts else None


@dataclass
class Statistics:
    start: datetime
    end: datetime
    total: Row
    by: dict[str, list[Row]]
    # carrier -> local hour -> charge attempts and successes, for the best charging hour
    hourly: dict[str, dict[int, HourCount]]

    @property
    def window(self) -> timedelta:
        return self.end - self.start

    def row(self, dimension: str, key: str) -> Row | None:
        return next((r for r in self.by[dimension] if r.key == key), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "window": show_window(self.window),
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "total": self.total.to_json(),
            "by": {dim: [r.to_json() for r in rows] for dim, rows in self.by.items()},
            "hourly": {carrier: {str(h): asdict(c) for h, c in sorted(hours.items())}
                       for carrier, hours in sorted(self.hourly.items())},
        }


def _range(start: datetime, end: datetime) -> dict[str, Any]:
    return {"range": {"@timestamp": {"gte": start.isoformat(), "lt": end.isoformat()}}}


def _terms(name: str, size: int = _TERMS_SIZE) -> dict[str, Any]:
    return {"field": name, "size": size, "missing": MISSING if name != "local_hour" else -1}


def _call_metrics() -> dict[str, Any]:
    return {
        "charges": {"filter": {"term": {"operation": "charge"}},
                    "aggs": {"outcomes": {"terms": _terms("outcome", 100)}}},
        "latency": {"percentiles": {"field": "latency_ms", "percents": list(PERCENTS)}},
    }


def _calls_query(start: datetime, end: datetime) -> dict[str, Any]:
    aggs: dict[str, Any] = {f"by_{dim}": {"terms": _terms(dim), "aggs": _call_metrics()}
                            for dim in DIMENSIONS}
    aggs.update(_call_metrics())
    aggs["hourly"] = {"terms": _terms("carrier"), "aggs": {
        "hours": {"terms": _terms("local_hour", 25), "aggs": {
            "charges": {"filter": {"term": {"operation": "charge"}}, "aggs": {
                "ok": {"filter": {"term": {"outcome": "succeeded"}}}}}}}}}
    return {"size": 0, "query": {"bool": {"filter": [{"term": {"event": "carrier_call"}},
                                                     _range(start, end)]}}, "aggs": aggs}


def _money_leaves() -> dict[str, Any]:
    """carrier -> country -> currency -> sums by ledger operation (the leaf nets exactly)."""
    return {"carriers": {"terms": _terms("carrier"), "aggs": {
        "countries": {"terms": _terms("country"), "aggs": {
            "currencies": {"terms": _terms("currency"), "aggs": {
                "operations": {"terms": _terms("operation", 20),
                               "aggs": {"amount": {"sum": {"field": "amount_minor"}}}},
                "partial": {"filter": {"bool": {"filter": [{"term": {"operation": "charge"}},
                                                           {"term": {"partial": True}}]}},
                            "aggs": {"amount": {"sum": {"field": "amount_minor"}}}},
            }}}}}}}


def _ledger_query(start: datetime, end: datetime) -> dict[str, Any]:
    aggs: dict[str, Any] = {f"by_{dim}": {"terms": _terms(dim), "aggs": _money_leaves()}
                            for dim in DIMENSIONS}
    aggs.update(_money_leaves())
    return {"size": 0, "query": {"bool": {"filter": [{"term": {"event": "ledger"}},
                                                     _range(start, end)]}}, "aggs": aggs}


def _buckets(agg: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    return list((agg or {}).get("buckets", []))


def _key(bucket: Mapping[str, Any]) -> str:
    return str(bucket.get("key_as_string", bucket["key"]))


def _percentile(values: Mapping[str, Any], percent: float) -> float | None:
    for name, value in values.items():
        if float(name) == percent:
            return float(value) if value is not None and value == value else None
    return None


def _fill_calls(row: Row, bucket: Mapping[str, Any]) -> None:
    charges = bucket.get("charges", {})
    row.attempts = int(charges.get("doc_count", 0))
    row.outcomes = {_key(b): int(b["doc_count"]) for b in _buckets(charges.get("outcomes"))}
    row.succeeded = row.outcomes.get("succeeded", 0)
    values = bucket.get("latency", {}).get("values", {})
    row.latency_ms = {f"p{int(p)}": _percentile(values, p) for p in PERCENTS}


def _leaves(bucket: Mapping[str, Any]) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    for carrier in _buckets(bucket.get("carriers")):
        for country in _buckets(carrier.get("countries")):
            for currency in _buckets(country.get("currencies")):
                yield _key(carrier), _key(country), currency


def _fill_money(row: Row, bucket: Mapping[str, Any], terms: RevenueTerms) -> None:
    exact: dict[str, tuple[Decimal, Decimal]] = {}
    for carrier, country, leaf in _leaves(bucket):
        currency = _key(leaf)
        money = row.revenue.setdefault(currency, Money(currency))
        ops = {_key(b): b for b in _buckets(leaf.get("operations"))}

        def amount(op: str, ops: Mapping[str, Any] = ops) -> int:
            return int(ops[op]["amount"]["value"]) if op in ops else 0

        charged, refunded = amount("charge"), amount("refund")
        money.charged_minor += charged
        money.refunded_minor += refunded
        money.partial_minor += int(leaf["partial"]["amount"]["value"])
        row.partial_payments += int(leaf["partial"]["doc_count"])
        row.refunds += int(ops["refund"]["doc_count"]) if "refund" in ops else 0
        row.reconciled += int(ops["reconciled"]["doc_count"]) if "reconciled" in ops else 0
        net_of_vat, net = terms.net(charged - refunded, country, carrier)
        before = exact.get(currency, (Decimal(0), Decimal(0)))
        exact[currency] = (before[0] + net_of_vat, before[1] + net)
    for currency, money in row.revenue.items():
        money.gross_minor = money.charged_minor - money.refunded_minor
        money.net_of_vat_minor = _minor(exact[currency][0])
        money.net_minor = _minor(exact[currency][1])


def _sort_key(dimension: str, row: Row) -> tuple[int, int | str]:
    if dimension == "local_hour":
        return (0, int(row.key)) if row.key.isdigit() else (1, row.key)
    return (0, row.key)


def compute(client: SearchClient, terms: RevenueTerms, window: timedelta,
            end: datetime | None = None, index: str = INDEX_PATTERN) -> Statistics:
    """The statistics of the ``window`` ending at ``end`` (now by default)."""
    end = end or datetime.now(UTC)
    start = end - window
    calls = client.search(index=index, body=_calls_query(start, end))["aggregations"]
    ledger = client.search(index=index, body=_ledger_query(start, end))["aggregations"]

    total = Row("all")
    _fill_calls(total, calls)
    _fill_money(total, ledger, terms)
    by: dict[str, list[Row]] = {}
    for dim in DIMENSIONS:
        rows: dict[str, Row] = {}
        for bucket in _buckets(calls.get(f"by_{dim}")):
            _fill_calls(rows.setdefault(_key(bucket), Row(_key(bucket))), bucket)
        for bucket in _buckets(ledger.get(f"by_{dim}")):
            _fill_money(rows.setdefault(_key(bucket), Row(_key(bucket))), bucket, terms)
        if "-1" in rows and dim == "local_hour":  # documents without a local hour
            rows[MISSING] = rows.pop("-1")
            rows[MISSING].key = MISSING
        by[dim] = sorted(rows.values(), key=partial(_sort_key, dim))
    hourly: dict[str, dict[int, HourCount]] = {}
    for carrier in _buckets(calls.get("hourly")):
        hours = hourly.setdefault(_key(carrier), {})
        for hour in _buckets(carrier.get("hours")):
            if int(hour["key"]) < 0:
                continue
            charges = hour["charges"]
            hours[int(hour["key"])] = HourCount(int(charges["doc_count"]),
                                                int(charges["ok"]["doc_count"]))
    return Statistics(start, end, total, by, hourly)
