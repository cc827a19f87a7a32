"""Every statement on the hot path of the gateway's store reads or writes by an index, never by a scan; the
history reads only the rows it returns.

Regression: decide/finish/release once located their key row by `payment_id`, which has no index, so every
payment scanned the whole key table — the gateway slowed down as keys piled up (found by the benchmark with
100,000 keys). This test reads SQLite's query plans for the statements the store actually runs.
"""
from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from servers.gateway.store.sqlite_payments import ClaimKind, PaymentStore
from servers.gateway.store.owners import Owner
from servers.sqlite_store import SQLiteStore


@pytest.fixture
def traced(tmp_path: Path) -> tuple[PaymentStore, list[str]]:
    store = PaymentStore(SQLiteStore(tmp_path / "gateway.sqlite3", ""), Owner(tmp_path))
    statements: list[str] = []
    store._store.connection().set_trace_callback(statements.append)
    return store, statements


def _plan(db: sqlite3.Connection, statement: str) -> list[str]:
    if not statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "INSERT")):
        return []
    return [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + statement)]


def _scans(db: sqlite3.Connection, statement: str) -> list[str]:
    plan = _plan(db, statement)
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
    store.history("alice", ("SBI-1001", "HDFC-2002", "SBI-1005"), 50)
    store.sweep(3600)
    db = store._store.connection()
    db.set_trace_callback(None)
    assert len(statements) > 10
    scanning = {s: _scans(db, s) for s in statements if _scans(db, s)}
    assert scanning == {}, scanning
    # The history reads only the rows it returns: each source in index order, so nothing is sorted either.
    history = [s for s in statements if "FROM payments" in s and "ORDER BY id DESC" in s]
    assert len(history) == 4, history  # what alice sent, and what each of her three accounts received
    plans = {s: _plan(db, s) for s in history}
    assert not any("TEMP B-TREE" in step for plan in plans.values() for step in plan), plans


# ---- the history's cost --------------------------------------------------------------------------------------
ACCOUNTS = ("SBI-1001", "HDFC-2002")


def _add_payments(store: PaymentStore, rows: list[tuple[str, str, str, str]]) -> None:
    """(username, from, to, status) rows, as the gateway leaves them; ids in insertion order."""
    with store._store.transaction() as db:
        first = db.execute("SELECT coalesce(max(id), 0) FROM payments").fetchone()[0]
        db.executemany("INSERT INTO payments (txn_id, username, idem_key, from_account, to_account, amount, status,"
                       " created_at) VALUES (?, ?, ?, ?, ?, 1, ?, 0)",
                       [(f"txn-{first + i}", user, f"k-{first + i}", src, dst, status)
                        for i, (user, src, dst, status) in enumerate(rows)])


def _steps(store: PaymentStore, limit: int) -> tuple[int, list[str]]:
    """SQLite VM instructions run by one history read (each row visited costs a few), and the txn ids read."""
    db = store._store.connection()
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    db.set_progress_handler(count, 1)
    try:
        rows = store.history("alice", ACCOUNTS, limit)
    finally:
        db.set_progress_handler(None, 1)
    return steps[0], [r.txn_id for r in rows]


def test_regression_history_reads_only_the_rows_it_returns_however_many_were_received(tmp_path: Path) -> None:
    """ListPayments once sorted every payment an account ever received (330 ms for 400k, on the event loop):
    anyone can send ₹0.01 payments. Its cost must not grow with them: VM steps, not a stopwatch."""
    store = PaymentStore(SQLiteStore(tmp_path / "gateway.sqlite3", ""), Owner(tmp_path))
    _add_payments(store, [("alice", "SBI-1001", "HDFC-2001", "succeeded")] * 20
                  + [("mallory", "SBI-1003", ACCOUNTS[i % 2], "succeeded") for i in range(20)])
    small, _ = _steps(store, 10)
    # A flood: received (succeeded and declined) by both accounts, sent by others, older than what is shown.
    flood = [("mallory", "SBI-1003", ACCOUNTS[i % 2], ("succeeded", "declined")[i % 3 == 0]) for i in range(20_000)]
    _add_payments(store, flood[:10_000] + [("bob", "HDFC-2001", "SBI-1002", "succeeded")] * 5_000)
    _add_payments(store, [("alice", "SBI-1001", "HDFC-2001", "failed")] * 5 + [("mallory", "SBI-1003", "SBI-1001",
                                                                              "succeeded")] * 5 + flood[10_000:])
    large, shown = _steps(store, 10)
    assert large <= small * 1.2, (small, large)  # not ×700: what is visited is O(limit), not O(rows)
    newest = [r for r in store._store.connection().execute(
        "SELECT txn_id FROM payments WHERE username = 'alice' OR (to_account IN (?, ?) AND status = 'succeeded')"
        " ORDER BY id DESC LIMIT 10", ACCOUNTS)]
    assert shown == [t for (t,) in newest]


def test_history_merges_sent_and_received_newest_first_each_payment_once(tmp_path: Path) -> None:
    store = PaymentStore(SQLiteStore(tmp_path / "gateway.sqlite3", ""), Owner(tmp_path))
    rng = random.Random(12)
    users, accounts = ("alice", "bob", "carol"), ("SBI-1001", "HDFC-2002", "HDFC-2001", "SBI-1002")
    statuses = ("succeeded", "declined", "failed", "processing")
    rows = [(rng.choice(users), rng.choice(accounts), rng.choice(accounts), rng.choice(statuses)) for _ in range(400)]
    rows += [("alice", "SBI-1001", "HDFC-2002", "succeeded")] * 3  # between her own accounts: sent and received
    rng.shuffle(rows)
    _add_payments(store, rows)
    expected = [f"txn-{i}" for i, (user, _, dst, status) in reversed(list(enumerate(rows)))
                if user == "alice" or (dst in ACCOUNTS and status == "succeeded")]
    for limit in (1, 7, 50, 500):
        assert [r.txn_id for r in store.history("alice", ACCOUNTS, limit)] == expected[:limit]
    assert [r.txn_id for r in store.history("alice", (), 500)] == [t for t in expected if
                                                                     rows[int(t[4:])][0] == "alice"]
