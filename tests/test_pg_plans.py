"""Every statement the PostgreSQL store runs reads and writes by an index, and history reads O(limit) rows.

The PostgreSQL half of test_store_plans.py. The planner picks sequential scans for tiny tables, so the
database is first loaded with a realistic shape — thousands of finished payments and keys, a handful in
flight, sessions — and ANALYZEd. That proves more than `enable_seqscan = off` would: not only that an index
path exists, but that the planner takes it at a realistic size. The statements checked are the ones the store
sent (captured by its query logger while it ran a payment's whole life), not a list kept by hand.
"""
from __future__ import annotations

import json
from typing import Iterator

import asyncpg
import pytest

from servers.gateway.store.records import ClaimKind
from tests.pg_store_support import PAY, decide, fetch, replica

pytestmark = pytest.mark.timeout(90)

LOAD = """
INSERT INTO payments (id, txn_id, username, idem_key, from_account, to_account, amount, status, message,
                      created_at, finished_at)
SELECT nextval('payment_ids'), 'txn-load-' || g, 'user' || (g % 200), 'load-' || g, 'SBI-' || (g % 300),
       'HDFC-' || (g % 300), 100 + g, CASE WHEN g % 10 = 0 THEN 'declined' ELSE 'succeeded' END, '',
       extract(epoch FROM now()) - g, extract(epoch FROM now()) - g
FROM generate_series(1, 6000) AS g;
INSERT INTO idempotency_keys (username, idem_key, fingerprint, payment_id, recovery_point, owner, epoch, response,
                              created_at, last_run_at, finished_at)
SELECT username, idem_key, 'fp', id, 'finished', NULL, 1, 'r', created_at, created_at, finished_at FROM payments;
INSERT INTO sessions (token_hash, username, credential, created_at, expires_at)
SELECT md5(g::text), 'user' || g, 'c', extract(epoch FROM now()),
       extract(epoch FROM now()) + CASE WHEN g % 100 = 0 THEN -1 ELSE 3600 END
FROM generate_series(1, 3000) AS g;
ANALYZE;
"""


async def load(url: str, script: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(script)  # several statements: the simple query protocol
    finally:
        await conn.close()


def plan_nodes(plan: dict) -> Iterator[dict]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from plan_nodes(child)


async def explain(conn: asyncpg.Connection, statement: str, args: tuple, analyze: bool = False) -> list[dict]:
    options = "ANALYZE, FORMAT JSON" if analyze else "FORMAT JSON"
    raw = await conn.fetchval(f"EXPLAIN ({options}) {statement}", *args)
    return list(plan_nodes((json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]))


async def test_regression_every_statement_of_a_payments_life_uses_an_index(postgres_url: str) -> None:
    seen: list[tuple[str, tuple]] = []
    async with replica(postgres_url, query_logger=lambda q: seen.append((q.query, tuple(q.args)))) as store:
        await load(postgres_url, LOAD)
        seen.clear()  # from here on: what serving does (start-up's migrations are not on the hot path)
        first = await store.claim("alice", "k-1", *PAY)
        assert first.kind is ClaimKind.NEW
        assert (await store.claim("alice", "k-1", *PAY)).kind is ClaimKind.IN_FLIGHT
        await decide(store, first.payment)
        assert (await store.claim("alice", "k-1", *PAY)).kind is ClaimKind.REPLAY
        assert (await store.claim("alice", "k-1", "SBI-1001", "HDFC-2001", 7)).kind is ClaimKind.MISMATCH
        await store.finish(first.payment)
        second = (await store.claim("alice", "k-2", *PAY)).payment
        await store.release(second)
        resumed = await store.claim("alice", "k-2", *PAY)  # a let-go payment: the locked path
        assert resumed.kind is ClaimKind.RESUMED
        await decide(store, resumed.payment, commit=False)
        await store.finish_later(resumed.payment)
        third = (await store.claim("alice", "k-3", *PAY)).payment
        await store.release(third)
        assert [p.txn_id for p in await store.take_over_abandoned(10)] == [third.txn_id]
        assert [p.txn_id for p in await store.owned_unfinished()] == [third.txn_id]
        await store.history("user7", ("HDFC-7", "HDFC-8"), 20)
        assert await store.sweep_keys(5900) > 0  # the oldest ~100 of the loaded keys
        token, _ = await store.create_session("alice", "cred", 60)
        assert await store.resolve_session(token) == ("alice", "cred")
        await store.end_session(token)
        assert await store.sweep_sessions() == 30
    hot = ("SELECT", "WITH", "INSERT", "UPDATE", "DELETE")
    ours = ("payments", "idempotency_keys", "sessions")  # not asyncpg's own catalog queries (type introspection)
    statements = list({q: (q, a) for q, a in seen
                       if q.lstrip().split()[0].upper() in hot and any(t in q for t in ours)}.values())
    assert len({q for q, _ in statements}) >= 12  # each kind of statement the store has
    conn = await asyncpg.connect(postgres_url)
    try:
        scans = {}
        for statement, args in statements:
            nodes = await explain(conn, statement, args)
            seq = [n.get("Relation Name") for n in nodes if n["Node Type"] == "Seq Scan"]
            if seq:
                scans[" ".join(statement.split())[:120]] = seq
    finally:
        await conn.close()
    assert scans == {}


async def test_history_merges_its_sources_and_reads_o_limit_rows(postgres_url: str) -> None:
    seen: list[tuple[str, tuple]] = []
    mine = ("SBI-1001", "HDFC-2002")
    async with replica(postgres_url, query_logger=lambda q: seen.append((q.query, tuple(q.args)))) as store:
        # 20,000 payments; alice's are sparse, as one user's are among many: 1 % sent by her (every 5th between
        # her own two accounts), 1 % received by each of her accounts (a third of them declined).
        await load(postgres_url, """
            INSERT INTO payments (txn_id, username, idem_key, from_account, to_account, amount, status, created_at)
            SELECT 'txn-' || g,
                   CASE g % 100 WHEN 0 THEN 'alice' ELSE 'user' || (g % 50) END, 'k-' || g,
                   CASE g % 100 WHEN 0 THEN 'SBI-1001' ELSE 'SBI-' || (3000 + g % 50) END,
                   CASE g % 100 WHEN 0 THEN CASE WHEN g % 500 = 0 THEN 'HDFC-2002' ELSE 'HDFC-2001' END
                                WHEN 1 THEN 'SBI-1001' WHEN 2 THEN 'HDFC-2002' ELSE 'HDFC-' || (g % 40) END,
                   100, CASE WHEN g % 3 = 0 THEN 'declined' ELSE 'succeeded' END, g
            FROM generate_series(1, 20000) AS g;
            ANALYZE payments""")
        seen.clear()
        limit = 25
        rows = await store.history("alice", mine, limit)
    everything = await fetch(postgres_url, "SELECT txn_id, username, to_account, status FROM payments ORDER BY id DESC")
    expected = [r["txn_id"] for r in everything
                if r["username"] == "alice" or (r["to_account"] in mine and r["status"] == "succeeded")][:limit]
    assert [r.txn_id for r in rows] == expected
    assert len(set(expected)) == limit and any(r.username == "alice" and r.to_account in mine for r in rows)

    statement, args = next((q, a) for q, a in seen if "unnest" in q)
    conn = await asyncpg.connect(postgres_url)
    try:
        nodes = await explain(conn, statement, args, analyze=True)
    finally:
        await conn.close()
    scans = [n for n in nodes if "Relation Name" in n]
    assert scans and all(n["Node Type"] in ("Index Scan", "Index Scan Backward", "Index Only Scan") for n in scans)
    # Each source stops after `limit` rows: the sent one once, the received one once per account. Rows an
    # index scan read and then dropped (a filter) count as read.
    read = sum((n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"] for n in scans)
    assert read <= limit * (1 + len(mine)), read


