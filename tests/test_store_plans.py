"""Every statement on the hot path of the gateway's store reads or writes by an index, never by a scan.

Regression: decide/finish/release once located their key row by `payment_id`, which has no index, so every
payment scanned the whole key table — the gateway slowed down as keys piled up (found by the benchmark with
100,000 keys). This test reads SQLite's query plans for the statements the store actually runs.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from servers.idempotency import ClaimKind, PaymentStore
from servers.liveness import Owner
from servers.sqlite_store import SQLiteStore


@pytest.fixture
def traced(tmp_path: Path) -> tuple[PaymentStore, list[str]]:
    store = PaymentStore(SQLiteStore(tmp_path / "gateway.sqlite3", ""), Owner(tmp_path))
    statements: list[str] = []
    store._store.connection().set_trace_callback(statements.append)
    return store, statements


def _scans(db: sqlite3.Connection, statement: str) -> list[str]:
    if not statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "INSERT")):
        return []
    plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + statement)]
    # "SCAN x USING INDEX i" walks a (partial) index; a bare "SCAN table" reads every row.
    return [step for step in plan if step.startswith("SCAN") and "USING" not in step]


def test_regression_key_table_statements_never_scan_a_table(traced: tuple[PaymentStore, list[str]]) -> None:
    store, statements = traced
    claim = store.claim("alice", "k-1", "SBI-1001", "HDFC-2001", 100)
    assert claim.kind is ClaimKind.NEW
    store.decide(claim.payment, commit=True, status="succeeded", message="ok", response=b"r")
    store.finish(claim.payment)
    assert store.claim("alice", "k-1", "SBI-1001", "HDFC-2001", 100).kind is ClaimKind.REPLAY
    other = store.claim("alice", "k-2", "SBI-1001", "HDFC-2001", 100).payment
    store.release(other)
    store.take_over_abandoned()
    store.history("alice", ("SBI-1001",), 50)
    store.sweep(3600)
    db = store._store.connection()
    db.set_trace_callback(None)
    assert len(statements) > 10
    scanning = {s: _scans(db, s) for s in statements if _scans(db, s)}
    assert scanning == {}, scanning
