"""`make chaos`: the real stack (Temporal dev server, PostgreSQL, carrier simulators, callback
receiver, worker) billing short-interval subscriptions while carriers misbehave and processes
are killed; after every phase the carriers' books are checked against our ledger and operation
records: no key debited twice, no debit without a ledger row or an unsettled record."""
