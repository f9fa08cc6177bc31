"""Results carriers push to us (callbacks, delivery receipts) once they are verified, and the
error for a push that is not genuine. Shared by the receiver, the relay and the adapters."""

from __future__ import annotations

from dataclasses import dataclass


class CallbackRejected(ValueError):
    """A pushed result that is not genuine (bad signature, wrong credential, malformed)."""


@dataclass
class CarrierReport:
    """A result the carrier pushed to us, relayed to the waiting workflow by a signal. It names
    the carrier it came from: a report is only ever taken for that carrier's own operation."""

    idempotency_key: str
    outcome: str
    carrier_reference: str | None = None
    carrier_code: str | None = None
    message: str = ""
    carrier_id: str = ""
