"""Which asyncio PostgreSQL driver the gateway's store uses: asyncpg or psycopg 3, measured on Strife's statements.

    python -m bench.pg_driver [--url postgresql://postgres@127.0.0.1:5432/postgres] [--payments 1500]
                              [--concurrency 16] [--rounds 3]

Each variant runs the store's real SQL (servers/gateway/store/postgres_sql.py) in a fresh database of its own:
a payment's life — claim (a new key), decide, finish — then a replay claim of every key; sequentially (one
payment after another: the latency a single wallet sees) and with `--concurrency` tasks sharing a pool of 8
connections. Rounds are interleaved so that load from anything else on the machine spreads over all variants;
the median round is reported. psycopg gets the same `$n` statements rewritten to its `%(pn)s` parameters.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import re
import statistics
import time
import uuid
from typing import Any, Awaitable, Callable

from servers.gateway.store import postgres_sql as sql
from servers.gateway.store.url import with_database

POOL_SIZE = 8
Run = Callable[[str, tuple], Awaitable[list]]


def _psycopg_sql(statement: str) -> str:
    return re.sub(r"\$(\d+)", r"%(p\1)s", statement)


async def asyncpg_variant(url: str, reset: bool) -> tuple[Run, Callable[[], Awaitable[None]]]:
    import asyncpg

    async def no_reset(_conn: Any) -> None:  # a connection comes back with no transaction and no session state
        return None

    pool = await asyncpg.create_pool(url, min_size=POOL_SIZE, max_size=POOL_SIZE,
                                     **({} if reset else {"reset": no_reset}))

    async def run(statement: str, args: tuple) -> list:
        async with pool.acquire() as conn:
            return await conn.fetch(statement, *args)

    return run, pool.close


async def psycopg_variant(url: str, prepare_threshold: int | None) -> tuple[Run, Callable[[], Awaitable[None]]]:
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(url, min_size=POOL_SIZE, max_size=POOL_SIZE, open=False,
                               kwargs={"autocommit": True, "prepare_threshold": prepare_threshold})
    await pool.open(wait=True)
    converted: dict[str, str] = {}

    async def run(statement: str, args: tuple) -> list:
        text = converted.get(statement) or converted.setdefault(statement, _psycopg_sql(statement))
        async with pool.connection() as conn:
            cur = await conn.execute(text, {f"p{i}": a for i, a in enumerate(args, 1)})
            return await cur.fetchall() if cur.description else []

    return run, pool.close


async def one_payment(run: Run, user: str, key: str) -> None:
    rows = await run(sql.CLAIM, (user, key, "fp", 1, f"txn-{uuid.uuid4().hex}", "SBI-1001", "HDFC-2001", 100))
    assert rows and rows[0][0], "expected a new key"
    await run(sql.DECIDE, (user, key, 1, 1, "commit_decided", b"response" * 8, "succeeded", "paid"))
    await run(sql.FINISH, ([user], [key], [1], 1))


async def replay(run: Run, user: str, key: str) -> None:
    rows = await run(sql.CLAIM, (user, key, "fp", 1, "txn-unused", "SBI-1001", "HDFC-2001", 100))
    assert rows and not rows[0][0] and rows[0][9] is not None, "expected a stored response"


async def measure(run: Run, payments: int, concurrency: int) -> dict[str, float]:
    user = f"u{uuid.uuid4().hex[:8]}"
    out: dict[str, float] = {}
    keys = [f"s-{i}" for i in range(payments)]
    start = time.perf_counter()
    for k in keys:
        await one_payment(run, user, k)
    out["sequential payments/s"] = payments / (time.perf_counter() - start)
    start = time.perf_counter()
    for k in keys:
        await replay(run, user, k)
    out["sequential replays/s"] = payments / (time.perf_counter() - start)

    async def worker(batch: list[str], fn: Callable[[Run, str, str], Awaitable[None]]) -> None:
        for k in batch:
            await fn(run, user, k)

    ckeys = [f"c-{i}" for i in range(payments)]
    batches = [ckeys[i::concurrency] for i in range(concurrency)]
    for label, fn in (("concurrent payments/s", one_payment), ("concurrent replays/s", replay)):
        start = time.perf_counter()
        await asyncio.gather(*(worker(b, fn) for b in batches))
        out[label] = payments / (time.perf_counter() - start)
    return out


VARIANTS: dict[str, Callable[[str], Awaitable[tuple[Run, Callable[[], Awaitable[None]]]]]] = {
    "asyncpg": lambda url: asyncpg_variant(url, reset=False),
    "asyncpg, pool's reset query": lambda url: asyncpg_variant(url, reset=True),
    "psycopg 3 (prepared after 5)": lambda url: psycopg_variant(url, 5),
    "psycopg 3 (prepared at once)": lambda url: psycopg_variant(url, 0),
}


async def main_async(admin_url: str, payments: int, concurrency: int, rounds: int) -> None:
    import asyncpg

    admin = await asyncpg.connect(admin_url)
    name = f"strife_bench_{uuid.uuid4().hex[:10]}"
    await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    url = with_database(admin_url, name)
    variants = dict(VARIANTS)
    if importlib.util.find_spec("psycopg_pool") is None:
        print("psycopg 3 is not installed (pip install 'psycopg[binary]' psycopg_pool): measuring asyncpg only")
        variants = {k: v for k, v in variants.items() if k.startswith("asyncpg")}
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    try:
        conn = await asyncpg.connect(url)
        await sql.migrate(conn)
        await conn.close()
        for round_no in range(rounds):
            for variant, make in variants.items():
                run, close = await make(url)
                try:
                    await measure(run, 50, 4)  # warm the statement caches
                    results[variant].append(await measure(run, payments, concurrency))
                finally:
                    await close()
            print(f"round {round_no + 1}/{rounds} done", flush=True)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
    metrics = list(next(iter(results.values()))[0])
    print(f"\n{payments} payments per measure, {concurrency} concurrent tasks, pool of {POOL_SIZE}; "
          f"median of {rounds} interleaved rounds\n")
    print(f"{'variant':32}" + "".join(f"{m:>24}" for m in metrics))
    for variant, rows in results.items():
        print(f"{variant:32}" + "".join(f"{statistics.median(r[m] for r in rows):>24.0f}" for m in metrics))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_driver", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("STRIFE_TEST_POSTGRES",
                                                        "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--payments", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args()
    asyncio.run(main_async(a.url, a.payments, a.concurrency, a.rounds))


if __name__ == "__main__":
    main()
