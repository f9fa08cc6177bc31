"""Per-country, per-carrier and per-product billing rules kept as data (``rules/data``) and
interpreted by pure functions the subscription workflow may call (see README.md)."""
