"""The gateway's store: idempotency keys, payments and sessions, behind one interface with a module per backend."""
