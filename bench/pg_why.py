"""Why a sequential payment costs more on PostgreSQL than on SQLite: what the pieces of its store work cost.

A sequential payment on PostgreSQL makes three round trips to the server before its answer — the session
read, the claim (a durable commit: the key before the first bank), the decision (a durable commit: before
Commit) — and a fourth after it (the finish, batched with others'). On SQLite the same steps are calls into
a library in the gateway's own process. So measured here, on a fresh database of the server being benchmarked
and a SQLite file set up as Strife's are (bench.ceiling.Journal: WAL, preallocated, synchronous=FULL):

- a round trip that does no work (`SELECT 1`);
- one tiny durable commit (an INSERT in autocommit), one after another and after 3 ms idle — a sequential
  payment leaves the disk idle between its commits, and on this VM an fsync after idle costs more;
- the same with synchronous_commit off: what the WAL flush itself costs (not an option for a decision, which
  must be durable before the banks hear of it);
- the store's own statements (servers/gateway/store/postgres_sql.py), one payment after another with 3 ms
  between them: the session read, the claim, the decision, the finish.
"""
from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from bench.ceiling import Journal
from servers.gateway.store import postgres_sql as sql

IDLE = 0.003  # seconds of idle disk before a "gapped" commit, ≈ what a sequential payment leaves between them

@dataclass(frozen=True)
class Counts:
    tight: int = 300     # commits (or round trips) one after another
    gapped: int = 100    # commits after IDLE each
    payments: int = 200  # payments' worth of the store's statements


QUICK = Counts(60, 20, 40)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _sqlite_commits(path: Path, sync: bool, n: Counts) -> dict[str, float]:
    journal = Journal(path, sync)
    body = b"x" * 64

    def timed() -> float:
        t = time.perf_counter()
        journal.write(body)
        return time.perf_counter() - t

    tight = [timed() for _ in range(n.tight)]
    gapped = []
    for _ in range(n.gapped):
        time.sleep(IDLE)  # the workload's shape (an idle disk), not a wait for anything
        gapped.append(timed())
    journal.db.close()
    return {"tight": _median_ms(tight), "after_idle": _median_ms(gapped)}


async def _timed(op: Callable[[], Awaitable[Any]]) -> float:
    t = time.perf_counter()
    await op()
    return time.perf_counter() - t


async def _pg_commits(conn: Any, sync: bool, n: Counts) -> dict[str, float]:
    await conn.execute(f"SET synchronous_commit = {'on' if sync else 'off'}")
    insert = lambda: conn.execute("INSERT INTO bench_commits (body) VALUES ($1)", b"x" * 64)  # noqa: E731
    tight = [await _timed(insert) for _ in range(n.tight)]
    gapped = []
    for _ in range(n.gapped):
        time.sleep(IDLE)
        gapped.append(await _timed(insert))
    await conn.execute("SET synchronous_commit = on")
    return {"tight": _median_ms(tight), "after_idle": _median_ms(gapped)}


async def _store_statements(conn: Any, n: Counts) -> dict[str, float]:
    """The store's statements for one payment at a time (as postgres.py sends them), each step's median."""
    user, token_hash = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await conn.fetchval(sql.CREATE_SESSION, token_hash, user, "credential", 3600.0)
    steps: dict[str, list[float]] = {"session read": [], "claim": [], "decide": [], "finish": []}
    for i in range(n.payments):
        key = f"k{i}"
        time.sleep(IDLE)
        steps["session read"].append(await _timed(lambda: conn.fetchrow(sql.RESOLVE_SESSION, token_hash)))
        steps["claim"].append(await _timed(lambda: conn.fetch(
            sql.CLAIM, user, key, "fp", 1, f"txn-{uuid.uuid4().hex}", "SBI-1001", "HDFC-2001", 1)))
        steps["decide"].append(await _timed(lambda: conn.fetchval(
            sql.DECIDE, user, key, 1, 1, "commit_decided", b"response" * 8, "succeeded", "paid")))
        steps["finish"].append(await _timed(lambda: conn.fetch(sql.FINISH, [user], [key], [1], 1)))
    return {step: _median_ms(samples) for step, samples in steps.items()}


async def _pg(url: str, n: Counts) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10, server_settings={"synchronous_commit": "on"})
    try:
        await sql.migrate(conn)
        await conn.execute("CREATE TABLE bench_commits (id bigserial PRIMARY KEY, body bytea)")
        for _ in range(50):  # warm: the connection, the tables' first pages
            await conn.execute("INSERT INTO bench_commits (body) VALUES ($1)", b"warm")
        round_trip = [await _timed(lambda: conn.fetchval("SELECT 1")) for _ in range(n.tight)]
        return {"round_trip_ms": _median_ms(round_trip), "commit_ms": await _pg_commits(conn, True, n),
                "commit_no_sync_ms": await _pg_commits(conn, False, n),
                "statements_ms": await _store_statements(conn, n),
                "settings": {name: await conn.fetchval(f"SHOW {name}") for name in
                             ("wal_sync_method", "commit_delay", "full_page_writes", "synchronous_commit")}}
    finally:
        await conn.close()


def commit_costs(url: str, work: Path, counts: Counts = Counts()) -> dict[str, Any]:
    """Both stores' costs, medians in ms (`url`: a fresh database the caller drops)."""
    work.mkdir(parents=True, exist_ok=True)
    return {"postgres": asyncio.run(_pg(url, counts)),
            "sqlite": {"commit_ms": _sqlite_commits(work / "sync.db", True, counts),
                       "commit_no_sync_ms": _sqlite_commits(work / "nosync.db", False, counts)}}
