"""Valid MSISDNs inside a carrier's number ranges, for the demo, benchmarks and tests."""

from __future__ import annotations

import random

import phonenumbers

from carriers.loader import CarrierConfig, Registry


def sample_msisdn(carrier: CarrierConfig, registry: Registry, rng: random.Random,
                  taken: set[str] | None = None) -> str:
    """A valid E.164 number that routes to ``carrier`` and is not in ``taken`` (then added)."""
    taken = taken if taken is not None else set()
    region = registry.carrier_country[carrier.id]
    example = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
    length = len(str(example.national_number)) if example else 9
    calling_code = str(phonenumbers.country_code_for_region(region))
    for _ in range(10_000):
        prefix = rng.choice(carrier.number_prefixes)
        national_prefix = prefix[1 + len(calling_code):]
        digits = "".join(rng.choice("0123456789") for _ in range(length - len(national_prefix)))
        candidate = prefix + digits
        if (candidate not in taken
                and phonenumbers.is_valid_number(phonenumbers.parse(candidate, None))
                and registry.route(candidate) is carrier):
            taken.add(candidate)
            return candidate
    raise ValueError(f"no valid number found in the ranges of {carrier.id}")
