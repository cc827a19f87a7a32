"""Helpers for the tests of the PostgreSQL store itself: a replica (a PostgresStore) with fast liveness, plain
SQL against the test's database, and the owners' liveness locks."""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import asyncpg

from servers.gateway.store.pg_connection import PostgresOptions
from servers.gateway.store.postgres import PostgresStore
from servers.gateway.store.postgres_sql import OWNER_LOCK_SPACE
from servers.gateway.store.records import Payment
from tests.pg_support import eventually

FAST = PostgresOptions(liveness_interval=0.2, liveness_timeout=2.0, command_timeout=3.0, connect_timeout=3.0)
PAY = ("SBI-1001", "HDFC-2001", 100)


@asynccontextmanager
async def replica(url: str, options: PostgresOptions = FAST, **kwargs: Any) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(url, options, **kwargs)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def fetch(url: str, statement: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(statement, *args)
    finally:
        await conn.close()


async def key_row(url: str, user: str, key: str) -> asyncpg.Record:
    rows = await fetch(url, "SELECT * FROM idempotency_keys WHERE username = $1 AND idem_key = $2", user, key)
    assert len(rows) == 1
    return rows[0]


# This test's database only: the server is shared, and other Strife databases hold the same lock keys.
THIS_DATABASE = "database = (SELECT oid FROM pg_database WHERE datname = current_database())"


async def lock_holder(url: str, owner: int) -> int | None:
    """The session holding `owner`'s liveness lock (exclusive: a replica probing it holds a shared one for an
    instant, and that connection is not the one to end — a test did, once, in CI)."""
    rows = await fetch(url, "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1 AND objid = $2"
                            f" AND objsubid = 2 AND mode = 'ExclusiveLock' AND granted AND {THIS_DATABASE}",
                       OWNER_LOCK_SPACE, owner)
    return rows[0]["pid"] if rows else None


async def terminate_liveness(url: str, owner: int) -> None:
    pid = await lock_holder(url, owner)
    assert pid is not None, f"owner {owner} holds no lock"
    await fetch(url, "SELECT pg_terminate_backend($1)", pid)
    await eventually(lambda: lock_gone(url, owner), 5, message=f"owner {owner}'s lock to be freed")


async def lock_gone(url: str, owner: int) -> bool:
    return await lock_holder(url, owner) is None


async def decide(store: PostgresStore, payment: Payment, commit: bool = True, response: bytes = b"resp") -> None:
    await store.decide(payment, commit, "succeeded" if commit else "failed", "msg", response)
