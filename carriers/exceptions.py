"""Parlay X / OneAPI exception ids (ServiceException SVCxxxx, PolicyException POLxxxx) and what
each means for a charge. Shared by the REST and SOAP families, which use the same ids."""

from __future__ import annotations

from carriers.base import Outcome

EXCEPTION_OUTCOMES: dict[str, Outcome] = {
    "POL1000": Outcome.INSUFFICIENT_FUNDS,  # insufficient credit
    "POL1001": Outcome.REJECTED,  # operator spend limit for the period
    "POL1002": Outcome.TRANSIENT,  # too soon after the previous charge
    "POL0253": Outcome.REJECTED,  # user refused
    "POL0001": Outcome.REJECTED,  # generic policy error (barred, blocked service, credentials)
    "SVC0270": Outcome.REJECTED,  # charge not applied
    # generic service error: may follow a debit (gateways send it with 500), so not final
    "SVC0001": Outcome.UNKNOWN,
    "SVC0002": Outcome.REJECTED,  # invalid input
    "SVC0005": Outcome.UNKNOWN,  # correlator already used for another request
}


def outcome_for(message_id: str) -> Outcome:
    """An unlisted policy refusal is final; an unlisted service error is not known to be."""
    known = EXCEPTION_OUTCOMES.get(message_id)
    if known is not None:
        return known
    return Outcome.REJECTED if message_id.startswith("POL") else Outcome.UNKNOWN
