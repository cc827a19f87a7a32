"""The PostgreSQL store against a real server: claims, take-over, fencing and liveness across replicas.

Each test has a fresh database (the `postgres_url` fixture); each PostgresStore is a replica. Where liveness
matters the replica is a process of its own (tests/pg_replica.py), killed with SIGKILL or stopped with SIGSTOP.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from servers.gateway.store.postgres import PostgresStore
from servers.gateway.store.postgres_sql import END_OLD_IDENTITY, FINISH, MIGRATION_LOCK, OWNER_LOCK_SPACE, migrations
from servers.gateway.store.records import ClaimKind, LostOwnership, Point
from tests.harness import Proc
from tests.pg_support import eventually
from tests.pg_store_support import FAST, PAY, decide, fetch, key_row, replica, terminate_liveness

pytestmark = pytest.mark.timeout(90)


# ---- claims ----------------------------------------------------------------------------------------------------
async def test_claim_is_new_then_in_flight_then_replayed_and_other_parameters_mismatch(postgres_url: str) -> None:
    sent: list[str] = []
    async with replica(postgres_url, query_logger=lambda q: sent.append(q.query)) as store:
        sent.clear()
        first = await store.claim("alice", "k1", *PAY)
        assert first.kind is ClaimKind.NEW and first.payment.epoch == 1
        assert first.payment.recovery_point is Point.STARTED and first.payment.txn_id.startswith("txn-")
        assert (await store.claim("alice", "k1", *PAY)).kind is ClaimKind.IN_FLIGHT  # this replica runs it
        await decide(store, first.payment, response=b"stored response")
        replay = await store.claim("alice", "k1", *PAY)
        assert replay.kind is ClaimKind.REPLAY and replay.payment.response == b"stored response"
        assert len(sent) == 4  # one statement (one round trip) each: new, in flight, decide, replay
        assert replay.payment.txn_id == first.payment.txn_id
        assert (await store.claim("alice", "k1", "SBI-1001", "HDFC-2001", 101)).kind is ClaimKind.MISMATCH
        other_user = await store.claim("bob", "k1", *PAY)  # keys are scoped per user
        assert other_user.kind is ClaimKind.NEW and other_user.payment.txn_id != first.payment.txn_id
    rows = await fetch(postgres_url, "SELECT username, amount, status FROM payments ORDER BY id")
    assert [tuple(r) for r in rows] == [("alice", 100, "succeeded"), ("bob", 100, "processing")]


async def test_twenty_concurrent_duplicate_claims_over_two_replicas_make_exactly_one_new(postgres_url: str) -> None:
    async with replica(postgres_url) as a, replica(postgres_url) as b:
        claims = await asyncio.gather(*((a, b)[i % 2].claim("alice", "dup", *PAY) for i in range(20)))
        kinds = [c.kind for c in claims]
        assert kinds.count(ClaimKind.NEW) == 1, kinds
        assert set(kinds) == {ClaimKind.NEW, ClaimKind.IN_FLIGHT}  # the winner is alive: nobody resumes it
        winner = next(c for c in claims if c.kind is ClaimKind.NEW)
        assert {c.payment.txn_id for c in claims} == {winner.payment.txn_id}
        mismatched = await asyncio.gather(*((a, b)[i % 2].claim("alice", "dup", "SBI-1001", "HDFC-2001", 5)
                                            for i in range(6)))
        assert {c.kind for c in mismatched} == {ClaimKind.MISMATCH}
    assert len(await fetch(postgres_url, "SELECT 1 FROM payments")) == 1
    assert len(await fetch(postgres_url, "SELECT 1 FROM idempotency_keys")) == 1


# ---- a killed replica ------------------------------------------------------------------------------------------
def start_replica(tmp_path: Path, url: str, keys: list[str], name: str = "replica") -> Proc:
    return Proc(name, ["tests.pg_replica", url, "alice", ",".join(keys)], tmp_path / f"{name}.log").start()


def events(proc: Proc, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
    return [e for e in lines if kind in e]


async def event(proc: Proc, kind: str, count: int = 1) -> dict:
    found = await eventually(lambda: len(events(proc, kind)) >= count and events(proc, kind), 20,
                             message=f"{proc.name}'s {kind!r} event")
    return found[count - 1]


async def test_a_killed_replicas_payments_are_resumed_by_a_retry_and_taken_by_a_completer(
        postgres_url: str, tmp_path: Path) -> None:
    proc = start_replica(tmp_path, postgres_url, ["k1", "k2"])
    try:
        ready = await event(proc, "ready")
        dead_owner = ready["owner"]
        assert ready["claims"] == {"k1": ["new", 1], "k2": ["new", 1]}
        async with replica(postgres_url) as survivor:
            # While it lives, its payments are its own: a retry is told to wait, and no completer takes them.
            assert (await survivor.claim("alice", "k1", *PAY)).kind is ClaimKind.IN_FLIGHT
            assert await survivor.take_over_abandoned(100) == []
            proc.kill()
            resumed = await eventually(lambda: _resumed(survivor, "k1"), 10, message="k1 to be resumed")
            assert resumed.payment.epoch == 2 and resumed.previous_owner == str(dead_owner)
            taken = await survivor.take_over_abandoned(100)
            assert [(p.idem_key, p.epoch, p.recovery_point) for p in taken] == [("k2", 2, Point.STARTED)]
            for payment in (resumed.payment, taken[0]):
                await decide(survivor, payment, commit=False)
                await survivor.finish(payment)
            assert await survivor.take_over_abandoned(100) == []
        for key in ("k1", "k2"):
            row = await key_row(postgres_url, "alice", key)
            assert (row["recovery_point"], row["owner"], row["epoch"]) == ("finished", None, 2)
    finally:
        proc.kill()


async def _resumed(store: PostgresStore, key: str):
    claim = await store.claim("alice", key, *PAY)
    return claim if claim.kind is ClaimKind.RESUMED else None


async def test_a_dead_owners_payment_is_reached_past_many_older_live_ones(postgres_url: str) -> None:
    async with replica(postgres_url) as live, replica(postgres_url) as survivor:
        for i in range(30):  # older, unfinished, and their owner is alive: never to be taken
            assert (await live.claim("alice", f"live-{i}", *PAY)).kind is ClaimKind.NEW
        dead = PostgresStore(postgres_url, FAST)
        await dead.start()
        orphan = (await dead.claim("alice", "orphan", *PAY)).payment
        await dead.close()  # its session ends: its lock is free
        taken = await eventually(lambda: survivor.take_over_abandoned(5), 10, message="the dead owner's payment")
        assert [(p.txn_id, p.epoch) for p in taken] == [(orphan.txn_id, 2)]
        rows = await fetch(postgres_url, "SELECT owner, epoch FROM idempotency_keys WHERE idem_key LIKE 'live-%'")
        assert {(r["owner"], r["epoch"]) for r in rows} == {(live.owner_number, 1)} and len(rows) == 30


async def test_concurrent_completers_never_take_the_same_payment(postgres_url: str) -> None:
    async with replica(postgres_url) as a, replica(postgres_url) as b, replica(postgres_url) as c:
        for i in range(40):
            payment = (await c.claim("alice", f"k{i}", *PAY)).payment
            await c.release(payment)  # let go: any completer may take it
        taken = await asyncio.gather(*(store.take_over_abandoned(7) for store in (a, b) for _ in range(5)))
        ids = [p.id for batch in taken for p in batch]
        assert len(ids) == len(set(ids)) == 40
        assert {p.epoch for batch in taken for p in batch} == {2}


# ---- fencing ---------------------------------------------------------------------------------------------------
async def test_a_replica_whose_liveness_session_is_terminated_cannot_write_over_the_survivor(
        postgres_url: str) -> None:
    async with replica(postgres_url) as old, replica(postgres_url) as survivor:
        seen: list[bool] = []
        old.on_liveness_change(seen.append)
        mine = (await old.claim("alice", "k", *PAY)).payment
        first_owner = old.owner_number
        await terminate_liveness(postgres_url, first_owner)
        taken = await eventually(lambda: survivor.take_over_abandoned(10), 10, message="the take-over")
        assert [(p.txn_id, p.epoch) for p in taken] == [(mine.txn_id, 2)]
        await decide(survivor, taken[0], commit=False, response=b"survivor's decision")
        # The old replica notices, stops taking work, and comes back under a new owner number ...
        await eventually(lambda: seen[:1] == [False], 5, message="the old replica to notice")
        await eventually(old.is_live, 10, message="the old replica to take a new identity")
        assert seen == [False, True] and old.owner_number != first_owner
        # ... and its stale copy is fenced: the compare-and-set on owner and epoch matches nothing.
        with pytest.raises(LostOwnership):
            await decide(old, mine, commit=True, response=b"stale")
        with pytest.raises(LostOwnership):
            await old.finish(mine)
        await old.release(mine)  # a no-op: it is not the old replica's any more
    row = await key_row(postgres_url, "alice", "k")
    assert (row["recovery_point"], row["response"], row["owner"], row["epoch"]) == (
        "abort_decided", b"survivor's decision", survivor.owner_number, 2)


async def test_a_stopped_replica_that_lost_its_session_wakes_up_fenced(postgres_url: str, tmp_path: Path) -> None:
    # SIGSTOP: the replica cannot notice anything; it may wake up still believing it owns its payment.
    proc = start_replica(tmp_path, postgres_url, ["k"])
    try:
        old_owner = (await event(proc, "ready"))["owner"]
        proc.pause()
        await terminate_liveness(postgres_url, old_owner)
        async with replica(postgres_url) as survivor:
            taken = await eventually(lambda: survivor.take_over_abandoned(10), 10, message="the take-over")
            await decide(survivor, taken[0], commit=False, response=b"survivor's decision")
            proc.resume()
            proc.popen.send_signal(signal.SIGUSR1)  # try to commit its stale copy
            assert (await event(proc, "decided"))["decided"] == {"k": "LostOwnership"}
            row = await key_row(postgres_url, "alice", "k")
            assert (row["recovery_point"], row["response"], row["owner"]) == (
                "abort_decided", b"survivor's decision", survivor.owner_number)

            # It notices, and comes back under a new owner number (its start made the first "live" event).
            await eventually(lambda: [e for e in events(proc, "live") if e["live"] and e["owner"] != old_owner], 15,
                             message=f"a new identity\n{proc.log()}")
    finally:
        proc.kill()


async def test_the_epoch_fences_a_stale_copy_after_release_and_take_over_by_the_same_replica(
        postgres_url: str) -> None:
    async with replica(postgres_url) as store, replica(postgres_url) as other:
        first = (await store.claim("alice", "k", *PAY)).payment
        await store.release(first)
        with pytest.raises(LostOwnership):  # let go: the epoch is unchanged, the owner check fences it
            await decide(store, first)
        again = await store.take_over_abandoned(10)  # the same owner takes it back: only the epoch differs
        assert [(p.txn_id, p.epoch) for p in again] == [(first.txn_id, 2)]
        with pytest.raises(LostOwnership):
            await decide(store, first)
        await store.release(again[0])
        resumed = await other.claim("alice", "k", *PAY)  # a retry on another replica resumes a let-go payment
        assert resumed.kind is ClaimKind.RESUMED and resumed.payment.epoch == 3 and resumed.previous_owner is None
        with pytest.raises(LostOwnership):
            await decide(store, again[0])
        await decide(other, resumed.payment)
        assert (await store.claim("alice", "k", *PAY)).kind is ClaimKind.REPLAY


# ---- start-up --------------------------------------------------------------------------------------------------
async def test_replicas_started_at_once_on_an_empty_database_all_come_up(postgres_url: str) -> None:
    stores = [PostgresStore(postgres_url, FAST) for _ in range(4)]
    try:
        await asyncio.gather(*(store.start() for store in stores))
        assert all(store.is_live() for store in stores)
        assert len({store.owner_number for store in stores}) == 4
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    rows = await fetch(postgres_url, "SELECT version FROM schema_migrations ORDER BY version")
    assert [r["version"] for r in rows] == [m.version for m in migrations()]


async def test_a_replica_waits_behind_another_replicas_long_migration(postgres_url: str) -> None:
    holder = await asyncpg.connect(postgres_url)  # another replica, in the middle of a long migration
    try:
        migrating = holder.transaction()
        await migrating.start()
        await holder.execute("SELECT pg_advisory_xact_lock($1, $2)", *MIGRATION_LOCK)
        store = PostgresStore(postgres_url, replace(FAST, command_timeout=1.0))
        starting = asyncio.ensure_future(store.start())
        await eventually(lambda: fetch(postgres_url, "SELECT 1 FROM pg_stat_activity WHERE application_name ="
                                                     " 'strife-gateway' AND wait_event_type = 'Lock'"
                                                     " AND query_start < now() - interval '2 seconds'"
                                                     " AND datname = current_database()"), 10,
                         message="the start to wait on the migration lock past its command timeout")
        await migrating.rollback()
        await starting
    finally:
        await holder.close()
    assert store.is_live()
    await store.close()


async def test_commits_are_durable_even_where_the_database_default_is_not(postgres_url: str) -> None:
    name = postgres_url.rsplit("/", 1)[1]
    await fetch(postgres_url, f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    async with replica(postgres_url) as store:
        async with store._connection("test") as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == "on"


# ---- finishing, sweeping, sessions -------------------------------------------------------------------------------
async def test_finishes_queued_together_share_one_statement_and_each_is_fenced(postgres_url: str) -> None:
    statements: list[str] = []
    async with replica(postgres_url, query_logger=lambda q: statements.append(q.query)) as store:
        payments = []
        for i in range(10):
            payment = (await store.claim("alice", f"k{i}", *PAY)).payment
            await decide(store, payment)
            payments.append(payment)
        statements.clear()
        stale = replace(payments[0], epoch=7)  # an epoch this replica does not hold
        results = await asyncio.gather(*(store.finish_later(p) for p in [*payments[1:], stale]),
                                       return_exceptions=True)
        assert results[:-1] == [None] * 9 and isinstance(results[-1], LostOwnership)
        assert statements.count(FINISH) == 1  # all ten in one statement
        await store.finish(payments[0])
        with pytest.raises(LostOwnership):
            await store.finish(payments[0])  # finished already: nothing of this owner's to finish
    rows = await fetch(postgres_url, "SELECT recovery_point, owner FROM idempotency_keys")
    assert {tuple(r) for r in rows} == {("finished", None)} and len(rows) == 10


async def test_sweep_deletes_finished_keys_past_the_ttl_in_batches_and_keeps_the_history(postgres_url: str) -> None:
    small = replace(FAST, sweep_batch=2)
    async with replica(postgres_url, small) as a, replica(postgres_url, small) as b:
        for i in range(7):
            payment = (await a.claim("alice", f"done-{i}", *PAY)).payment
            await decide(a, payment)
            await a.finish(payment)
        await decide(a, (await a.claim("alice", "decided", *PAY)).payment)
        await a.claim("alice", "started", *PAY)
        assert await a.sweep_keys(3600) == 0  # none is an hour old
        assert sum(await asyncio.gather(a.sweep_keys(0), b.sweep_keys(0))) == 7  # two sweepers, no fight
        keys = await fetch(postgres_url, "SELECT idem_key FROM idempotency_keys ORDER BY idem_key")
        assert [r["idem_key"] for r in keys] == ["decided", "started"]  # unfinished keys are never swept
        assert len(await fetch(postgres_url, "SELECT 1 FROM payments")) == 9
        assert (await a.claim("alice", "done-0", *PAY)).kind is ClaimKind.NEW  # past its TTL a key is new


async def test_sessions_are_shared_by_replicas_expire_by_the_store_clock_and_are_swept(postgres_url: str) -> None:
    async with replica(postgres_url) as a, replica(postgres_url) as b:
        token, expires = await a.create_session("alice", "credential-1", 60)
        assert abs(expires - time.time() - 60) < 5
        assert await b.resolve_session(token) == ("alice", "credential-1")
        stored = await fetch(postgres_url, "SELECT * FROM sessions")
        assert token not in repr([tuple(r) for r in stored])
        assert stored[0]["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
        assert await b.end_session(token) == "alice"
        assert await a.resolve_session(token) is None
        assert await a.end_session(token) == "alice"  # its holder logging out again (a lost reply) is answered
        assert await a.end_session("never-issued") is None
        short, _ = await a.create_session("bob", "c", 0.3)
        kept, _ = await a.create_session("carol", "c", 60)
        await eventually(lambda: _expired(b, short), 5, message="the short session to expire")
        assert await b.sweep_sessions() == 1
        assert await a.resolve_session(kept) == ("carol", "c")
        assert await a.resolve_session("x" * 600) is None
        # The logged-out session stays until it expires (so a repeated Logout is known); the expired one is gone.
        assert sorted(r["username"] for r in await fetch(postgres_url, "SELECT username FROM sessions")) == \
            ["alice", "carol"]


async def _expired(store: PostgresStore, token: str) -> bool:
    return await store.resolve_session(token) is None


async def test_ending_an_old_identity_ends_its_session_and_never_a_replica_probing_it(postgres_url: str) -> None:
    """Found in CI: a replica back from a lost session ends its old one, found by the owner lock it holds. A
    survivor that had just found that owner dead was holding the same key (its probe's shared lock, while it took
    the payments over) — and its connection was ended too, failing the take-over."""
    owner = 41
    holder, prober, ender = [await asyncpg.connect(postgres_url) for _ in range(3)]
    try:
        await holder.execute("SELECT pg_advisory_lock($1, $2)", OWNER_LOCK_SPACE, owner)  # a half-open old session
        ended = await ender.fetch(END_OLD_IDENTITY, owner)
        assert [r[0] for r in ended] == [True]  # the old session is ended...
        await eventually(lambda: _ping_fails(holder), 5, message="the old session to end")
        async with prober.transaction():  # ...then a survivor's probe finds the owner dead and holds the key
            assert await prober.fetchval("SELECT pg_try_advisory_xact_lock_shared($1, $2)", OWNER_LOCK_SPACE, owner)
            assert await ender.fetch(END_OLD_IDENTITY, owner) == []  # asked again: nothing to end
            assert await prober.fetchval("SELECT 1") == 1  # the survivor's connection lives on
    finally:
        for conn in (holder, prober, ender):
            conn.terminate()


async def _ping_fails(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1", timeout=1)
    except Exception:  # noqa: BLE001 - any failure (terminated, reset, asyncpg's confused protocol state) will do
        return True
    return False
