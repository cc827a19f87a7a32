"""Why a sequential payment costs more on PostgreSQL than on SQLite: what the pieces of its store work cost.

A payment's store work before its answer is the session read, the claim (a durable commit: the key before the
first bank) and the decision (a durable commit: before Commit); the finish follows the answer (batched with
others' in the gateway). On PostgreSQL each is a round trip to the server; on SQLite a call into a library in
the gateway's own process, its commits made by a group committer on a thread. Measured here, the two stores
side by side, one sample of each in turn so that whatever else the machine does weighs on both alike:

- the real stores through the gateway's own interface (servers/gateway/store: `open_store`, the code the
  gateway runs), one payment at a time with 3 ms idle before each, as a sequential payment leaves the disk
  idle between its commits: each step's time, and the CPU the calling process used per payment (the
  gateway's share) and, on PostgreSQL, the CPU of the server's backends;
- one tiny durable commit (an INSERT in autocommit on PostgreSQL; bench.ceiling.Journal on SQLite: WAL,
  preallocated, synchronous=FULL), one after another and after 3 ms idle (on this VM an fsync after idle
  costs more), and the same without the flush — what the flush itself costs, though neither store may skip it
  for a decision, which must be durable before the banks hear of it;
- a round trip that does no work (`SELECT 1`), one after another and after 3 ms idle.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from bench.ceiling import Journal
from bench.pg_observe import cpu_seconds
from servers.gateway.store.interface import GatewayStore
from servers.gateway.store.records import ClaimKind
from servers.gateway.store.spec import open_store

IDLE = 0.003  # seconds of idle disk before each sample, ≈ what a sequential payment leaves between its commits
STEPS = ("session read", "claim", "decide", "finish", "replay (session read + claim)")


@dataclass(frozen=True)
class Counts:
    tight: int = 300     # commits (or round trips) one after another
    gapped: int = 100    # commits after IDLE each
    payments: int = 200  # payments through each store


QUICK = Counts(60, 20, 40)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def _timed(op: Callable[[], Awaitable[Any]]) -> float:
    t = time.perf_counter()
    await op()
    return time.perf_counter() - t


async def _payment(store: GatewayStore, token: str, key: str) -> dict[str, float]:
    """One payment's store work, as the gateway does it: each step's seconds, and this process's CPU."""
    cpu = time.process_time()  # every thread of the process: the SQLite store commits on one of its own
    took = {"session read": await _timed(lambda: store.resolve_session(token))}
    t = time.perf_counter()
    payment = (await store.claim("alice", key, "SBI-1001", "HDFC-2001", 1)).payment
    took["claim"] = time.perf_counter() - t
    took["decide"] = await _timed(lambda: store.decide(payment, True, "succeeded", "paid", b"response" * 8))
    took["finish"] = await _timed(lambda: store.finish(payment))
    took["cpu"] = time.process_time() - cpu
    t = time.perf_counter()  # a retry of the same request: the replay's store work
    await store.resolve_session(token)
    replay = await store.claim("alice", key, "SBI-1001", "HDFC-2001", 1)
    took["replay (session read + claim)"] = time.perf_counter() - t
    assert replay.kind is ClaimKind.REPLAY, replay.kind
    return took


async def _stores(url: str, work: Path, n: Counts) -> dict[str, Any]:
    import asyncpg

    stores = {"sqlite": open_store("sqlite", work / "sqlite-store"), "postgres": open_store(url, work / "pg-store")}
    for store in stores.values():
        await store.start()
    probe = await asyncpg.connect(url, timeout=10)
    try:
        backends = [pid for pid, in await probe.fetch("SELECT pid FROM pg_stat_activity WHERE datname ="
                                                       " current_database() AND pid <> pg_backend_pid()")]
        tokens = {name: (await store.create_session("alice", "credential", 3600.0))[0]
                  for name, store in stores.items()}
        for i in range(20):  # warm: connections, statement caches, the tables' first pages
            for name, store in stores.items():
                await _payment(store, tokens[name], f"warm-{i}")
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in stores}
        backend_cpu = sum(map(cpu_seconds, backends))
        for i in range(n.payments):
            for name in (("sqlite", "postgres") if i % 2 else ("postgres", "sqlite")):
                time.sleep(IDLE)  # the workload's shape (an idle disk), not a wait for anything
                samples[name].append(await _payment(stores[name], tokens[name], f"k-{i}"))
        backend_cpu = sum(map(cpu_seconds, backends)) - backend_cpu
    finally:
        await probe.close()
        for store in stores.values():
            await store.close()
    out = {name: {step: _median_ms([s[step] for s in rows]) for step in STEPS} for name, rows in samples.items()}
    for name, rows in samples.items():
        out[name]["before the answer"] = _median_ms([s["session read"] + s["claim"] + s["decide"] for s in rows])
        out[name]["caller cpu"] = sum(s["cpu"] for s in rows) * 1000 / len(rows)
    out["postgres"]["server cpu"] = backend_cpu * 1000 / n.payments  # its backends' CPU (10 ms ticks)
    return out


async def _commits(conn: Any, journal: Journal, n: Counts) -> dict[str, dict[str, float]]:
    """Tight and after-idle commits on both stores, in turn; with and without the flush."""
    body = b"x" * 64
    out: dict[str, dict[str, float]] = {}
    for flush in (True, False):
        await conn.execute(f"SET synchronous_commit = {'on' if flush else 'off'}")
        journal.db.execute(f"PRAGMA synchronous={'FULL' if flush else 'OFF'}")
        times: dict[str, list[float]] = {f"{store} {shape}": [] for store in ("postgres", "sqlite")
                                         for shape in ("tight", "after idle")}
        for shape, count, idle in (("tight", n.tight, 0.0), ("after idle", n.gapped, IDLE)):
            for _ in range(count):
                time.sleep(idle)
                times[f"postgres {shape}"].append(await _timed(
                    lambda: conn.execute("INSERT INTO bench_commits (body) VALUES ($1)", body)))
                time.sleep(idle)
                t = time.perf_counter()
                journal.write(body)
                times[f"sqlite {shape}"].append(time.perf_counter() - t)
        for label, samples in times.items():
            out.setdefault(label.split()[0], {})[f"{'flushed' if flush else 'unflushed'} {label.split(' ', 1)[1]}"] = \
                _median_ms(samples)
    await conn.execute("SET synchronous_commit = on")
    return out


async def _measure(url: str, work: Path, n: Counts) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10, server_settings={"synchronous_commit": "on"})
    journal = Journal(work / "commits.db", sync=True)
    try:
        await conn.execute("CREATE TABLE bench_commits (id bigserial PRIMARY KEY, body bytea)")
        round_trip = [await _timed(lambda: conn.fetchval("SELECT 1")) for _ in range(n.tight)]
        after_idle = []
        for _ in range(n.gapped):
            time.sleep(IDLE)  # the server's backend has gone to sleep: the round trip wakes it
            after_idle.append(await _timed(lambda: conn.fetchval("SELECT 1")))
        commits = await _commits(conn, journal, n)
        settings = {name: await conn.fetchval(f"SHOW {name}") for name in
                    ("wal_sync_method", "commit_delay", "full_page_writes", "synchronous_commit", "shared_buffers")}
    finally:
        await conn.close()
        journal.db.close()
    return {"round_trip_ms": _median_ms(round_trip), "round_trip_after_idle_ms": _median_ms(after_idle),
            "commit_ms": commits, "settings": settings,
            "stores_ms": await _stores(url, work, n)}


def store_costs(url: str, work: Path, counts: Counts = Counts()) -> dict[str, Any]:
    """Both stores' costs, medians in ms (`url`: a fresh database the caller drops)."""
    work.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_measure(url, work, counts))
