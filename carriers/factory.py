"""Builds the adapter for a registry entry: protocol module + transport + auth from settings."""

from __future__ import annotations

import httpx

from carriers.auth import HmacRequestSigner, JwtBodySigner, OAuth2ClientCredentials
from carriers.base import CarrierAdapter
from carriers.callback_aggregator import CallbackAggregatorAdapter
from carriers.camara import CamaraAdapter
from carriers.http import HttpTransport, InteractionSink
from carriers.loader import CarrierConfig
from carriers.oneapi import OneApiAdapter
from carriers.parlayx import ParlayXAdapter
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
    try:
        return carrier.base_url.format(**settings.simulator_urls)
    except KeyError as exc:
        raise CarrierConfigError(
            f"carrier {carrier.id}: base_url names {exc} which is not in CB_SIMULATOR_URLS"
        ) from None


def build_adapter(
    carrier: CarrierConfig,
    settings: Settings,
    sink: InteractionSink,
    *,
    smpp_store: SubmissionStore | None = None,
    receipts: ReceiptSink | None = None,
) -> CarrierAdapter:
    secret = carrier_secret(carrier, settings)
    if carrier.protocol == "smpp":
        if len(secret) > 8:
            raise CarrierConfigError(f"carrier {carrier.id}: an SMPP password has at most 8 "
                                     "characters")
        if smpp_store is None or receipts is None:
            raise CarrierConfigError(f"carrier {carrier.id}: SMPP needs a submission store and "
                                     "a receipt relay")
        return SmppAdapter(carrier, resolve_base_url(carrier, settings), secret, smpp_store,
                           receipts, sink, carrier.locale,
                           timeout_seconds=min(carrier.timeout_seconds,
                                               settings.carrier_timeout_seconds))
    auth: httpx.Auth | None
    if carrier.auth.kind == "jwt-rs256":
        try:
            auth = JwtBodySigner(carrier.auth.username, secret)
        except ValueError as exc:
            raise CarrierConfigError(f"carrier {carrier.id}: {exc}") from None
    elif carrier.auth.kind in ("wsse", "parlayx-header"):
        auth = None  # SOAP-level: the adapter puts credentials in the envelope
    elif carrier.auth.kind == "hmac":
        auth = HmacRequestSigner(carrier.auth.username, secret)
    elif carrier.auth.kind == "oauth2":
        assert carrier.auth.token_url is not None
        token_url = carrier.auth.token_url.format(**settings.simulator_urls)
        auth = OAuth2ClientCredentials(token_url, carrier.auth.username, secret)
    else:
        auth = httpx.BasicAuth(carrier.auth.username, secret)
    transport = HttpTransport(
        carrier_id=carrier.id,
        base_url=resolve_base_url(carrier, settings),
        auth=auth,
        timeout_seconds=min(carrier.timeout_seconds, settings.carrier_timeout_seconds),
        secrets=[secret],
        sink=sink,
    )
    if carrier.protocol == "oneapi":
        return OneApiAdapter(transport, form_encoded=carrier.request_format == "form")
    if carrier.protocol == "parlayx":
        return ParlayXAdapter(transport, carrier.auth.kind, carrier.auth.username, secret)
    if carrier.protocol == "polling-aggregator":
        return PollingAggregatorAdapter(transport)
    if carrier.protocol == "camara":
        assert carrier.auth.callback_secret_ref is not None
        sink_token = settings.carrier_secrets.get(carrier.auth.callback_secret_ref)
        if sink_token is None:
            raise CarrierConfigError(f"carrier {carrier.id} needs secret "
                                     f"{carrier.auth.callback_secret_ref!r} for its sink")
        return CamaraAdapter(transport, f"{settings.callback_base_url}/callbacks/{carrier.id}",
                             sink_token.get_secret_value())
    if carrier.protocol == "callback-aggregator":
        callback_url = f"{settings.callback_base_url}/callbacks/{carrier.id}"
        return CallbackAggregatorAdapter(transport, callback_url)
    raise CarrierConfigError(f"carrier {carrier.id}: unknown protocol {carrier.protocol!r}")
