"""The PostgreSQL store when the store misbehaves: a cut link, killed backends, a lost reply, a cancelled call,
a store that is not there at start — and a password that never shows. The server is shared, so faults are made
between the store and it (tests/tcpproxy.py) or on the store's own backends, never on the server itself."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from servers.gateway.store.errors import StoreUnavailable
from servers.gateway.store.pg_connection import PostgresOptions
from servers.gateway.store.postgres import PostgresStore
from servers.gateway.store.postgres_sql import migrations
from servers.gateway.store.spec import check_spec
from servers.gateway.store.url import mask_url, scrub
from servers.gateway.store.records import ClaimKind
from tests.harness import free_port
from tests.pg_support import eventually
from tests.tcpproxy import TcpProxy
from tests.pg_store_support import FAST, PAY, THIS_DATABASE, lock_gone, fetch, key_row, replica

pytestmark = pytest.mark.timeout(90)

SECRET = "s3cret-Pa55word"


def proxied(url: str, proxy: TcpProxy, password: str = SECRET) -> str:
    """`url` through the proxy, with a password (the test server trusts loopback, so it is never checked)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, f"{parts.username}:{password}@127.0.0.1:{proxy.port}", parts.path,
                       parts.query, parts.fragment))


def target_port(url: str) -> int:
    return urlsplit(url).port or 5432


async def test_a_cut_link_fails_fast_and_the_replica_serves_again_once_it_is_back(
        postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = TcpProxy(target_port(postgres_url))
    try:
        async with replica(proxied(postgres_url, proxy)) as store:
            first_owner = store.owner_number
            before = (await store.claim("alice", "before-cut", *PAY)).payment
            proxy.cut()
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as cut:
                await store.history("alice", ("SBI-1001",), 10)
            assert time.monotonic() - started < FAST.command_timeout
            await eventually(lambda: not store.is_live(), 5, message="the lost session to be noticed")
            with pytest.raises(StoreUnavailable) as refused:
                await store.claim("alice", "during-cut", *PAY)
            for exc in (cut.value, refused.value):
                assert SECRET not in str(exc) and "\n" not in str(exc)
            assert f"postgres:***@127.0.0.1:{proxy.port}" in str(cut.value)

            proxy.restore()
            await eventually(store.is_live, 10, message="the replica to be back")
            assert store.owner_number != first_owner
            assert (await store.claim("alice", "after-cut", *PAY)).kind is ClaimKind.NEW
            # The payment it held under its old identity is recovered like a dead owner's — by itself too.
            taken = await eventually(lambda: store.take_over_abandoned(10), 10, message="the old payment")
            assert [(p.txn_id, p.epoch) for p in taken] == [(before.txn_id, 2)]
    finally:
        proxy.close()
    assert SECRET not in caplog.text


async def test_a_closed_session_is_noticed_at_once_and_no_payment_is_taken_until_it_is_back(
        postgres_url: str) -> None:
    # Checks every 30 s: noticing within seconds is the driver's notice that the session closed.
    proxy = TcpProxy(target_port(postgres_url))
    try:
        async with replica(proxied(postgres_url, proxy), replace(FAST, liveness_interval=30)) as store:
            first_owner = store.owner_number
            proxy.cut()  # closes every connection, and refuses new ones: it stays without a session
            await eventually(lambda: not store.is_live(), 3, message="the loss to be noticed")
            with pytest.raises(StoreUnavailable, match="lost its session"):
                await store.claim("alice", "k", *PAY)
            assert await store.take_over_abandoned(10) == [] and await store.owned_unfinished() == []
            proxy.restore()
            await eventually(store.is_live, 10, message="the new identity")
            assert store.owner_number != first_owner
            assert (await store.claim("alice", "k", *PAY)).kind is ClaimKind.NEW
    finally:
        proxy.close()


async def test_a_silent_link_is_noticed_within_the_liveness_timeout(postgres_url: str) -> None:
    proxy = TcpProxy(target_port(postgres_url))
    try:
        async with replica(proxied(postgres_url, proxy)) as store:
            first_owner = store.owner_number
            proxy.stall()
            await eventually(lambda: not store.is_live(), FAST.liveness_interval + FAST.liveness_timeout + 2,
                             message="the silent session to be noticed")
            with pytest.raises(StoreUnavailable):
                await store.claim("alice", "k", *PAY)
            proxy.flow()
            await eventually(store.is_live, 15, message="the replica to be back")
            assert store.owner_number != first_owner
            assert (await store.claim("alice", "k", *PAY)).kind is ClaimKind.NEW
        await eventually(lambda: lock_gone(postgres_url, first_owner), 10, message="the old session to end")
    finally:
        proxy.close()


async def test_terminated_pool_backends_cost_at_most_an_unavailable_call(postgres_url: str) -> None:
    # Regression: a backend terminated between two calls could leave asyncpg's protocol confused ("another
    # operation is in progress", InternalClientError) — an error that escaped as a bug instead of UNAVAILABLE
    # and kept the connection. It is a race (the backend's FATAL message against the socket's EOF), so rounds.
    async with replica(postgres_url, PostgresOptions(**{**FAST.__dict__, "pool_min": 2})) as store:
        owner = store.owner_number
        await store.claim("alice", "k", *PAY)
        for _ in range(8):
            rows = await fetch(postgres_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                             " WHERE datname = current_database() AND application_name ="
                                             " 'strife-gateway' AND pid <> ALL (SELECT pid FROM pg_locks"
                                             " WHERE locktype = 'advisory' AND objid = $1 AND objsubid = 2"
                                             f" AND {THIS_DATABASE})", owner)
            assert rows  # the pool's backends, not the liveness session
            failures: list[StoreUnavailable] = []

            async def works() -> bool:
                try:
                    return len(await store.history("alice", ("SBI-1001",), 5)) == 1
                except StoreUnavailable as exc:
                    failures.append(exc)
                    return False

            await eventually(works, 5, interval=0, message="the pool to reconnect")
            assert len(failures) <= len(rows), failures  # at most one per connection that was killed
        assert store.is_live() and store.owner_number == owner


async def test_a_cancelled_call_never_leaves_a_transaction_open_on_a_pooled_connection(postgres_url: str) -> None:
    async with replica(postgres_url) as dead:
        await dead.claim("alice", "k", *PAY)  # undecided; its owner is gone once this block ends
    one = PostgresOptions(**{**FAST.__dict__, "pool_min": 1, "pool_max": 1})
    async with replica(postgres_url, one) as store:
        blocker = await asyncpg.connect(postgres_url)
        try:
            holding = blocker.transaction()
            await holding.start()
            await blocker.fetch("SELECT 1 FROM idempotency_keys WHERE idem_key = 'k' FOR UPDATE")
            # The claim finds the key undecided and locks it in a transaction: it waits for the blocker there.
            claim = asyncio.ensure_future(store.claim("alice", "k", *PAY))
            waiting = await eventually(lambda: fetch(
                postgres_url, "SELECT pid FROM pg_stat_activity WHERE application_name = 'strife-gateway'"
                              " AND wait_event_type = 'Lock' AND datname = current_database()"), 10,
                message="the claim to wait on the row lock")
            claim.cancel()
            with pytest.raises(asyncio.CancelledError):
                await claim
            await holding.rollback()
        finally:
            await blocker.close()
        # The one pooled connection came back without a transaction (or was dropped): the claim can run now.
        in_transaction = await fetch(postgres_url, "SELECT pid FROM pg_stat_activity WHERE application_name ="
                                                   " 'strife-gateway' AND state LIKE 'idle in transaction%'"
                                                   " AND datname = current_database()")
        assert in_transaction == []
        resumed = await store.claim("alice", "k", *PAY)
        assert resumed.kind is ClaimKind.RESUMED and resumed.payment.epoch == 2
        assert waiting  # the cancel really hit a transaction in progress


async def test_a_claim_whose_reply_is_lost_is_released_for_recovery_not_left_stuck(postgres_url: str) -> None:
    proxy = TcpProxy(target_port(postgres_url))
    one = PostgresOptions(**{**FAST.__dict__, "pool_min": 1, "pool_max": 1})
    try:
        async with replica(proxied(postgres_url, proxy), one) as store:
            assert (await store.claim("alice", "warm", *PAY)).kind is ClaimKind.NEW  # the statement is prepared
            # The claim's reply is lost (liveness pings, under 100 bytes, still pass): it committed unseen.
            proxy.drop_replies(1, min_bytes=100)
            with pytest.raises(StoreUnavailable):
                await store.claim("alice", "lost", *PAY)
            row = await key_row(postgres_url, "alice", "lost")
            assert (row["owner"], row["recovery_point"]) == (store.owner_number, "started")
            assert store.is_live()
            # Nobody executes it, yet it reads as this live replica's: the completer pass releases it first,
            # then takes it like any let-go payment.
            taken = await store.take_over_abandoned(10)
            assert [(p.idem_key, p.epoch) for p in taken] == [("lost", 2)]
    finally:
        proxy.close()


async def test_an_unreachable_store_at_start_is_one_line_with_the_password_masked(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()  # nothing listens there
    store = PostgresStore(f"postgresql://strife:{SECRET}@127.0.0.1:{port}/payments", FAST)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as failed:
        await store.start()
    message = str(failed.value)
    assert time.monotonic() - started < FAST.connect_timeout + 1
    assert f"postgresql://strife:***@127.0.0.1:{port}/payments" in message
    assert SECRET not in message and "\n" not in message
    assert not store.is_live()
    assert SECRET not in caplog.text
    await store.close()


async def test_a_missing_database_at_start_is_one_line(postgres_url: str) -> None:
    parts = urlsplit(postgres_url)
    url = urlunsplit((parts.scheme, parts.netloc, parts.path + "_missing", "", ""))
    with pytest.raises(StoreUnavailable, match="does not exist") as failed:
        await PostgresStore(url, FAST).start()
    assert "\n" not in str(failed.value)


@pytest.mark.parametrize("url, shown", [
    ("postgresql://u:p%40ss@db.example:5433/pay?sslmode=require", "postgresql://u:***@db.example:5433/pay?sslmode=require"),
    ("postgres://u@h/db", "postgres://u@h/db"),
    ("postgresql://h/db?password=hunter2&sslmode=verify-full", "postgresql://h/db?password=***&sslmode=verify-full"),
    ("postgresql://u:@h/db", "postgresql://u:***@h/db"),
])
def test_mask_url_hides_every_password(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_scrub_takes_the_password_out_of_any_text() -> None:
    url = "postgresql://u:p%40ss@h/db"
    text = f"could not connect to {url} with password p@ss (p%40ss)"
    assert scrub(text, url) == "could not connect to postgresql://u:***@h/db with password *** (***)"


@pytest.mark.parametrize("port", ["notaport", "99999", "-1"])
def test_a_store_url_whose_port_is_not_a_port_is_refused_before_any_connection(port: str) -> None:
    url = f"postgresql://strife:p@db.example:{port}/payments"  # a one-letter password: nothing else is starred
    with pytest.raises(ValueError) as refused:
        check_spec(url)
    assert str(refused.value) == (f"the port in the store URL postgresql://strife:***@db.example:{port}/payments "
                                  "must be a number from 1 to 65535")


async def test_a_schema_migrated_by_a_newer_gateway_is_refused_at_start(postgres_url: str) -> None:
    async with replica(postgres_url):
        pass
    newest = len(migrations())
    await fetch(postgres_url, "INSERT INTO schema_migrations (version, name) VALUES ($1, 'from the future')",
                newest + 1)
    with pytest.raises(StoreUnavailable) as refused:
        await PostgresStore(postgres_url, FAST).start()
    assert f"its schema is at version {newest + 1}, newer than this gateway knows ({newest})" in str(refused.value)
    assert "\n" not in str(refused.value)
