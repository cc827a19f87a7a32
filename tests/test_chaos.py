"""The chaos run's short versions (the long one is `python -m bench.chaos`, see bench/chaos.py).

Four wallets' headless cores pay through TCP proxies while a seeded driver SIGKILLs and restarts the gateway
(once with payments waiting in Prepare) and a bank, stalls them with SIGSTOP, cuts the wallet↔gateway and
gateway↔bank links and loses replies on them. Afterwards every invariant of the money is checked against the
ledgers, the gateway's store and the wallets' outboxes on disk. The PostgreSQL version runs two gateway
replicas on a database of its own, kills replicas, restarts the store (as its clients see it), and cuts and
loses replies on a replica's store link. Then the defects these runs found, each as a test of its own.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import grpc
import pytest

from bench.chaos import ChaosConfig, ChaosReport, run_chaos
from bench.chaos import main as chaos_main
from bench.chaos_faults import FAULTS
from bench.chaos_store import through
from protofiles import payment_pb2 as pb
from servers.config import load_banks
from servers.gateway.coordinator import Banks, Coordinator
from servers.gateway.store.errors import StoreUnavailable
from servers.gateway.store.pg_connection import PostgresOptions
from servers.gateway.store.postgres import PostgresStore
from tests.harness import OPENING, OPENING_ACCOUNTS, OPENING_TOTAL, Cluster, wait_until
from tests.pg_support import admin_url, eventually, require_postgres
from tests.store_view import StoreView
from tests.tcpproxy import TcpProxy

# ~70 payments spread over 15 s of faults; the whole run takes about 25 s on 2 cores and is cut off at 50 s.
SHORT = ChaosConfig(payments=72, wallets=4, seed=20_461, seconds_budget=50.0, chaos_seconds=15.0)


def settled(report: ChaosReport, config: ChaosConfig, faults: tuple[str, ...]) -> dict:
    """Every invariant held, every payment has an outcome, some got through, and every kind of fault in `faults`
    happened at least once while the wallets were paying; the run's figures."""
    print(report.text())  # the figures, shown with -s or when the test fails
    assert report.ok, report.text()
    f = report.figures
    assert f["submitted"] == config.payments
    assert f["succeeded"] + f["declined"] + f["failed"] == config.payments
    assert f["succeeded"] > 0, "chaos so heavy that nothing got through proves little"
    assert set(f["faults_by_kind"]) == set(faults), f["faults_by_kind"]
    return f


def test_chaos_every_key_settles_once_and_money_is_conserved(tmp_path: Path, certs_dir: Path) -> None:
    f = settled(run_chaos(tmp_path, certs_dir, SHORT), SHORT, FAULTS)
    assert f["gateway_kills"] >= 2 and f["gateway_kills_mid_payment"] >= 1 and f["bank_kills"] >= 1


# The PostgreSQL variant: two replicas, each wallet given both, the faults that concern replicas and their store
# (the banks' own faults are the SQLite run's: they do not depend on the store). About 20 s on 2 cores.
REPLICA_FAULTS = ("kill_gateway", "kill_gateway_mid_payment", "stall_gateway", "cut_wallet_link",
                  "restart_store", "cut_store_link", "drop_store_replies")
PG_SHORT = ChaosConfig(payments=40, wallets=4, seed=7, gateways=2, seconds_budget=45.0, chaos_seconds=8.0,
                       faults=REPLICA_FAULTS)


def test_chaos_on_postgresql_replicas_killed_and_store_restarted_every_key_settles_once(
        tmp_path: Path, certs_dir: Path) -> None:
    require_postgres()
    report = run_chaos(tmp_path, certs_dir, replace(PG_SHORT, store=admin_url()))
    f = settled(report, PG_SHORT, REPLICA_FAULTS)
    assert f["gateway_kills"] >= 2 and f["store_restarts"] >= 1 and f["store_link_cuts"] >= 1
    assert f["owner_changes"] >= 1, "no replica lost its store session and came back under a new owner"
    # The run's own database is gone again (only a failed run keeps it).
    database = str(f["store_database"])
    assert database.startswith("strife_chaos_") and not report.notes
    assert not asyncio.run(_database_exists(database))


async def _database_exists(name: str) -> bool:
    import asyncpg

    conn = await asyncpg.connect(admin_url(), timeout=10)
    try:
        return bool(await conn.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


def test_chaos_cli_refuses_a_store_it_cannot_use_without_showing_a_password(
        capsys: pytest.CaptureFixture[str]) -> None:
    for store in ("mysql://chaos:s3cret-pw@db/strife", "postgresql://chaos:s3cret-pw@/strife?host=/run/pg"):
        with pytest.raises(SystemExit) as exit_:
            chaos_main(["--store", store, "--payments", "4"])
        assert exit_.value.code == 2
        error = capsys.readouterr().err
        assert "--store" in error and "s3cret-pw" not in error, error


# ---- defects the chaos run found -------------------------------------------------------------------------------
def test_regression_prepare_vote_timeout_after_a_gateway_stall_fails_the_payment_cleanly(
        make_cluster: Callable[..., Cluster]) -> None:
    """Found by the chaos run (seed 11): the gateway was frozen (SIGSTOP) while Prepares were outstanding. On
    SIGCONT the wait for a vote (`future.result(timeout=deadline + 0.5 s)`) expired before gRPC had failed the
    call with DEADLINE_EXCEEDED, and raised `grpc.FutureTimeoutError`, which is not the
    `concurrent.futures.TimeoutError` the coordinator caught. The payment escaped as UNKNOWN "Exception calling
    application" (the wallet recorded a final failure with no transaction id) instead of a failed payment.
    A vote that does not come in time must fail the payment with a response, like any other timeout."""
    txn_timeout = 3.0  # long enough for all the payments to be waiting for votes at once
    cluster = make_cluster(txn_timeout=txn_timeout)
    routes = [("alice", "SBI-1001", "HDFC-2001"), ("bob", "HDFC-2001", "SBI-1002"),
              ("carol", "SBI-1002", "HDFC-2002"), ("alice", "HDFC-2002", "SBI-1003"),
              ("carol", "HDFC-2003", "SBI-1001"), ("bob", "HDFC-2001", "SBI-1003")]
    clients = {user: cluster.client(user) for user in {r[0] for r in routes}}
    before = cluster.accounts()
    results: dict[int, object] = {}

    def pay(i: int, user: str, src: str, dst: str) -> None:
        try:
            results[i] = clients[user].pay(f"stall-{i}-{uuid.uuid4()}", src, dst, 1.25, timeout=30)
        except grpc.RpcError as exc:
            results[i] = exc

    cluster.procs["SBI"].pause()  # every payment touches SBI: its Prepare gets no vote
    threads = [threading.Thread(target=pay, args=(i, *route)) for i, route in enumerate(routes)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: cluster.view.count_keys("started") == len(routes), txn_timeout,
                   message="every payment to wait for its votes")
        cluster.procs["gateway"].pause()
        # The fault itself, not synchronisation: the vote deadline and its grace pass while the gateway is frozen.
        time.sleep(txn_timeout + 1.5)
    finally:
        cluster.procs["gateway"].resume()
        cluster.procs["SBI"].resume()
    for t in threads:
        t.join(40)
    assert not any(t.is_alive() for t in threads)

    # Every caller gets a payment's response, never UNKNOWN. A payment claimed just before the stall may send its
    # Prepare only after it, with a deadline of its own, and be paid: the claim (what the test can see) comes
    # before the Prepare. So a success is allowed, but the stall must have failed some payments cleanly.
    expected = {account: balance for account, (balance, _) in before.items()}
    for i, result in sorted(results.items()):
        assert isinstance(result, pb.PaymentResponse), f"payment {i}: {result!r}"
        assert result.transaction_id and result.status in (pb.PAYMENT_STATUS_FAILED, pb.PAYMENT_STATUS_SUCCEEDED)
        if result.status == pb.PAYMENT_STATUS_FAILED:
            assert "no money moved" in result.message, result.message
        else:
            _, src, dst = routes[i]
            expected[src] -= 125
            expected[dst] += 125
    assert any(r.status == pb.PAYMENT_STATUS_FAILED for r in results.values())
    wait_until(lambda: cluster.unfinished_payments() == 0 and cluster.holds() == 0, 15,
               message="every payment to be finished and every hold released")
    assert {account: balance for account, (balance, _) in cluster.accounts().items()} == expected
    assert cluster.total() == OPENING_TOTAL


def test_regression_a_replica_that_loses_its_store_session_mid_payment_answers_unavailable(
        make_cluster: Callable[..., Cluster], postgres_url: str) -> None:
    """Found by the chaos run on PostgreSQL (3 replicas, seed 1): a replica's store link dropped while a payment
    waited for its votes. Its decision was then refused by the store's fence (LostOwnership: the replica no
    longer owned the payment), and the exception escaped the call as UNKNOWN "Unexpected <class
    'LostOwnership'>" with a traceback in the log. The wallet took UNKNOWN for a final failure and recorded
    "failed" with no transaction id, though the payment's outcome was still to be decided by whichever replica
    took it over. A replica that no longer owns the payment must answer UNAVAILABLE (retry with the same key),
    and that retry gets the payment's one outcome."""
    proxy = TcpProxy(urlsplit(postgres_url).port or 5432)
    try:
        cluster = make_cluster(store=through(postgres_url, proxy.address), txn_timeout=3.0)
        view = StoreView(postgres_url, cluster.data_dir)  # straight to the store, not through the cut link
        alice = cluster.client("alice")
        key = f"lost-session-{uuid.uuid4()}"
        outcome: list[object] = []

        def pay() -> None:
            try:
                outcome.append(alice.pay(key, "SBI-1001", "HDFC-2001", 12.5, timeout=20))
            except grpc.RpcError as exc:
                outcome.append(exc)

        cluster.procs["SBI"].pause()  # the payment waits in Prepare…
        payer = threading.Thread(target=pay)
        payer.start()
        try:
            wait_until(lambda: view.count_keys("started") == 1, 10, message="the payment to wait for its votes")
            proxy.cut()               # …while its replica loses the store
            wait_until(lambda: "lost the store session" in cluster.procs["gateway"].log(), 10,
                       message="the replica to notice its lost store session")
        finally:
            cluster.procs["SBI"].resume()
        payer.join(30)
        assert outcome, "the payment call did not return"
        error = outcome[0]
        assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert "retry with the same idempotency key" in error.details(), error.details()
        assert "raised by servicer method" not in cluster.procs["gateway"].log()  # no unhandled exception

        proxy.restore()
        final = alice.pay_until_final(key, "SBI-1001", "HDFC-2001", 12.5, deadline=30)
        wait_until(lambda: view.unfinished() == 0 and cluster.holds() == 0, 20,
                   message="the payment to be finished and its holds released")
        # Resumed by the retry (and paid) or aborted by a completer: either way one payment, as the answer says.
        paid = final.status == pb.PAYMENT_STATUS_SUCCEEDED
        assert paid or final.status == pb.PAYMENT_STATUS_FAILED, final
        assert view.payments_with_key("alice", key) == [(final.transaction_id, "succeeded" if paid else "failed")]
        moved = 1250 if paid else 0
        expected = dict(OPENING_ACCOUNTS, **{"SBI-1001": (OPENING_ACCOUNTS["SBI-1001"][0] - moved, 0),
                                             "HDFC-2001": (OPENING_ACCOUNTS["HDFC-2001"][0] + moved, 0)})
        assert cluster.accounts() == expected
    finally:
        proxy.close()


async def test_regression_an_unreachable_store_is_logged_in_one_line_not_a_traceback_a_second(
        postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Found by the chaos run on PostgreSQL (the first run with a store restart): while the store was away, every
    replica's log got a full traceback about once a second — asyncpg's pool trying to restore its connection
    floor logs "Failed to restore the pool connection floor; retrying" with the exception attached. A store
    that is away is an expected condition (CONTRACT §9: calls fail with UNAVAILABLE until it is back), and a
    traceback in a server's log means a bug to whoever reads it: one line with the reason, password masked."""
    caplog.set_level(logging.WARNING, logger="asyncpg.pool")
    proxy = TcpProxy(urlsplit(postgres_url).port or 5432)
    url = through(postgres_url, proxy.address).replace("postgres@", "postgres:s3cret-pw@", 1)
    options = PostgresOptions(liveness_interval=0.2, liveness_timeout=2.0, command_timeout=3.0, connect_timeout=3.0)
    store = PostgresStore(url, options)
    await store.start()
    try:
        proxy.cut()  # every pooled connection closes; the pool then tries to get back to its floor, and fails
        await eventually(lambda: any("connection floor" in r.getMessage() for r in caplog.records), 10,
                         message="the pool's attempt to restore its connection floor")
        proxy.restore()
        await eventually(store.is_live, 10, message="the store to be back")
    finally:
        await store.close()
        proxy.close()
    floor = [r for r in caplog.records if "connection floor" in r.getMessage()]
    assert all(r.exc_info is None and r.exc_text is None for r in floor), "a traceback for a store that is away"
    assert all("retrying (" in r.getMessage() for r in floor), [r.getMessage() for r in floor]  # the reason
    assert "s3cret-pw" not in caplog.text


@pytest.mark.parametrize("noticed", [True, False], ids=["session-loss-noticed", "link-just-cut"])
async def test_regression_a_completer_pass_that_loses_its_store_session_logs_one_line_not_a_traceback(
        make_cluster: Callable[..., Cluster], postgres_url: str, caplog: pytest.LogCaptureFixture,
        noticed: bool) -> None:
    """Found by the chaos run on PostgreSQL (3 replicas, seed 1): a replica's completer had taken over a dead
    replica's payment when its own store session dropped; the store's fence then refused its write
    (LostOwnership), and the completer logged that as an unexpected failure, with a traceback. Losing the
    session is expected (whoever owns the payment now completes it): one line. So is a store link that drops
    mid-pass before the loss is noticed (StoreUnavailable): the pass ends, and the completer loop says so in
    one line. The payment is completed once the replica has the store back.

    The fault is real (a cut link, through a proxy); it is timed by doing it from inside the store call that
    follows the take-over, the one moment of a pass the fault must hit."""
    caplog.set_level(logging.INFO)
    cluster = make_cluster(start=False)
    for bank in OPENING:
        cluster.procs[bank] = cluster.bank_proc(bank).start()
        cluster.wait_bank(bank)
    options = PostgresOptions(liveness_interval=0.2, liveness_timeout=2.0, command_timeout=3.0, connect_timeout=3.0)
    dead = PostgresStore(postgres_url, options)  # a replica that claims a payment and is gone before deciding
    await dead.start()
    left = (await dead.claim("alice", "left-by-the-dead", "SBI-1001", "HDFC-2001", 1250)).payment
    await dead.close()

    proxy = TcpProxy(urlsplit(postgres_url).port or 5432)
    store = PostgresStore(through(postgres_url, proxy.address), options)
    banks = Banks(load_banks(cluster.config_dir), cluster.certs_dir)
    await store.start()
    try:
        coordinator = Coordinator(store, banks, 2.0, asyncio.Event())
        decide = store.decide

        async def decide_after_losing_the_store(*args: Any) -> None:
            proxy.cut()
            if noticed:
                await eventually(lambda: not store.is_live(), 5, message="the session loss to be noticed")
            await decide(*args)

        store.decide = decide_after_losing_the_store  # type: ignore[method-assign]
        if noticed:
            assert await coordinator.complete_abandoned() == 0
            assert any(left.txn_id in r.getMessage() and "current owner" in r.getMessage() for r in caplog.records)
        else:
            try:
                assert await coordinator.complete_abandoned() == 0  # the fence refused it (the loss was noticed)
            except StoreUnavailable:
                pass  # the pass ended: the completer loop logs it in one line and tries again
        tracebacks = [r.getMessage() for r in caplog.records if r.exc_info and r.name.startswith("strife")]
        assert tracebacks == []

        store.decide = decide  # type: ignore[method-assign]
        proxy.restore()
        await eventually(store.is_live, 10, message="the store session to be back")
        await eventually(coordinator.complete_abandoned, 10, message="the payment to be completed")
    finally:
        await store.close()
        await banks.close()
        proxy.close()
    view = StoreView(postgres_url, cluster.data_dir)  # its own event loop: off this one
    assert await asyncio.to_thread(view.payments_with_key, "alice", "left-by-the-dead") == [(left.txn_id, "failed")]
    assert await asyncio.to_thread(view.unfinished) == 0
    assert cluster.accounts() == OPENING_ACCOUNTS  # aborted: no money moved, no hold anywhere
