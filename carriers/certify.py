"""Certifies one carrier's real endpoint (its sandbox) against the adapter contract.

    python -m carriers.certify CARRIER_ID [--base-url URL] [--token-url URL]
                               [--refund-base-url URL] [--assets FILE]
                               [--settle-timeout SECONDS] [--dev-secrets]

The adapter is built from the carrier's registry entry exactly as the worker builds it, with
the carrier's secret from settings (``CB_CARRIER_SECRETS``). The base URL is ``--base-url``, or
the entry's (a ``{sim}``-style entry is resolved through ``CB_SIMULATOR_URLS``).

Only the clauses that are safe on a carrier's sandbox run, chosen by what the entry declares
(``promises``, the adapter's capabilities); nothing uses a simulator's control API, which a real
carrier does not have. What a clause needs from the carrier (a funded number, an unfunded one,
a barred one, a charge that may be refunded) comes from the test-assets file (TOML)::

    funded_msisdn = "+33611000001"       # has credit for a few charges
    unfunded_msisdn = "+33611000002"     # has none
    barred_msisdn = "+33611000003"       # optional: the carrier refuses to bill it
    refundable_charge = "fr-azur-00000012"  # optional: the carrier's reference of a charge
                                         # to funded_msisdn at price_point (used up by a run)
    price_point = "fr-azur-pass-monthly" # optional: default the entry's first

A clause whose asset is missing is "not run": it is not certified, but it is no failure. The
exit status is 0 when no clause failed, 1 when one did, 2 when certification could not start.

``--dev-secrets`` is for a simulator on this machine only (the base URL must be a loopback
address): a secret missing from ``CB_CARRIER_SECRETS`` is then the empty one that a simulator
started without ``CB_CARRIER_SECRETS`` (``python -m simulators.server``) accepts. Without it, a
missing secret stops certification: development secrets are never sent anywhere by default.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import secrets as pysecrets
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from carriers.base import (
    CREDENTIAL_CODES,
    Capability,
    CarrierAdapter,
    ChargeRequest,
    Lookup,
    LookupResult,
    OperationResult,
    Outcome,
    RefundRequest,
    StatusRequest,
)
from carriers.dev_secrets import rsa_private_pem
from carriers.factory import CarrierConfigError, build_adapter, resolve_base_url
from carriers.http import InteractionRecord
from carriers.loader import CarrierConfig, PricePointConfig, Registry, default_registry
from carriers.redaction import redact
from settings import Settings

# what an adapter's carrier_code says when the carrier refused our credentials: HTTP 401/403,
# an OAuth2 token refused, an SMSC refusing the bind (as tests/test_conformance.py)
RAW_ANSWER_CHARS = 600
LOOPBACK_NAMES = {"localhost"}


class CertifyError(RuntimeError):
    """Certification could not start (exit status 2)."""


# -- the test assets ---------------------------------------------------------------------------


class CertifyAssets(BaseModel):
    """What the carrier's sandbox provides for certification; every field is optional, and a
    clause needing one that is missing is reported as not run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    funded_msisdn: str | None = Field(default=None, pattern=r"^\+[0-9]{6,15}$")
    unfunded_msisdn: str | None = Field(default=None, pattern=r"^\+[0-9]{6,15}$")
    barred_msisdn: str | None = Field(default=None, pattern=r"^\+[0-9]{6,15}$")
    # the carrier's reference of an earlier charge to funded_msisdn at price_point
    refundable_charge: str | None = Field(default=None, min_length=1)
    # a price point id of the carrier's entry; default its first
    price_point: str | None = None


def load_assets(path: Path) -> CertifyAssets:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CertifyError(f"assets {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CertifyError(f"assets {path}: not valid TOML: {exc}") from None
    try:
        return CertifyAssets.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        raise CertifyError(f"assets {path.name}: {problems}") from None


# -- the report --------------------------------------------------------------------------------

Status = Literal["pass", "fail", "not run"]


@dataclass
class ClauseResult:
    name: str
    title: str
    status: Status
    detail: str = ""
    # the carrier's answers during the clause, redacted (shown on failure)
    raw: list[str] = field(default_factory=list)


@dataclass
class Report:
    carrier_id: str
    base_url: str
    declared: str
    clauses: list[ClauseResult] = field(default_factory=list)

    def count(self, status: Status) -> int:
        return sum(1 for c in self.clauses if c.status == status)

    @property
    def passed(self) -> int:
        return self.count("pass")

    @property
    def failed(self) -> int:
        return self.count("fail")

    @property
    def not_run(self) -> int:
        return self.count("not run")

    @property
    def total(self) -> int:
        return len(self.clauses)

    @property
    def ok(self) -> bool:
        """No clause failed (clauses not run are not certified, but are no failure)."""
        return self.failed == 0

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def summary(self) -> str:
        return f"certified: {self.passed} of {self.total} clauses passed"

    def lines(self) -> list[str]:
        out = [f"certify {self.carrier_id} at {self.base_url} ({self.declared})"]
        for clause in self.clauses:
            mark = {"pass": "PASS   ", "fail": "FAIL   ", "not run": "NOT RUN"}[clause.status]
            text = f"{mark} {clause.name}: {clause.title}"
            if clause.detail:
                text += f" -- {clause.detail}"
            out.append(text)
            if clause.status == "fail":
                out.extend(f"          carrier answered: {raw}" for raw in clause.raw)
                if not clause.raw:
                    out.append("          carrier answered: (no exchange recorded)")
        out.append(f"{self.failed} failed, {self.not_run} not run (a clause not run is not "
                   "certified but is no failure; the exit status is non-zero only on a failure)")
        out.append(self.summary())
        return out


# -- one run -------------------------------------------------------------------------------------


class _Skip(Exception):
    """The clause cannot run: ``str(exc)`` says what it needs."""


class _Fail(Exception):
    pass


Clause = tuple[str, str, Callable[[], Awaitable[str]]]


class _Run:
    def __init__(self, carrier: CarrierConfig, settings: Settings, assets: CertifyAssets,
                 registry: Registry, settle_timeout: float) -> None:
        self.carrier = carrier
        self.settings = settings
        self.assets = assets
        self.settle_timeout = settle_timeout
        self.records: list[InteractionRecord] = []
        self.secrets = [s.get_secret_value() for s in settings.carrier_secrets.values()]
        self.currency = registry.currency_of(carrier.id)
        self.price = self._price_point(assets.price_point)
        self.amount_minor = registry.amount_minor(carrier.id, self.price)
        self.adapter: CarrierAdapter | None = None
        # the funded charge of the first clause: (key, carrier reference or None)
        self.charged_key: str | None = None
        self.charged_reference: str | None = None

    def _price_point(self, wanted: str | None) -> PricePointConfig:
        if not self.carrier.price_points:
            raise CertifyError(f"carrier {self.carrier.id} has no price points to charge")
        if wanted is None:
            return self.carrier.price_points[0]
        for price in self.carrier.price_points:
            if price.id == wanted:
                return price
        raise CertifyError(f"assets: price_point {wanted!r} is not one of carrier "
                           f"{self.carrier.id}'s")

    async def record(self, record: InteractionRecord) -> None:
        self.records.append(record)

    def build(self, settings: Settings) -> CarrierAdapter:
        if self.carrier.protocol == "smpp":
            raise CertifyError("SMPP carriers cannot be certified yet (a bound session and "
                               "delivery receipts need a submission store)")
        return build_adapter(self.carrier, settings, self.record)

    @property
    def main(self) -> CarrierAdapter:
        assert self.adapter is not None
        return self.adapter

    # -- requests ------------------------------------------------------------------------------

    def key(self, what: str = "c") -> str:
        return f"{self.settings.deployment_id}-cert-{pysecrets.token_hex(8)}-{what}"

    def need(self, name: str) -> str:
        value = getattr(self.assets, name)
        if value is None:
            raise _Skip(f"needs {name} in the assets")
        return str(value)

    def charge_request(self, msisdn: str, key: str) -> ChargeRequest:
        return ChargeRequest(idempotency_key=key, msisdn=msisdn, amount_minor=self.amount_minor,
                             currency=self.currency, description="certification",
                             reference_code="CERT")

    def status_request(self, key: str, msisdn: str, operation: Literal["charge", "refund"] =
                       "charge", original: str | None = None) -> StatusRequest:
        now = datetime.now(UTC)
        return StatusRequest(idempotency_key=key, msisdn=msisdn, operation=operation,
                             original_carrier_reference=original, sent_at=now,
                             last_sent_at=now)

    async def settle(self, result: OperationResult, key: str, msisdn: str,
                     operation: Literal["charge", "refund"] = "charge",
                     original: str | None = None) -> OperationResult:
        """A pending (or unknown) answer settled by look-ups, as the workflow does, within the
        settle timeout. A carrier without a look-up cannot be settled here: its pending
        answer stays (certify has no callback receiver)."""
        delay = 0.2
        deadline = time.monotonic() + self.settle_timeout
        last = ""
        while result.outcome in (Outcome.PENDING, Outcome.UNKNOWN):
            if not self.carrier.promises.status_lookup:
                raise _Fail(f"answered {describe(result)} and the carrier has no look-up to "
                            "settle it by")
            if time.monotonic() >= deadline:
                raise _Fail(f"still {describe(result)} after {self.settle_timeout:g} s of "
                            f"look-ups{'; last look-up ' + last if last else ''}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            looked_up = await self.main.status(
                self.status_request(key, msisdn, operation, original))
            if looked_up.lookup is Lookup.FOUND and looked_up.found is not None:
                result = looked_up.found
            else:
                last = describe_lookup(looked_up)
        return result

    # -- the clauses ---------------------------------------------------------------------------

    def clauses(self) -> list[Clause]:
        """The clauses this carrier's declarations call for, in the order they run."""
        carrier = self.carrier
        chosen: list[Clause] = [("charge", "a charge to the funded number succeeds",
                                 self.charge_funded)]
        dedup = carrier.promises.deduplicates_by_key
        locally = type(self.main).deduplicates_locally
        if dedup == "replay" and not locally:
            chosen.append(("repeat-replay", "a repeat of the key answers the first result, "
                           "same reference", self.repeat_replay))
        elif dedup == "error" and not locally:
            chosen.append(("repeat-error", "a repeat of the key is refused as a repeat, and "
                           "the look-up finds the first charge", self.repeat_error))
        if carrier.promises.status_lookup:
            chosen.append(("lookup-charged", "a look-up of the charged key finds it, "
                           "succeeded, same reference", self.lookup_charged))
            chosen.append(("lookup-unknown", "a look-up of a key never sent is NOT_FOUND",
                           self.lookup_unknown))
        else:
            chosen.append(("lookup-charged", "no look-up declared: a look-up of the charged "
                           "key is FAILED, never NOT_FOUND", self.lookup_charged_fails))
            chosen.append(("lookup-unknown", "no look-up declared: a look-up of a key never "
                           "sent is FAILED, never NOT_FOUND", self.lookup_unknown_fails))
        chosen.append(("insufficient-funds", "a charge to the unfunded number is "
                       "insufficient_funds", self.insufficient_funds))
        chosen.append(("barred", "a charge to the barred number is rejected", self.barred))
        if self.main.supports(Capability.REFUND):
            chosen.append(("refund", "a refund of the refundable charge succeeds",
                           self.refund))
        chosen.append(("bad-credentials", "a charge with wrong credentials is transient with a "
                       "credential code, and debits nothing", self.bad_credentials))
        if self.main.supports(Capability.BALANCE):
            chosen.append(("balance", "the funded number's balance is answered in the "
                           "carrier's currency", self.balance))
        return chosen

    async def charge_funded(self) -> str:
        msisdn = self.need("funded_msisdn")
        key = self.key()
        self.charged_key = key
        result = await self.settle(await self.main.charge(self.charge_request(msisdn, key)),
                                   key, msisdn)
        if result.outcome is not Outcome.SUCCEEDED:
            raise _Fail(f"answered {describe(result)}")
        if not result.carrier_reference:
            raise _Fail("succeeded without a carrier reference")
        self.charged_reference = result.carrier_reference
        return f"reference {result.carrier_reference}"

    def need_charge(self) -> tuple[str, str]:
        if self.charged_key is None or self.charged_reference is None:
            raise _Skip("needs the funded charge to have succeeded")
        return self.charged_key, self.charged_reference

    async def repeat_replay(self) -> str:
        key, reference = self.need_charge()
        msisdn = self.need("funded_msisdn")
        again = await self.settle(await self.main.charge(self.charge_request(msisdn, key)),
                                  key, msisdn)
        if again.outcome is not Outcome.SUCCEEDED or again.carrier_reference != reference:
            raise _Fail(f"expected succeeded with reference {reference}, answered "
                        f"{describe(again)}")
        return "same answer, same reference (no second debit is visible only by look-up)"

    async def repeat_error(self) -> str:
        key, reference = self.need_charge()
        msisdn = self.need("funded_msisdn")
        again = await self.main.charge(self.charge_request(msisdn, key))
        if again.outcome is not Outcome.UNKNOWN:
            raise _Fail(f"expected a refusal as a repeat (unknown), answered {describe(again)}")
        looked_up = await self.main.status(self.status_request(key, msisdn))
        if looked_up.lookup is not Lookup.FOUND or looked_up.found is None:
            raise _Fail(f"the look-up after the refused repeat: {describe_lookup(looked_up)}")
        settled = await self.settle(looked_up.found, key, msisdn)
        if settled.outcome is not Outcome.SUCCEEDED or settled.carrier_reference != reference:
            raise _Fail(f"the look-up found {describe(settled)}, expected succeeded with "
                        f"reference {reference}")
        return f"refused ({again.carrier_code or again.message}), look-up finds {reference}"

    async def lookup_charged(self) -> str:
        key, reference = self.need_charge()
        looked_up = await self.main.status(self.status_request(key, self.need("funded_msisdn")))
        found = looked_up.found
        if looked_up.lookup is not Lookup.FOUND or found is None:
            raise _Fail(describe_lookup(looked_up))
        if found.outcome is not Outcome.SUCCEEDED or found.carrier_reference != reference:
            raise _Fail(f"found {describe(found)}, expected succeeded with reference {reference}")
        return f"found {reference}"

    async def lookup_charged_fails(self) -> str:
        if self.charged_key is None:
            raise _Skip("needs the funded charge to have been sent")
        looked_up = await self.main.status(
            self.status_request(self.charged_key, self.need("funded_msisdn")))
        if looked_up.lookup is not Lookup.FAILED:
            raise _Fail(f"expected FAILED, got {describe_lookup(looked_up)}")
        return "FAILED"

    async def lookup_unknown(self) -> str:
        looked_up = await self.main.status(
            self.status_request(self.key("never-sent"), self.need("funded_msisdn")))
        if looked_up.lookup is not Lookup.NOT_FOUND:
            raise _Fail(f"expected NOT_FOUND, got {describe_lookup(looked_up)}")
        return "NOT_FOUND"

    async def lookup_unknown_fails(self) -> str:
        looked_up = await self.main.status(
            self.status_request(self.key("never-sent"), self.need("funded_msisdn")))
        if looked_up.lookup is not Lookup.FAILED:
            raise _Fail(f"expected FAILED, got {describe_lookup(looked_up)}")
        return "FAILED"

    async def _charge_expecting(self, asset: str, expected: Outcome) -> str:
        msisdn = self.need(asset)
        key = self.key()
        result = await self.settle(await self.main.charge(self.charge_request(msisdn, key)),
                                   key, msisdn)
        if result.outcome is not expected:
            raise _Fail(f"expected {expected.value}, answered {describe(result)}")
        return describe(result)

    async def insufficient_funds(self) -> str:
        return await self._charge_expecting("unfunded_msisdn", Outcome.INSUFFICIENT_FUNDS)

    async def barred(self) -> str:
        return await self._charge_expecting("barred_msisdn", Outcome.REJECTED)

    async def refund(self) -> str:
        original = self.need("refundable_charge")
        msisdn = self.need("funded_msisdn")
        key = self.key("r")
        request = RefundRequest(idempotency_key=key, msisdn=msisdn,
                                amount_minor=self.amount_minor, currency=self.currency,
                                description="certification refund", reference_code="CERTR",
                                original_carrier_reference=original)
        result = await self.settle(await self.main.refund(request), key, msisdn, "refund",
                                   original)
        if result.outcome is not Outcome.SUCCEEDED:
            raise _Fail(f"expected succeeded, answered {describe(result)}")
        return f"refunded {original}" + (f" as {result.carrier_reference}"
                                          if result.carrier_reference else "")

    async def bad_credentials(self) -> str:
        msisdn = self.need("funded_msisdn")
        ref = self.carrier.auth.secret_ref
        wrong = (rsa_private_pem() if self.carrier.auth.kind == "jwt-rs256"
                 else "wrong" + pysecrets.token_hex(2))
        secrets = dict(self.settings.carrier_secrets)
        secrets[ref] = SecretStr(wrong)
        self.secrets.append(wrong)
        adapter = self.build(self.settings.model_copy(update={"carrier_secrets": secrets}))
        key = self.key()
        try:
            result = await adapter.charge(self.charge_request(msisdn, key))
        finally:
            await adapter.aclose()
        if result.outcome is not Outcome.TRANSIENT or result.carrier_code not in CREDENTIAL_CODES:
            raise _Fail(f"expected transient with a credential code "
                        f"({', '.join(sorted(CREDENTIAL_CODES))}), answered {describe(result)}")
        refused = f"transient ({result.carrier_code})"
        if not self.carrier.promises.status_lookup:
            return f"{refused}; no debit is not observable (no look-up)"
        looked_up = await self.main.status(self.status_request(key, msisdn))
        if looked_up.lookup is Lookup.FOUND:
            raise _Fail(f"{refused}, yet the look-up finds the charge: {describe_lookup(looked_up)}")
        if looked_up.lookup is Lookup.NOT_FOUND:
            return f"{refused}; the look-up does not find it: no debit"
        return f"{refused}; no debit not confirmed (look-up {describe_lookup(looked_up)})"

    async def balance(self) -> str:
        answered = await self.main.balance(self.need("funded_msisdn"), self.currency)
        if answered.outcome is not Outcome.SUCCEEDED or answered.currency != self.currency:
            raise _Fail(f"expected succeeded in {self.currency}, answered "
                        f"{answered.outcome.value} {answered.currency or ''} {answered.message}")
        return f"{answered.amount_minor} minor units of {answered.currency}"

    # -- running -------------------------------------------------------------------------------

    def raw_answers(self, since: int) -> list[str]:
        answers = []
        for record in self.records[since:][-3:]:
            answer = (record.response_body or record.error or "").strip().replace("\n", " ")
            if len(answer) > RAW_ANSWER_CHARS:
                answer = answer[:RAW_ANSWER_CHARS] + " ..."
            answers.append(redact(
                f"{record.operation} {record.method} {record.url} -> "
                f"{record.status_code if record.status_code is not None else 'no answer'}: "
                f"{answer}", self.secrets))
        return answers

    async def run_clause(self, name: str, title: str, clause: Callable[[], Awaitable[str]]
                         ) -> ClauseResult:
        since = len(self.records)
        try:
            detail = await clause()
        except _Skip as exc:
            return ClauseResult(name, title, "not run", str(exc))
        except _Fail as exc:
            return ClauseResult(name, title, "fail", redact(str(exc), self.secrets),
                                self.raw_answers(since))
        except (CertifyError, CarrierConfigError):
            raise
        except Exception as exc:  # an adapter that raises fails the clause, not the run
            return ClauseResult(name, title, "fail",
                                redact(f"raised {type(exc).__name__}: {exc}", self.secrets),
                                self.raw_answers(since))
        return ClauseResult(name, title, "pass", redact(detail, self.secrets))


def describe(result: OperationResult) -> str:
    parts = [result.outcome.value]
    if result.carrier_code:
        parts.append(f"code {result.carrier_code}")
    if result.carrier_reference:
        parts.append(f"reference {result.carrier_reference}")
    if result.message:
        parts.append(repr(result.message))
    return " ".join(parts)


def describe_lookup(looked_up: LookupResult) -> str:
    if looked_up.found is not None:
        return f"FOUND {describe(looked_up.found)}"
    text = looked_up.lookup.value.upper()
    if looked_up.carrier_code:
        text += f" code {looked_up.carrier_code}"
    if looked_up.message:
        text += f" {looked_up.message!r}"
    return text


def declarations(carrier: CarrierConfig) -> str:
    promises = carrier.promises
    return (f"{carrier.protocol}, {carrier.interaction}; deduplicates_by_key="
            f"{promises.deduplicates_by_key}, status_lookup={str(promises.status_lookup).lower()}")


def with_endpoint(carrier: CarrierConfig, base_url: str | None,
                  token_url: str | None = None,
                  refund_base_url: str | None = None) -> CarrierConfig:
    """The entry with its base URL (OAuth2 token URL, separate refund API) replaced, when
    given."""
    update: dict[str, object] = {}
    if base_url is not None:
        update["base_url"] = base_url.rstrip("/")
    if refund_base_url is not None:
        update["refund_base_url"] = refund_base_url.rstrip("/")
    if token_url is not None:
        if carrier.auth.kind != "oauth2":
            raise CertifyError(f"carrier {carrier.id}: --token-url is for oauth2 carriers only")
        update["auth"] = carrier.auth.model_copy(update={"token_url": token_url})
    return carrier.model_copy(update=update) if update else carrier


async def certify(carrier: CarrierConfig, settings: Settings, assets: CertifyAssets,
                  base_url: str | None = None, *, token_url: str | None = None,
                  refund_base_url: str | None = None, registry: Registry | None = None,
                  settle_timeout: float = 60.0) -> Report:
    """Runs the clauses the carrier's declarations call for against its endpoint: ``base_url``
    (default the entry's, resolved through ``settings.simulator_urls``), with the secrets in
    ``settings``. Raises ``CertifyError`` or ``CarrierConfigError`` if it cannot start."""
    entry = with_endpoint(carrier, base_url, token_url, refund_base_url)
    resolved = resolve_base_url(entry, settings)
    run = _Run(entry, settings, assets, registry or default_registry(), settle_timeout)
    run.adapter = run.build(settings)
    report = Report(entry.id, resolved, declarations(entry))
    try:
        for name, title, clause in run.clauses():
            report.clauses.append(await run.run_clause(name, title, clause))
    finally:
        await run.main.aclose()
    return report


# -- the command -----------------------------------------------------------------------------


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dev_settings(carrier: CarrierConfig, settings: Settings) -> Settings:
    """--dev-secrets: a secret not in CB_CARRIER_SECRETS is the empty one a local simulator
    started without CB_CARRIER_SECRETS accepts. Only ever sent to a loopback address."""
    urls = [resolve_base_url(carrier, settings)]
    for other in (carrier.auth.token_url, carrier.refund_base_url):
        if other is not None:
            urls.append(other.format(**settings.simulator_urls))
    for url in urls:
        if not is_loopback(url):
            raise CertifyError(f"--dev-secrets is for a simulator on this machine: {url} is "
                               "not a loopback address")
    secrets = dict(settings.carrier_secrets)
    for ref in (carrier.auth.secret_ref, carrier.auth.callback_secret_ref):
        if ref:
            secrets.setdefault(ref, SecretStr(""))
    return settings.model_copy(update={"carrier_secrets": secrets})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m carriers.certify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("carrier_id")
    parser.add_argument("--base-url", help="the carrier's endpoint (default: the entry's)")
    parser.add_argument("--token-url", help="oauth2: the token endpoint (default: the entry's)")
    parser.add_argument("--refund-base-url",
                        help="a separate refund API (CAMARA; default: the entry's)")
    parser.add_argument("--assets", type=Path, help="the test-assets TOML file")
    parser.add_argument("--settle-timeout", type=float, default=60.0,
                        help="seconds of look-ups to settle a pending answer (default 60)")
    parser.add_argument("--dev-secrets", action="store_true",
                        help="local simulator only: a secret missing from CB_CARRIER_SECRETS "
                             "is the empty one")
    args = parser.parse_args(argv)
    try:
        registry = default_registry()
        carrier = registry.carriers.get(args.carrier_id)
        if carrier is None:
            raise CertifyError(f"no carrier {args.carrier_id!r} in the registry")
        settings = Settings()
        assets = load_assets(args.assets) if args.assets is not None else CertifyAssets()
        if args.dev_secrets:
            settings = dev_settings(with_endpoint(carrier, args.base_url, args.token_url,
                                                  args.refund_base_url), settings)
        report = asyncio.run(certify(carrier, settings, assets, args.base_url,
                                     token_url=args.token_url,
                                     refund_base_url=args.refund_base_url, registry=registry,
                                     settle_timeout=args.settle_timeout))
    except (CertifyError, CarrierConfigError) as exc:
        print(f"certify: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
