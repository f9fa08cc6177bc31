"""Loads rules/data/*.toml, validates them against each other, the carrier registry and the
product catalogue, and returns them parsed. Every error names the file and the field."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ValidationError

from models.money import MoneyError
from rules.errors import RulesError
from rules.money_text import exponent_of, to_minor
from rules.parse import delay_of, minute_of, weekday_of, window_of
from rules.schema import CarrierEntry, CountryEntry, ProductEntry
from rules.types import MaintenanceWindow

DATA_DIR = Path(__file__).resolve().parent / "data"
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
# the adapter families that answer a balance look-up (carriers/parlayx.py ``balance``)
BALANCE_PROTOCOLS = frozenset({"parlayx"})
M = TypeVar("M", bound=BaseModel)
CAP_FIELDS = ("per_transaction", "per_day", "per_week", "per_month", "subscription_per_month")


@dataclass(frozen=True)
class RegistryView:
    """What the rules need from the carrier registry, so tests can describe a carrier (an AU
    one, say) without writing a registry file."""

    carrier_country: dict[str, str]
    carrier_protocol: dict[str, str]
    country_currency: dict[str, str]


@dataclass(frozen=True)
class CountryRules:
    code: str
    entry: CountryEntry
    window_start_minute: int
    window_end_minute: int
    # cap field name -> minor units (absent caps are not listed)
    caps_minor: dict[str, int]
    retry_delays_seconds: list[int]


@dataclass(frozen=True)
class CarrierRules:
    id: str
    entry: CarrierEntry
    preferred_minute: int | None
    maintenance: list[MaintenanceWindow]
    retry_delays_seconds: list[int] | None


@dataclass(frozen=True)
class RulesData:
    countries: dict[str, CountryRules]
    carriers: dict[str, CarrierRules]
    default_carrier: CarrierRules
    products: dict[str, ProductEntry]
    registry: RegistryView

    def carrier(self, carrier_id: str) -> CarrierRules:
        """The carrier's own entry, or the documented ``[default]`` one."""
        return self.carriers.get(carrier_id, self.default_carrier)


def registry_view() -> RegistryView:
    from carriers.loader import default_registry

    registry = default_registry()
    return RegistryView(
        carrier_country=dict(registry.carrier_country),
        carrier_protocol={cid: c.protocol for cid, c in registry.carriers.items()},
        country_currency={code: c.currency for code, c in registry.countries.items()},
    )


def catalog_product_ids() -> set[str]:
    from models.seed import load_catalog

    return {p.id for p in load_catalog().products}


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(_PROJECT_ROOT))
    except ValueError:
        return str(path)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RulesError(_shown(path), "", "file is missing")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(_shown(path), "", f"not valid TOML: {exc}") from None


def _validate(model: type[M], file: str, key: str, value: Any) -> M:
    if not isinstance(value, dict):
        raise RulesError(file, key, "must be a table")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join([key, *(str(p) for p in first["loc"])])
        raise RulesError(file, where, first["msg"]) from None


def _delays(file: str, where: str, texts: list[str]) -> list[int]:
    delays = []
    for index, text in enumerate(texts):
        try:
            delays.append(delay_of(text))
        except ValueError as exc:
            raise RulesError(file, f"{where}.{index}", str(exc)) from None
    return delays


def _country(file: str, code: str, raw: Any, registry: RegistryView) -> CountryRules:
    if len(code) != 2 or not code.isalpha() or not code.isupper():
        raise RulesError(file, code, "country codes are ISO 3166 alpha-2, upper case")
    entry = _validate(CountryEntry, file, code, raw)
    try:
        ZoneInfo(entry.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise RulesError(file, f"{code}.timezone", f"unknown IANA timezone {entry.timezone!r}") from None
    try:
        start, end = window_of(entry.window)
    except ValueError as exc:
        raise RulesError(file, f"{code}.window", str(exc)) from None
    try:
        exponent_of(entry.currency)
    except MoneyError as exc:
        raise RulesError(file, f"{code}.currency", str(exc)) from None
    expected = registry.country_currency.get(code)
    if expected is not None and expected != entry.currency:
        raise RulesError(file, f"{code}.currency",
                         f"{entry.currency} differs from the carrier registry's {expected}")
    caps: dict[str, int] = {}
    for name in CAP_FIELDS:
        amount: Decimal | None = getattr(entry, name)
        if amount is not None:
            try:
                caps[name] = to_minor(amount, entry.currency)
            except MoneyError as exc:
                raise RulesError(file, f"{code}.{name}", str(exc)) from None
    if entry.opt_in == "none" and entry.pin_digits:
        raise RulesError(file, f"{code}.pin_digits", "a PIN needs opt_in 'sms_pin' or 'two_step'")
    if entry.opt_in != "none" and entry.pin_digits < 4:
        raise RulesError(file, f"{code}.pin_digits", f"opt_in {entry.opt_in!r} needs a PIN of 4+ digits")
    if entry.opt_in != "none" and entry.opt_in_deadline_minutes < 1:
        raise RulesError(file, f"{code}.opt_in_deadline_minutes", "an opt-in needs a deadline")
    delays = _delays(file, f"{code}.retry_delays", entry.retry_delays)
    return CountryRules(code, entry, start, end, caps, delays)


def _ladder(file: str, cid: str, entry: CarrierEntry, currency: str | None) -> None:
    ladder = entry.ladder
    if not ladder or isinstance(ladder[0], str) or ladder[0] != 1.0:
        raise RulesError(file, f"{cid}.ladder.0", "a ladder starts at 1.0 (the full price)")
    if len(ladder) > 1 and entry.balance_policy != "ladder":
        raise RulesError(file, f"{cid}.ladder", "steps below the full price need balance_policy 'ladder'")
    previous: dict[type, Decimal] = {}
    for index, step in enumerate(ladder[1:], start=1):
        where = f"{cid}.ladder.{index}"
        try:
            value = Decimal(str(step))
        except InvalidOperation:
            raise RulesError(file, where, f"{step!r} is neither a fraction nor an amount") from None
        if value <= 0 or (isinstance(step, float) and value >= 1):
            raise RulesError(file, where, "fractions lie between 0 and 1; amounts are positive")
        if isinstance(step, str) and currency is not None:
            try:
                to_minor(value, currency)
            except MoneyError as exc:
                raise RulesError(file, where, str(exc)) from None
        last = previous.get(type(step))
        if last is not None and value >= last:
            raise RulesError(file, where, "ladder steps must descend")
        previous[type(step)] = value


def _carrier(file: str, cid: str, raw: Any, data_countries: dict[str, CountryRules],
             registry: RegistryView) -> CarrierRules:
    entry = _validate(CarrierEntry, file, cid, raw)
    is_default = cid == "default"
    country_code = registry.carrier_country.get(cid)
    if not is_default and country_code is None:
        raise RulesError(file, cid, "not a carrier in the carrier registry")
    country = data_countries.get(country_code) if country_code else None
    if not is_default and country is None:
        raise RulesError(file, cid, f"its country {country_code} has no entry in countries.toml")
    if is_default and (entry.preferred_hour or entry.maintenance or entry.balance_check):
        raise RulesError(file, "default", "the default carrier sets no preferred_hour, maintenance "
                         "or balance_check (they depend on the carrier)")
    preferred = None
    if entry.preferred_hour is not None:
        try:
            preferred = minute_of(entry.preferred_hour)
        except ValueError as exc:
            raise RulesError(file, f"{cid}.preferred_hour", str(exc)) from None
        assert country is not None
        if not country.window_start_minute <= preferred < country.window_end_minute:
            raise RulesError(file, f"{cid}.preferred_hour",
                             f"{entry.preferred_hour} is outside {country.code}'s window "
                             f"{country.entry.window}")
    maintenance = []
    for index, item in enumerate(entry.maintenance):
        where = f"{cid}.maintenance.{index}"
        try:
            window = MaintenanceWindow(weekday_of(item.day), minute_of(item.start),
                                       minute_of(item.end, allow_end_of_day=True))
        except ValueError as exc:
            raise RulesError(file, where, str(exc)) from None
        if window.start_minute >= window.end_minute:
            raise RulesError(file, f"{where}.end", "must be after start (split windows that cross "
                             "midnight in two)")
        maintenance.append(window)
    if country is not None:
        for weekday in range(7):
            if _day_fully_closed(country, maintenance, weekday):
                raise RulesError(file, f"{cid}.maintenance",
                                 f"leaves no charging time on weekday {weekday}")
    protocol = registry.carrier_protocol.get(cid, "")
    if entry.balance_check and protocol not in BALANCE_PROTOCOLS:
        raise RulesError(file, f"{cid}.balance_check",
                         f"protocol {protocol!r} offers no balance look-up")
    if entry.balance_policy == "postpone" and not entry.balance_check:
        raise RulesError(file, f"{cid}.balance_policy", "'postpone' needs balance_check = true")
    _ladder(file, cid, entry, country.entry.currency if country else None)
    delays = (_delays(file, f"{cid}.retry_delays", entry.retry_delays)
              if entry.retry_delays is not None else None)
    return CarrierRules(cid, entry, preferred, maintenance, delays)


def _day_fully_closed(country: CountryRules, maintenance: list[MaintenanceWindow],
                      weekday: int) -> bool:
    """Whether maintenance on ``weekday`` covers the whole charging window."""
    cursor = country.window_start_minute
    for window in sorted((m for m in maintenance if m.weekday == weekday),
                         key=lambda m: m.start_minute):
        if window.start_minute > cursor:
            return False
        cursor = max(cursor, window.end_minute)
    return cursor >= country.window_end_minute


def load_rules(directory: Path | None = None, registry: RegistryView | None = None,
               product_ids: set[str] | None = None) -> RulesData:
    """Validated rules from ``directory`` (default rules/data), checked against the carrier
    registry and the product catalogue. Raises RulesError naming file and field."""
    directory = directory or DATA_DIR
    registry = registry or registry_view()
    product_ids = product_ids if product_ids is not None else catalog_product_ids()

    countries_path = directory / "countries.toml"
    countries_file = _shown(countries_path)
    countries = {code: _country(countries_file, code, raw, registry)
                 for code, raw in _read(countries_path).items()}
    for code in sorted(set(registry.country_currency) - set(countries)):
        raise RulesError(countries_file, code, "the carrier registry has this country; it needs rules")

    carriers_path = directory / "carriers.toml"
    carriers_file = _shown(carriers_path)
    raw_carriers = _read(carriers_path)
    if "default" not in raw_carriers:
        raise RulesError(carriers_file, "default", "the fallback for carriers without an entry is missing")
    parsed = {cid: _carrier(carriers_file, cid, raw, countries, registry)
              for cid, raw in raw_carriers.items()}
    default = parsed.pop("default")

    products_path = directory / "products.toml"
    products_file = _shown(products_path)
    products = {pid: _validate(ProductEntry, products_file, pid, raw)
                for pid, raw in _read(products_path).items()}
    for pid in sorted(set(products) - product_ids):
        raise RulesError(products_file, pid, "not a product in models/catalog.toml")
    for pid in sorted(product_ids - set(products)):
        raise RulesError(products_file, pid, "a catalogue product needs an entry")
    return RulesData(countries, parsed, default, products, registry)
