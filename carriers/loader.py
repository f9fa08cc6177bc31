"""Loads and validates the carrier registry (``carriers/registry/*.toml``)."""

from __future__ import annotations

import re
import tomllib
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.money import MoneyError, exponent, from_decimal
from models.tables import Period

REGISTRY_DIR = Path(__file__).resolve().parent / "registry"


class RegistryError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_zone(zone: str) -> str:
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA timezone {zone!r}") from None
    return zone


class CountryConfig(_Strict):
    code: str = Field(pattern=r"^[A-Z]{2}$")
    name: str
    currency: str
    timezones: list[str] = Field(min_length=1)
    default_locale: str

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        try:
            exponent(value)
        except MoneyError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("timezones")
    @classmethod
    def _zones(cls, value: list[str]) -> list[str]:
        return [_check_zone(z) for z in value]


class AuthConfig(_Strict):
    kind: Literal["basic", "oauth2", "hmac", "jwt-rs256", "wsse", "parlayx-header", "smpp-bind"]
    # the user name (basic), client id (oauth2), API key (hmac) or merchant id (jwt-rs256)
    username: str
    # key into settings.carrier_secrets (jwt-rs256: our private key, PEM); the secret itself
    # never lives in the registry
    secret_ref: str
    # oauth2 only: the client-credentials token endpoint
    token_url: str | None = None
    # carriers that call us back: the key their callbacks are signed with
    callback_secret_ref: str | None = None
    # wsse only: the UsernameToken profile allows both; many carriers require PasswordText
    password_type: Literal["digest", "text"] | None = None

    @model_validator(mode="after")
    def _token_url_for_oauth2(self) -> AuthConfig:
        if (self.kind == "oauth2") != (self.token_url is not None):
            raise ValueError("token_url is required for, and only for, oauth2")
        if self.password_type is not None and self.kind != "wsse":
            raise ValueError("password_type is for wsse only")
        return self


class PricePointConfig(_Strict):
    id: str
    product: str
    # premium SMS: the short code whose tariff is this price
    short_code: str | None = Field(default=None, pattern=r"^\d{3,8}$")
    amount: Decimal = Field(gt=0)
    period: Period
    interval_seconds: int | None = Field(default=None, gt=0)
    retry_schedule_seconds: list[int] = Field(default_factory=lambda: [3600, 21600, 86400])

    @model_validator(mode="after")
    def _interval_only_for_interval(self) -> PricePointConfig:
        if (self.period is Period.INTERVAL) != (self.interval_seconds is not None):
            raise ValueError("interval_seconds is required for, and only for, period 'interval'")
        if any(d < 0 for d in self.retry_schedule_seconds):
            raise ValueError("retry delays must not be negative")
        return self


class SmppConfig(_Strict):
    """Premium SMS over SMPP 3.4: how this SMSC words its delivery receipts."""

    # a regex over the receipt text with named groups ``id`` and ``stat`` (and ``err``)
    receipt_pattern: str
    delivered_states: list[str] = Field(default_factory=lambda: ["DELIVRD"])
    # receipt error codes that mean the subscriber could not pay
    insufficient_funds_errors: list[str] = Field(default_factory=list)
    submit_timeout_seconds: float = Field(default=5.0, gt=0)

    @field_validator("receipt_pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        if not {"id", "stat"} <= set(compiled.groupindex):
            raise ValueError("the pattern needs named groups 'id' and 'stat'")
        return value


class CarrierPromises(_Strict):
    """What this carrier has documented about its own behaviour. Nothing is assumed: an entry
    that declares nothing gets the conservative answer (no deduplication, no look-up), which
    means an ambiguous charge is settled only by a pushed result or by reconciliation."""

    # what a repeat of one of our idempotency keys does: "no" (it may debit again), "replay"
    # (the first answer again, committed before the carrier replied), "error" (refused as a
    # duplicate, without a debit)
    deduplicates_by_key: Literal["no", "replay", "error"] = "no"
    # whether the carrier answers a look-up of an earlier operation by our key
    status_lookup: bool = False
    # how soon what the carrier took shows in its look-ups and deduplication: a "not found"
    # closer than this to our last send never leads to a resend
    visible_within_seconds: float = Field(default=300.0, ge=0)


FaultOutcome = Literal["succeeded", "insufficient_funds", "pending", "rejected", "transient",
                       "unknown"]
_FAULT_KEY = re.compile(r"^(?:(charge|refund|status|balance):)?[A-Za-z0-9_.\-]+$")


class CarrierConfig(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    name: str
    protocol: Literal["oneapi", "parlayx", "camara", "polling-aggregator", "callback-aggregator",
                      "smpp"]
    base_url: str
    # oneapi: JSON bodies, or the older form-encoded variant
    request_format: Literal["json", "form"] = "json"
    auth: AuthConfig
    timezone: str
    locale: str
    number_prefixes: list[str] = Field(default_factory=list)
    # a carrier's own subclass of its family's adapter, "module:Class", when data is not enough
    adapter: str | None = Field(default=None, pattern=r"^[\w.]+:\w+$")
    # behaviours of this carrier's gateway the simulator reproduces (e.g. "faults-in-faultcode")
    quirks: list[str] = Field(default_factory=list)
    promises: CarrierPromises = Field(default_factory=CarrierPromises)
    # this carrier's own fault/error codes -> outcome, over its family's defaults; a key may
    # name one operation ("charge:SVC0270"). A code nobody listed is unknown for that operation
    faults: dict[str, FaultOutcome] = Field(default_factory=dict)
    # the carrier's own service paths, by the family's names for them (Parlay X: "payment",
    # "account"), over the family's defaults
    service_paths: dict[str, str] = Field(default_factory=dict)
    # APIs of the family that live at their own address (CAMARA: the refund API)
    refund_base_url: str | None = None
    # how results arrive: in the response, by polling, or by a callback to us
    interaction: Literal["sync", "poll", "callback"] = "sync"
    # after a pending answer: waits, in seconds, between status look-ups (the last repeats);
    # for callback carriers the fallback when the callback does not come
    settle_delays_seconds: list[float] | None = None
    # how long an ambiguous charge is settled before it is listed as unsettled
    settle_deadline_seconds: float = Field(default=2 * 86400.0, gt=0)
    smpp: SmppConfig | None = None
    timeout_seconds: float = Field(default=10.0, gt=0)
    # the carrier's calls run on their own task queue, so a slow carrier holds its own slots
    # only; carriers naming one group share it. The rate limit applies to the whole queue.
    task_queue_group: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]*$")
    rate_limit_per_second: float = Field(default=50.0, gt=0)
    price_points: list[PricePointConfig] = Field(default_factory=list)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return _check_zone(value)

    def settle_delays(self) -> list[float]:
        if self.settle_delays_seconds:
            return self.settle_delays_seconds
        defaults: dict[str, list[float]] = {
            "sync": [5, 30, 120, 600], "poll": [1, 2, 5, 15, 60, 300], "callback": [30, 120, 600]}
        return defaults[self.interaction]

    @model_validator(mode="after")
    def _smpp_needs_receipts_and_tariffs(self) -> CarrierConfig:
        if (self.protocol == "smpp") != (self.smpp is not None):
            raise ValueError("the smpp table is required for, and only for, protocol 'smpp'")
        if self.protocol == "smpp" and any(p.short_code is None for p in self.price_points):
            raise ValueError("every premium SMS price point needs a short_code")
        return self

    @field_validator("faults")
    @classmethod
    def _fault_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _FAULT_KEY.match(key):
                raise ValueError(f"fault key {key!r} must be CODE or OPERATION:CODE (operation "
                                 "one of charge, refund, status, balance)")
        return value

    @field_validator("service_paths")
    @classmethod
    def _paths(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if not path.startswith("/"):
                raise ValueError(f"service path {name!r} must start with '/'")
        return value

    def fault_outcome(self, operation: str, code: str) -> str | None:
        """This carrier's own meaning of ``code`` for ``operation``, if it declared one."""
        return self.faults.get(f"{operation}:{code}") or self.faults.get(code)

    @model_validator(mode="after")
    def _smpp_has_no_key(self) -> CarrierConfig:
        if self.protocol == "smpp" and self.promises.deduplicates_by_key != "no":
            raise ValueError("promises.deduplicates_by_key: SMPP carries no idempotency key")
        return self

    @model_validator(mode="after")
    def _callbacks_are_signed(self) -> CarrierConfig:
        # (SMPP receipts come back on our own bound session, not to an HTTP endpoint)
        if (self.interaction == "callback" and self.protocol != "smpp"
                and not self.auth.callback_secret_ref):
            raise ValueError("callback carriers need auth.callback_secret_ref")
        return self

    @field_validator("number_prefixes")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if not prefix.startswith("+") or not prefix[1:].isdigit():
                raise ValueError(f"number prefix {prefix!r} must be '+' and digits")
        return value


def carrier_task_queue(base: str, carrier: CarrierConfig) -> str:
    """The task queue a carrier's charges and refunds run on."""
    return f"{base}.carrier.{carrier.task_queue_group or carrier.id}"


class RegistryFile(_Strict):
    country: CountryConfig
    carriers: list[CarrierConfig] = Field(min_length=1)


class Registry(BaseModel):
    countries: dict[str, CountryConfig]
    carriers: dict[str, CarrierConfig]
    # carrier id -> ISO country code
    carrier_country: dict[str, str]

    def country_of(self, carrier_id: str) -> CountryConfig:
        return self.countries[self.carrier_country[carrier_id]]

    def currency_of(self, carrier_id: str) -> str:
        return self.country_of(carrier_id).currency

    def route(self, msisdn: str) -> CarrierConfig | None:
        """The carrier whose number range holds ``msisdn`` (longest prefix wins)."""
        best: tuple[int, CarrierConfig] | None = None
        for carrier in self.carriers.values():
            for prefix in carrier.number_prefixes:
                if msisdn.startswith(prefix) and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), carrier)
        return best[1] if best else None

    def amount_minor(self, carrier_id: str, price: PricePointConfig) -> int:
        return from_decimal(price.amount, self.currency_of(carrier_id))


def _format_error(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        lines.append(f"{path.name}: {where}: {err['msg']}")
    return "invalid carrier registry:\n  " + "\n  ".join(lines)


def load_registry(directory: Path = REGISTRY_DIR) -> Registry:
    countries: dict[str, CountryConfig] = {}
    carriers: dict[str, CarrierConfig] = {}
    carrier_country: dict[str, str] = {}
    price_ids: set[str] = set()
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise RegistryError(f"no registry files in {directory}")
    for path in files:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise RegistryError(f"{path.name}: not valid TOML: {exc}") from None
        try:
            parsed = RegistryFile.model_validate(data)
        except ValidationError as exc:
            raise RegistryError(_format_error(path, exc)) from None
        code = parsed.country.code
        if code in countries:
            raise RegistryError(f"{path.name}: country {code} is already described by another file")
        countries[code] = parsed.country
        for index, carrier in enumerate(parsed.carriers):
            where = f"{path.name}: carriers.{index}"
            if carrier.id in carriers:
                raise RegistryError(f"{where}.id: carrier {carrier.id!r} is defined twice")
            for p_index, price in enumerate(carrier.price_points):
                if price.id in price_ids:
                    raise RegistryError(
                        f"{where}.price_points.{p_index}.id: price point {price.id!r} is defined twice"
                    )
                price_ids.add(price.id)
                try:
                    from_decimal(price.amount, parsed.country.currency)
                except MoneyError as exc:
                    raise RegistryError(f"{where}.price_points.{p_index}.amount: {exc}") from None
            carriers[carrier.id] = carrier
            carrier_country[carrier.id] = code
    return Registry(countries=countries, carriers=carriers, carrier_country=carrier_country)


@lru_cache(maxsize=1)
def default_registry() -> Registry:
    return load_registry()
