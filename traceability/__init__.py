"""Traceability: every carrier interaction, callback, receipt, SMS, rule decision and ledger
entry indexed into OpenSearch through a transactional outbox (see docs/traceability.md)."""
