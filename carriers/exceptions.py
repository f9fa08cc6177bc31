"""Parlay X / OneAPI exception ids (ServiceException SVCxxxx, PolicyException POLxxxx) and what
each means for a charge. Shared by the REST and SOAP families, which use the same ids.

These are the family's defaults only. Carriers of one family give the same id different
meanings and publish their own lists, so each carrier's registry entry may carry ``faults``
(``CODE`` or ``OPERATION:CODE`` -> outcome) and :class:`FaultCodes` reads a code through the
carrier's own list first (the operation's entry, then the plain code), then the family's.
A code found in neither is logged loudly so an operator can add it to the carrier's entry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from carriers.base import Outcome

log = logging.getLogger(__name__)


class _HasFaults(Protocol):
    @property
    def faults(self) -> Mapping[str, str]: ...

# Only ids whose meaning is the same at every carrier we know of are final here: a final
# outcome (rejected, insufficient funds) is never settled, so a wrong one loses or repeats money.
EXCEPTION_OUTCOMES: dict[str, Outcome] = {
    "POL1000": Outcome.INSUFFICIENT_FUNDS,  # insufficient credit
    "POL1001": Outcome.REJECTED,  # operator spend limit for the period
    "POL1002": Outcome.TRANSIENT,  # too soon after the previous charge
    "POL0253": Outcome.REJECTED,  # user refused
    "POL0001": Outcome.REJECTED,  # generic policy error (barred, blocked service, credentials)
    # charge not applied: some carriers mean "insufficient balance" by it (their entries say so)
    "SVC0270": Outcome.REJECTED,
    # generic service error: may follow a debit (gateways send it with 500), so not final
    "SVC0001": Outcome.UNKNOWN,
    "SVC0002": Outcome.REJECTED,  # invalid input
    "SVC0005": Outcome.UNKNOWN,  # correlator already used for another request
}


def family_outcome(message_id: str) -> Outcome | None:
    """The family's meaning of ``message_id``, or ``None`` when the family does not list it.
    (Even an unlisted policy exception is not taken as final: carriers put their own meanings
    behind POL ids, some of them after a debit; the carrier's entry says what its ids mean.)"""
    return EXCEPTION_OUTCOMES.get(message_id)


def outcome_for(message_id: str) -> Outcome:
    """A code nobody listed is unknown: settled, never taken as final."""
    return family_outcome(message_id) or Outcome.UNKNOWN


class FaultCodes:
    """One carrier's reading of fault/error codes: its own ``faults`` over the family's."""

    def __init__(self, carrier_id: str = "", overrides: Mapping[str, str] | None = None) -> None:
        self.carrier_id = carrier_id
        self._overrides = {key: Outcome(value) for key, value in (overrides or {}).items()}

    def declared(self, operation: str, code: str) -> Outcome | None:
        """What the carrier's own list says ``code`` means for ``operation``, if anything."""
        return self._overrides.get(f"{operation}:{code}") or self._overrides.get(code)

    def outcome(self, operation: str, code: str) -> Outcome:
        declared = self.declared(operation, code)
        if declared is not None:
            return declared
        if code not in EXCEPTION_OUTCOMES:
            # neither the carrier nor the family lists it: an operator should find out what the
            # carrier means by it and add it to the carrier's registry entry
            log.warning("carrier %s: %s answered with fault code %r that neither the carrier's "
                        "registry entry nor its family lists", self.carrier_id or "?",
                        operation, code)
        return family_outcome(code) or Outcome.UNKNOWN


def insufficient_funds_code(entry: _HasFaults | None, default: str) -> str:
    """The code a carrier's registry entry declares means "insufficient funds" for a charge
    (what its simulator refuses with), else ``default``."""
    declared = []
    for key, outcome in (entry.faults if entry is not None else {}).items():
        operation, _, code = key.rpartition(":")
        if outcome == "insufficient_funds" and operation in ("", "charge"):
            declared.append(code)
    return min(declared) if declared else default


# the family's defaults alone, for adapters built without a registry entry
FAMILY_DEFAULTS = FaultCodes()
