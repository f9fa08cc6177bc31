"""Builds the adapter for a registry entry: protocol module + transport + auth from settings."""

from __future__ import annotations

import importlib
from typing import Any

import httpx

from carriers.auth import HmacRequestSigner, JwtBodySigner, OAuth2ClientCredentials
from carriers.base import Capability, CarrierAdapter
from carriers.callback_aggregator import CallbackAggregatorAdapter
from carriers.camara import CamaraAdapter
from carriers.exceptions import FaultCodes
from carriers.http import HttpTransport, InteractionSink
from carriers.loader import CarrierConfig
from carriers.oneapi import OneApiAdapter
from carriers.parlayx import ParlayXAdapter
from carriers.parlayx import service_paths as parlayx_service_paths
from carriers.polling_aggregator import PollingAggregatorAdapter
from carriers.smpp import ReceiptSink, SmppAdapter
from models.smpp_store import SubmissionStore
from settings import Settings


class CarrierConfigError(RuntimeError):
    pass


def carrier_secret(carrier: CarrierConfig, settings: Settings) -> str:
    secret = settings.carrier_secrets.get(carrier.auth.secret_ref)
    if secret is None:
        raise CarrierConfigError(
            f"carrier {carrier.id} needs secret {carrier.auth.secret_ref!r}: "
            "set it in CB_CARRIER_SECRETS"
        )
    return secret.get_secret_value()


def resolve_base_url(carrier: CarrierConfig, settings: Settings) -> str:
    return _resolve(carrier, carrier.base_url, settings)


def _resolve(carrier: CarrierConfig, address: str, settings: Settings) -> str:
    """An address from the registry, its ``{name}`` placeholders filled from settings."""
    try:
        return address.format(**settings.simulator_urls)
    except KeyError as exc:
        raise CarrierConfigError(
            f"carrier {carrier.id}: an address names {exc} which is not in CB_SIMULATOR_URLS"
        ) from None


FAMILIES: dict[str, type[CarrierAdapter]] = {
    "oneapi": OneApiAdapter,
    "parlayx": ParlayXAdapter,
    "camara": CamaraAdapter,
    "polling-aggregator": PollingAggregatorAdapter,
    "callback-aggregator": CallbackAggregatorAdapter,
    "smpp": SmppAdapter,
}


def adapter_class(carrier: CarrierConfig) -> type[CarrierAdapter]:
    """The family's adapter, or the carrier's own subclass of it (registry ``adapter``)."""
    family = FAMILIES[carrier.protocol]
    if carrier.adapter is None:
        return family
    module_name, _, class_name = carrier.adapter.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise CarrierConfigError(f"carrier {carrier.id}: adapter {carrier.adapter!r}: {exc}") \
            from None
    if not (isinstance(cls, type) and issubclass(cls, family)):
        raise CarrierConfigError(f"carrier {carrier.id}: {carrier.adapter} must subclass "
                                 f"{family.__name__}")
    return cls


def _http_auth(carrier: CarrierConfig, settings: Settings, secret: str) -> httpx.Auth | None:
    kind = carrier.auth.kind
    if kind == "jwt-rs256":
        try:
            return JwtBodySigner(carrier.auth.username, secret)
        except ValueError as exc:
            raise CarrierConfigError(f"carrier {carrier.id}: {exc}") from None
    if kind in ("wsse", "parlayx-header"):
        return None  # SOAP-level: the adapter puts credentials in the envelope
    if kind == "hmac":
        return HmacRequestSigner(carrier.auth.username, secret)
    if kind == "oauth2":
        assert carrier.auth.token_url is not None
        token_url = carrier.auth.token_url.format(**settings.simulator_urls)
        return OAuth2ClientCredentials(token_url, carrier.auth.username, secret)
    return httpx.BasicAuth(carrier.auth.username, secret)


def build_adapter(
    carrier: CarrierConfig,
    settings: Settings,
    sink: InteractionSink,
    *,
    smpp_store: SubmissionStore | None = None,
    receipts: ReceiptSink | None = None,
) -> CarrierAdapter:
    secret = carrier_secret(carrier, settings)
    cls: Any = adapter_class(carrier)
    callback_url = f"{settings.callback_base_url}/callbacks/{carrier.id}"
    timeout = min(carrier.timeout_seconds, settings.carrier_timeout_seconds)
    if carrier.protocol == "smpp":
        if len(secret) > 8:
            raise CarrierConfigError(f"carrier {carrier.id}: an SMPP password has at most 8 "
                                     "characters")
        if smpp_store is None or receipts is None:
            raise CarrierConfigError(f"carrier {carrier.id}: SMPP needs a submission store and "
                                     "a receipt relay")
        return check_promises(carrier, cls(
            carrier, resolve_base_url(carrier, settings), secret, smpp_store, receipts, sink,
            carrier.locale, timeout_seconds=timeout))
    if carrier.protocol == "parlayx":
        try:  # before any connection pool exists
            parlayx_service_paths(carrier.service_paths)
        except ValueError as exc:
            raise CarrierConfigError(f"carrier {carrier.id}: service_paths: {exc}") from None
    callback_secret = settings.carrier_secrets.get(carrier.auth.callback_secret_ref or "")
    transport = HttpTransport(
        carrier_id=carrier.id,
        base_url=resolve_base_url(carrier, settings),
        auth=_http_auth(carrier, settings, secret),
        timeout_seconds=timeout,
        # the callback secret travels in CAMARA request bodies (sinkCredential): keep it out too
        secrets=[secret] + ([callback_secret.get_secret_value()] if callback_secret else []),
        sink=sink,
    )
    adapter: CarrierAdapter
    # the carrier's own meanings of its fault codes, over its family's defaults
    faults = FaultCodes(carrier.id, carrier.faults)
    if carrier.protocol == "oneapi":
        adapter = cls(transport, form_encoded=carrier.request_format == "form", faults=faults)
    elif carrier.protocol == "parlayx":
        adapter = cls(transport, carrier.auth.kind, carrier.auth.username, secret,
                      password_type=carrier.auth.password_type, paths=carrier.service_paths,
                      faults=faults)
    elif carrier.protocol == "camara":
        if callback_secret is None:
            raise CarrierConfigError(f"carrier {carrier.id} needs secret "
                                     f"{carrier.auth.callback_secret_ref!r} for its sink")
        refund_base_url = (_resolve(carrier, carrier.refund_base_url, settings)
                           if carrier.refund_base_url else None)
        try:
            adapter = cls(transport, callback_url, callback_secret.get_secret_value(),
                          refund_base_url)
        except ValueError as exc:  # e.g. a sink that is not https
            raise CarrierConfigError(f"carrier {carrier.id}: {exc}") from None
    elif carrier.protocol == "callback-aggregator":
        adapter = cls(transport, callback_url)
    else:
        adapter = cls(transport)
    return check_promises(carrier, adapter)


def check_promises(carrier: CarrierConfig, adapter: CarrierAdapter) -> CarrierAdapter:
    """A promise the adapter cannot keep is a configuration error, found at start-up."""
    if carrier.promises.status_lookup and not adapter.supports(Capability.STATUS):
        raise CarrierConfigError(f"carrier {carrier.id} promises a status look-up, but its "
                                 f"adapter {type(adapter).__name__} has none")
    return adapter
