"""How an operation whose first answer was lost or pending is settled: by a result the carrier
pushed, by a look-up, and only as a last resort by sending the same request again.

The rules assume nothing a carrier has not declared (``CarrierPromises`` in the registry):

* a pushed success with a reference is taken as it is;
* a pushed failure would let the workflow charge again under a new key, so where the carrier
  has a look-up it is confirmed there first;
* a look-up that finds the operation answers; one that fails says nothing (unknown);
* only "not found" from a carrier that deduplicates our key allows one more send, and a
  carrier with no look-up is sent again only if it deduplicates; and even then only when the
  carrier has never acknowledged the operation (no reference, no pushed result) and the last
  send is older than the time the carrier takes to show what it took (the caller decides:
  ``resend`` is None with a reason otherwise);
* a refusal of that resend (busy, throttled) says nothing about the first send: unknown;
* everything else is unknown: the workflow waits and asks again, then leaves it unsettled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from carriers.base import (
    Capability,
    CarrierAdapter,
    Lookup,
    OperationResult,
    Outcome,
    StatusRequest,
)
from carriers.loader import CarrierPromises
from carriers.reports import CarrierReport

FINAL = {Outcome.SUCCEEDED, Outcome.INSUFFICIENT_FUNDS, Outcome.REJECTED}
NEGATIVE = {Outcome.INSUFFICIENT_FUNDS, Outcome.REJECTED}


@dataclass(frozen=True)
class CarrierTerms:
    """What settling may rely on for one carrier."""

    status_lookup: bool
    deduplicates: bool
    # how long after a send a "not found" still means nothing (the carrier may not show yet)
    visible_within_seconds: float = 300.0

    @classmethod
    def of(cls, adapter: CarrierAdapter, promises: CarrierPromises) -> CarrierTerms:
        return cls(
            status_lookup=promises.status_lookup and adapter.supports(Capability.STATUS),
            deduplicates=(promises.deduplicates_by_key != "no"
                          or adapter.deduplicates_locally),
            visible_within_seconds=promises.visible_within_seconds,
        )


def unknown(message: str, code: str | None = None) -> OperationResult:
    return OperationResult(outcome=Outcome.UNKNOWN, message=message, carrier_code=code)


async def settle(
    adapter: CarrierAdapter,
    terms: CarrierTerms,
    lookup: StatusRequest,
    reported: CarrierReport | None,
    resend: Callable[[], Awaitable[OperationResult]] | None,
    held: str = "this settlement never sends",
) -> OperationResult:
    """The operation's result as far as it can be known now. ``resend`` claims the operation
    for one more send and sends it; None (``held`` says why) never sends."""
    if reported is not None:
        outcome = Outcome(reported.outcome)
        if outcome is Outcome.SUCCEEDED and reported.carrier_reference:
            return OperationResult(outcome=outcome, carrier_reference=reported.carrier_reference,
                                   carrier_code=reported.carrier_code, message=reported.message)
        if outcome in NEGATIVE:
            if not terms.status_lookup:
                return OperationResult(outcome=outcome, carrier_code=reported.carrier_code,
                                       message=reported.message)
            found = await adapter.status(lookup)
            if (found.lookup is Lookup.FOUND and found.found is not None
                    and found.found.outcome in FINAL):
                return found.found
            return unknown(f"reported {outcome.value} not confirmed by look-up "
                           f"({found.lookup.value}: {found.message})".strip(),
                           reported.carrier_code)
    if terms.status_lookup:
        found = await adapter.status(lookup)
        if found.lookup is Lookup.FOUND and found.found is not None:
            return found.found
        if found.lookup is Lookup.FAILED:
            return unknown(f"look-up failed: {found.message}", found.carrier_code)
        # not found: the request never took effect, or the carrier has not committed it yet
        why = "not found"
    else:
        why = "no look-up at this carrier"
    if not terms.deduplicates:
        return unknown(f"{why}, and it does not deduplicate our key: not resent; waiting for "
                       "its result")
    if resend is None:
        return unknown(f"{why}; not resent: {held}")
    return await _resent(resend)


async def _resent(resend: Callable[[], Awaitable[OperationResult]]) -> OperationResult:
    result = await resend()
    if result.outcome is Outcome.TRANSIENT:
        # the carrier refused the repeat; the first send is as unknown as before
        return unknown(f"resend refused ({result.carrier_code or 'busy'}): the earlier send "
                       "is still unknown", result.carrier_code)
    return result
