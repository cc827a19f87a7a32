"""The gateway's store: idempotency keys, payments and sessions, behind one interface with a module per backend.

- `interface.GatewayStore` — what the gateway needs (the seam); `records` — what it hands out.
- `sqlite` — the embedded default: one file in --data-dir, shared by gateways on that directory.
- `postgres` — shared by gateway replicas on several machines (CONTRACT §9); its driver is imported only then.
- `spec` — which store a `--store` value names, and opening it.
"""
