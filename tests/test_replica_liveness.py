"""A gateway replica that loses its PostgreSQL store (CONTRACT §9): its liveness session killed, or the whole link
cut. It reports NOT_SERVING and refuses calls with UNAVAILABLE while it has no session; a survivor takes its
in-flight payment over and that decision stands (the old replica's late write is fenced); it serves again, with
a new owner id, without a restart. The shared PostgreSQL server is never touched: faults are made on this test's
own database (its backends, a lock on its owner-number sequence) or on a proxy in front of it.
"""
from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest

from servers.gateway.store.postgres_sql import LIVENESS_APPLICATION, OWNER_LOCK_SPACE
from tests.harness import OPENING, Client, Cluster, wait_until
from tests.tcpproxy import TcpProxy
from tests.gateway_support import (FAILED, SUCCEEDED, MakeCluster, assert_conserved, key, key_row, payments_with_key,
                                   wait_settled)
from tests.test_pg_faults import proxied
from tests.pg_store_support import fetch
from tests.test_replicas import start_replicas

pytestmark = pytest.mark.timeout(120)
LATE = 2.0  # seconds a replica waits between the votes and storing its decision: time for the faults


def sql(url: str, statement: str, *args: object) -> list[tuple]:
    return [tuple(r) for r in asyncio.run(fetch(url, statement, *args))]


@contextmanager
def no_new_owner_numbers(url: str) -> Iterator[None]:
    """While inside, no replica can draw a new owner number: ALTER SEQUENCE holds a lock that nextval waits on
    until the transaction ends. So a replica that lost its session stays without one for as long as a test
    needs, instead of the few milliseconds its reconnect takes."""
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(url))
    try:
        loop.run_until_complete(conn.execute("BEGIN; ALTER SEQUENCE owner_numbers OWNED BY NONE"))
        yield
    finally:
        loop.run_until_complete(conn.close())  # ends the transaction: the waiting replicas draw their numbers
        loop.close()


def liveness_backend(url: str, owner: str) -> int:
    """The backend of replica `owner`'s liveness session, found as an operator would: by its application name.
    It is the session that holds the owner's advisory lock."""
    rows = sql(url, "SELECT a.pid, l.pid IS NOT NULL FROM pg_stat_activity a LEFT JOIN pg_locks l ON l.pid = a.pid"
                    " AND l.locktype = 'advisory' AND l.classid = $1 AND l.objid = $2 AND l.objsubid = 2"
                    " AND l.granted WHERE a.datname = current_database() AND a.application_name = $3",
               OWNER_LOCK_SPACE, int(owner), f"{LIVENESS_APPLICATION}{owner}")
    assert len(rows) == 1 and rows[0][1], rows
    return rows[0][0]


def call(fn: Callable[[], object]) -> object:
    """The response, or the error's (code, details)."""
    try:
        return fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def pay_until_both_banks_hold(cluster: Cluster, client: Client, amount: float
                              ) -> tuple[str, str, threading.Thread, list]:
    """A payment by `client` from a thread of its own (its gateway delays after the votes), returned once both
    banks voted YES and hold the money: its key, its transaction id, the thread, and where its answer (or
    error, `call`) will be."""
    k, answer = key(), []
    payer = threading.Thread(target=lambda: answer.append(call(
        lambda: client.pay(k, "SBI-1001", "HDFC-2001", amount, timeout=30))))
    payer.start()
    txn = wait_until(lambda: (row := key_row(cluster, client.user, k)) and row.txn_id, 10, message="the claim")
    wait_until(lambda: all(cluster.txn_states(b).get(txn) == "prepared" for b in OPENING), 10,
               message="both banks' YES votes")
    return k, txn, payer, answer


def test_a_replica_whose_store_session_is_killed_stops_until_it_has_a_new_one_and_its_late_write_is_fenced(
        make_cluster: MakeCluster, postgres_url: str) -> None:
    # gateway2's payments wait between the banks' votes and storing the decision: there, its session is killed.
    cluster = start_replicas(make_cluster, postgres_url, ["gateway", "gateway2"],
                             env={"gateway2": {"STRIFE_DELAY_AT": f"after_prepare:{LATE}"}})
    stale = cluster.procs["gateway2"]
    alice = cluster.client("alice", address=cluster.gateway_address("gateway2"))
    old_owner = cluster.owner_of("gateway2")

    k, txn, payer, answer = pay_until_both_banks_hold(cluster, alice, 70)
    assert cluster.holds() == 7_000
    assert (key_row(cluster, "alice", k).owner, key_row(cluster, "alice", k).epoch) == (old_owner, 1)

    with no_new_owner_numbers(postgres_url):
        sql(postgres_url, "SELECT pg_terminate_backend($1)", liveness_backend(postgres_url, old_owner))
        wait_until(lambda: not cluster.serving("gateway2"), 5, message="NOT_SERVING")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:  # its pool still works: it refuses, it does not hang
            alice.pay(key(), "SBI-1001", "HDFC-2001", 1, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 3
        assert "lost its store session" in refused.value.details()
        # The survivor's completer takes the payment over (epoch 2), decides ABORT — it cannot know the votes —
        # and tells both banks.
        taken = wait_until(lambda: (row := key_row(cluster, "alice", k)).recovery_point == "finished" and row, 10,
                           message="the survivor to take the payment over and finish it")
        assert (taken.epoch, taken.response.status) == (2, FAILED)
        assert f"aborted undecided payment {txn}" in cluster.procs["gateway"].log()
        assert not cluster.serving("gateway2")  # still without a session: still not serving

    # A new owner number: it serves again, the same process, not restarted.
    wait_until(lambda: cluster.serving("gateway2"), 10, message="SERVING again")
    new_owner = cluster.owner_of("gateway2")
    assert new_owner != old_owner and stale.alive
    assert f"this replica is now owner {new_owner} (was {old_owner})" in stale.log()

    # Its own run of the payment, with two YES votes, comes to store COMMIT — too late: the write is fenced, the
    # survivor's ABORT stands, and its caller is told to ask again.
    payer.join(LATE + 20)
    assert answer and answer[0][0] == grpc.StatusCode.UNAVAILABLE, answer
    assert "retry with the same idempotency key" in answer[0][1]
    wait_settled(cluster)
    final = key_row(cluster, "alice", k)
    assert (final.recovery_point, final.epoch, final.response.status) == ("finished", 2, FAILED)
    assert payments_with_key(cluster, "alice", k) == [(txn, "failed")]
    assert cluster.txn_states("SBI")[txn] == cluster.txn_states("HDFC")[txn] == "aborted"
    replay = alice.pay(k, "SBI-1001", "HDFC-2001", 70)
    assert replay.replayed and replay.transaction_id == txn and replay.status == FAILED
    assert cluster.balance("SBI-1001") == 500_000
    assert_conserved(cluster)


def test_a_replica_that_loses_its_store_fails_fast_half_does_nothing_and_serves_again_when_it_is_back(
        make_cluster: MakeCluster, postgres_url: str) -> None:
    proxy = TcpProxy(urlsplit(postgres_url).port or 5432)
    try:
        # Its store is reached through the proxy; its payments wait a moment between the votes and the decision.
        cluster = start_replicas(make_cluster, postgres_url, ["gateway"], args={"gateway": [
            "--store", proxied(postgres_url, proxy)]}, env={"gateway": {"STRIFE_DELAY_AT": "after_prepare:1.5"}})
        gateway = cluster.procs["gateway"]
        pid, old_owner = gateway.popen.pid, cluster.owner_of()
        alice = cluster.client("alice")

        # A payment in flight when the store goes: both banks voted YES and hold the money.
        k, txn, payer, answer = pay_until_both_banks_hold(cluster, alice, 20)
        proxy.cut()
        wait_until(lambda: not cluster.serving("gateway"), 5, message="NOT_SERVING")
        for attempt in (lambda: alice.pay(key(), "SBI-1001", "HDFC-2001", 1, timeout=5),  # refused, not hung
                        lambda: alice.history(),
                        lambda: cluster.client("bob")):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                attempt()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
            assert time.monotonic() - started < 4
            assert "postgres:***@" in refused.value.details() or "lost its store session" in refused.value.details()
        # The in-flight payment cannot store its decision: its caller is told to retry, nothing is half-done.
        payer.join(20)
        assert answer and answer[0][0] == grpc.StatusCode.UNAVAILABLE, answer
        assert key_row(cluster, "alice", k).recovery_point == "started"
        assert cluster.balance("SBI-1001") == 500_000 and cluster.holds() == 2_000  # held, not moved

        proxy.restore()
        wait_until(lambda: cluster.serving("gateway"), 15, message="SERVING again")
        assert gateway.alive and gateway.popen.pid == pid and cluster.owner_of() != old_owner
        # What it held under its old identity is recovered like a dead replica's — by itself: aborted, released.
        wait_settled(cluster)
        assert cluster.txn_states("SBI")[txn] == cluster.txn_states("HDFC")[txn] == "aborted"
        retry = alice.pay(k, "SBI-1001", "HDFC-2001", 20)
        assert retry.replayed and retry.transaction_id == txn and retry.status == FAILED
        bob = cluster.client("bob")  # logins work again, and so do payments
        assert bob.pay(key(), "HDFC-2001", "SBI-1002", 5).status == SUCCEEDED
        assert cluster.balance("SBI-1001") == 500_000
        assert cluster.balance("SBI-1002") == 250_000 + 500
        assert_conserved(cluster)
    finally:
        proxy.close()
