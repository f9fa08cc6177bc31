"""Inputs and outputs of the delivery activities: one dataclass each, so fields can be added
safely."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DeliveryInput:
    subscription_id: int
    subscriber_id: int
    cycle: int
    # the charge's idempotency key + "-d" (``delivery_key``): the game backend's grant id
    idempotency_key: str
    product_id: str
    country_code: str | None
    locale: str | None
    price_point_id: str | None
    # what a partial payment bought; None: the whole period of the price point
    service_seconds: int | None
    paid_minor: int
    currency: str


@dataclass
class DeliveryOutput:
    delivered: bool
    variant_id: str | None
    entitlement_id: str | None = None
    # why nothing was delivered (the backend's code, e.g. "account_closed")
    reason: str | None = None
    # nothing was and nothing will be delivered for this payment: refund it
    permanent: bool = False


@dataclass
class RevokeInput:
    # the delivery's idempotency key (its grant id)
    idempotency_key: str
    reason: str


@dataclass
class RevokeOutput:
    # an entitlement the backend held is now revoked
    revoked: bool
    entitlement_id: str | None = None
    # why nothing needed revoking ("never_granted")
    reason: str | None = None


def delivery_key(charge_key: str) -> str:
    return f"{charge_key}-d"
