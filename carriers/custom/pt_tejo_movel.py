"""Tejo Móvel: the oneapi family's adapter, for this carrier's differences.

Its gateway refuses a charge without ``chargingMetaData`` naming the service it was onboarded
as and a purchase category; everything else is plain OneAPI.
"""

from typing import Any

from carriers.base import ChargeRequest
from carriers.oneapi import OneApiAdapter

SERVICE_ID = "GAMES-PT-0042"


class PtTejoMovelAdapter(OneApiAdapter):
    def charge_body(self, request: ChargeRequest) -> dict[str, Any]:
        body = super().charge_body(request)
        body["amountTransaction"]["paymentAmount"]["chargingMetaData"] = {
            "serviceId": SERVICE_ID, "purchaseCategoryCode": "Game"}
        return body
