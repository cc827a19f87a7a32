"""Exactly-once across failures (CONTRACT §5, §6): lost replies, gateway crashes at every recovery point,
`kill -9` at random moments, banks killed, two gateways on one store, and the sweep of old keys.

Every test runs real processes over real TLS and asserts on the ledgers on disk: balances, holds, the state of
each transaction id at each bank, and that the total of all balances never changes.
"""
from __future__ import annotations

import random
import sqlite3
import threading
import time
import uuid

import grpc
import pytest

from protofiles import payment_pb2 as pb
from servers.faults import POINTS
from tests.harness import OPENING, Client, Cluster, Proc, send_duplicates, wait_until
from tests.gateway_support import (AT_CRASH, FAILED, MOVES_MONEY, RETRYABLE, SUCCEEDED, TXN_TIMEOUT, MakeCluster,
                                   assert_conserved, committed, key, key_row, pay_into_the_crash, payments_with_key,
                                   run_together, start_extra_gateway, start_with_gateway_crash_at,
                                   start_with_gateway_env, wait_killed_itself, wait_settled)
from tests.pg_support import on_both_stores
from tests.tcpproxy import TcpProxy

gateway_store = on_both_stores  # every cluster test here runs on SQLite and on PostgreSQL


@pytest.fixture
def cluster(make_cluster: MakeCluster) -> Cluster:
    return make_cluster(txn_timeout=TXN_TIMEOUT)


def assert_settled_once(cluster: Cluster, k: str, txn: str, moved: bool, paise: int) -> None:
    """alice's SBI-1001 → HDFC-2001 payment under key `k` ended as one transaction, at both banks alike, and
    moved its amount exactly once (or not at all)."""
    for bank in OPENING:
        assert cluster.txn_states(bank)[txn] == ("committed" if moved else "aborted")
    assert payments_with_key(cluster, "alice", k) == [(txn, "succeeded" if moved else "failed")]
    assert cluster.balance("SBI-1001") == 500_000 - (paise if moved else 0)
    assert cluster.balance("HDFC-2001") == 300_000 + (paise if moved else 0)
    assert_conserved(cluster)


# ---- a lost reply, a restart ---------------------------------------------------------------------------------
def test_retry_after_lost_reply_debits_once(cluster: Cluster) -> None:
    proxy = TcpProxy(cluster.gateway_port)
    try:
        alice = cluster.client("alice", address=proxy.address)
        k = key()
        # The request reaches the gateway and executes; only the response is lost on the way back.
        proxy.drop_replies(1, min_bytes=100)
        with pytest.raises(grpc.RpcError) as err:
            alice.pay(k, "SBI-1001", "HDFC-2001", 75.50)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert proxy.dropped_replies == 1
        # The payment ran to its end although nobody heard the answer (the finish mark is written just
        # after the reply, in the gateway's next group commit).
        executed = wait_until(lambda: (row := key_row(cluster, "alice", k)) is not None
                              and row.recovery_point == "finished" and row, 10, message="the payment finished")
        assert cluster.balance("SBI-1001") == 500_000 - 7_550

        # Retried as a wallet would: same key, again on UNAVAILABLE (the channel may first trip over the reset).
        retry = alice.pay_until_final(k, "SBI-1001", "HDFC-2001", 75.50, deadline=15)
        assert retry.replayed and retry.success and retry.status == SUCCEEDED
        assert retry.transaction_id == executed.txn_id
        assert payments_with_key(cluster, "alice", k) == [(executed.txn_id, "succeeded")]
        assert committed(cluster, "SBI") == committed(cluster, "HDFC") == {executed.txn_id}
        assert cluster.balance("SBI-1001") == 500_000 - 7_550
        assert cluster.balance("HDFC-2001") == 300_000 + 7_550
        assert_conserved(cluster)
    finally:
        proxy.close()


def test_a_caller_gone_just_after_its_claim_leaves_no_key_in_flight(make_cluster: MakeCluster) -> None:
    """Found by the chaos run (seed 20461, in CI): a wallet's call was cancelled (its link cut) while its claim
    was being committed. The claim made the live gateway the payment's executor, but the cancelled handler never
    started the payment: every retry got ABORTED ("still being processed") for as long as the gateway lived, and
    the cancelled call was logged as OK. Here the gateway waits just after each claim until the caller's deadline
    has passed. The payment must still run, once, and a retry get its outcome."""
    cluster = start_with_gateway_env(make_cluster, {"STRIFE_DELAY_AT": "after_claim:1.0"})
    alice = cluster.client("alice")
    k = key()
    with pytest.raises(grpc.RpcError) as gone:
        alice.pay(k, "SBI-1001", "HDFC-2001", 12.50, timeout=0.3)
    assert gone.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    final = alice.pay_until_final(k, "SBI-1001", "HDFC-2001", 12.50, deadline=10)
    assert final.status == SUCCEEDED
    wait_settled(cluster)
    assert_settled_once(cluster, k, final.transaction_id, moved=True, paise=1_250)
    # The cut-off call's log line says so (it had read "OK").
    first = wait_until(lambda: next((line for line in cluster.procs["gateway"].log().splitlines()
                                     if f"key={k}" in line), None), 5, message="the first call's line")
    assert "status=CANCELLED" in first, first


def test_replay_after_gateway_restart_returns_stored_response_without_new_debit(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    k = key()
    first = alice.pay(k, "SBI-1001", "HDFC-2001", 200)
    assert first.success and not first.replayed
    cluster.restart("gateway")  # SIGKILL, then a fresh process on the same store
    bank_calls = {b: cluster.procs[b].log().count("method=/Bank/Prepare") for b in OPENING}

    again, md = alice.pay_with_call(k, "SBI-1001", "HDFC-2001", 200)  # the token survives the restart too
    assert md.get("idempotent-replayed") == "true"
    assert again.replayed
    again.replayed = False
    assert again == first
    # A fence payment through both banks: once its Prepare lines are written, any Prepare the replay (wrongly)
    # caused would be written too (a bank writes its lines in the order it works).
    fence = alice.pay(key(), "SBI-1001", "HDFC-2001", 1)
    wait_until(lambda: all(f"txn={fence.transaction_id}" in cluster.procs[b].log() for b in OPENING), 5,
               message="the fence's bank lines")
    assert {b: cluster.procs[b].log().count("method=/Bank/Prepare") for b in OPENING} == \
        {b: n + 1 for b, n in bank_calls.items()}
    assert len(payments_with_key(cluster, "alice", k)) == 1
    assert cluster.balance("SBI-1001") == 500_000 - 20_000 - 100
    assert cluster.balance("HDFC-2001") == 300_000 + 20_000 + 100
    assert_conserved(cluster)


# ---- a crash at each recovery point (AT_CRASH, MOVES_MONEY: tests/gateway_support.py) -------------------------
@pytest.mark.parametrize("settled_by", ["retry", "startup_recovery"])
@pytest.mark.parametrize("point", POINTS)
def test_gateway_crash_at_recovery_point_settles_exactly_once(make_cluster: MakeCluster, point: str,
                                                              settled_by: str) -> None:
    cluster = start_with_gateway_crash_at(make_cluster, point)
    alice = cluster.client("alice")
    k = key()
    with pytest.raises(grpc.RpcError) as err:
        alice.pay(k, "SBI-1001", "HDFC-2001", 100)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_killed_itself(cluster.procs["gateway"])

    # The crash happened exactly where it was meant to.
    at_crash = key_row(cluster, "alice", k)
    expected_point, bank_state = AT_CRASH[point]
    assert at_crash is not None and at_crash.recovery_point == expected_point
    txn = at_crash.txn_id
    for bank in OPENING:
        assert cluster.txn_states(bank).get(txn) == bank_state
    assert cluster.holds() == (10_000 if bank_state == "prepared" else 0)

    cluster.restart("gateway")  # without the crash point
    # The restarted gateway's completer starts (and locks what the dead owner left) before its server does, so
    # a retry finds an undecided payment already being aborted (ABORTED, then the stored FAILED) rather than
    # resuming it; a decided one replays its stored SUCCEEDED while Commit is re-sent.
    if settled_by == "retry":
        final = alice.pay_until_final(k, "SBI-1001", "HDFC-2001", 100, deadline=20)
        wait_settled(cluster)
    else:
        wait_settled(cluster)  # nobody asks: start-up recovery alone must finish it
        final = key_row(cluster, "alice", k).response

    moved = MOVES_MONEY[point]
    assert final.transaction_id == txn
    assert final.status == (SUCCEEDED if moved else FAILED) and final.success is moved
    assert_settled_once(cluster, k, txn, moved, 10_000)

    # From now on the key only ever replays that one outcome.
    replay = alice.pay(k, "SBI-1001", "HDFC-2001", 100)
    assert replay.replayed and replay.transaction_id == txn and replay.status == final.status
    assert cluster.balance("SBI-1001") == 500_000 - (10_000 if moved else 0)


# ---- kill -9 at random moments -------------------------------------------------------------------------------
def test_gateway_kill9_at_random_moments_settles_each_key_exactly_once(cluster: Cluster) -> None:
    rng = random.Random(0x5791FE)
    routes = [("alice", "SBI-1001", "HDFC-2001"), ("bob", "HDFC-2001", "SBI-1002"),
              ("carol", "SBI-1002", "HDFC-2002"), ("alice", "HDFC-2002", "SBI-1003")]
    clients = {user: cluster.client(user) for user in {r[0] for r in routes}}
    chaos_over = threading.Event()
    lock = threading.Lock()
    outcomes: dict[str, tuple[str, str, str, int, pb.PaymentResponse]] = {}  # key → (user, from, to, paise, resp)
    interrupted_calls = [0]
    failures: list[BaseException] = []

    def pay_until_final(client: Client, k: str, src: str, dst: str, amount: float) -> pb.PaymentResponse:
        end = time.monotonic() + 30
        while True:
            try:
                return client.pay(k, src, dst, amount, timeout=5)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or time.monotonic() > end:
                    raise
                with lock:
                    interrupted_calls[0] += 1
                time.sleep(0.05)

    def payer(index: int, user: str, src: str, dst: str) -> None:
        local = random.Random(index)
        try:
            for n in range(200):
                if chaos_over.is_set() and n >= 5:
                    return
                k = f"chaos-{index}-{n}-{uuid.uuid4().hex[:8]}"
                paise = local.randint(100, 900)
                response = pay_until_final(clients[user], k, src, dst, paise / 100)
                with lock:
                    outcomes[k] = (user, src, dst, paise, response)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    def driver() -> None:
        try:
            for _ in range(3):
                time.sleep(rng.uniform(0.1, 0.6))  # chaos timing, not synchronisation
                cluster.restart("gateway")  # SIGKILL at whatever moment this is, then start again
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)
        finally:
            chaos_over.set()

    run_together([*(threading.Thread(target=payer, args=(i, *route)) for i, route in enumerate(routes)),
                  threading.Thread(target=driver)], failures)
    assert interrupted_calls[0] > 0, "the kills never hit a client"

    wait_settled(cluster)
    expected = {a: int(round(v * 100)) for accounts in OPENING.values() for a, v in accounts.items()}
    by_bank: dict[str, set[str]] = {bank: set() for bank in OPENING}
    for k, (user, src, dst, paise, response) in outcomes.items():
        assert response.status in (SUCCEEDED, FAILED), response
        # One outcome per key: the store has one payment for it, and asking again replays exactly that.
        assert payments_with_key(cluster, user, k) == [
            (response.transaction_id, "succeeded" if response.status == SUCCEEDED else "failed")]
        replay = clients[user].pay(k, src, dst, paise / 100)
        assert replay.replayed and replay.transaction_id == response.transaction_id
        assert replay.status == response.status
        states = [cluster.txn_states(b).get(response.transaction_id) for b in {src.split("-")[0],
                                                                               dst.split("-")[0]}]
        if response.status == SUCCEEDED:
            assert states == ["committed"] * len(states)
            expected[src] -= paise
            expected[dst] += paise
            for bank in {src.split("-")[0], dst.split("-")[0]}:
                by_bank[bank].add(response.transaction_id)
        else:
            assert "committed" not in states
    assert sum(r[4].status == SUCCEEDED for r in outcomes.values()) > 0
    log = cluster.procs["gateway"].log()  # one file across the restarts
    recovered = sum(log.count(s) for s in ("aborted undecided payment", "finished commit_decided payment",
                                           "retry=resumed"))
    assert recovered > 0, "no kill landed in the middle of a payment"
    for bank in OPENING:
        assert committed(cluster, bank) == by_bank[bank]  # no commit that no client was told about
    assert {a: b for a, (b, _) in cluster.accounts().items()} == expected
    assert_conserved(cluster)
    assert cluster.unfinished_payments() == 0


# ---- banks killed ---------------------------------------------------------------------------------------------
def test_bank_state_survives_kill9(cluster: Cluster) -> None:
    alice, bob = cluster.client("alice"), cluster.client("bob")
    assert alice.pay(key(), "SBI-1001", "HDFC-2001", 123.45).success
    assert bob.pay(key(), "HDFC-2001", "SBI-1002", 10).success
    assert alice.pay(key(), "SBI-1001", "SBI-1003", 1).success
    declined = cluster.client("dave").pay(key(), "SBI-1004", "HDFC-2001", 500)
    assert declined.status == pb.PAYMENT_STATUS_DECLINED
    before = cluster.accounts()
    states = {bank: cluster.txn_states(bank) for bank in OPENING}
    assert before["SBI-1001"] == (500_000 - 12_345 - 100, 0)
    assert before["SBI-1003"] == (100_000 + 100, 0)

    for bank in OPENING:
        cluster.restart(bank)  # SIGKILL, then start on the same ledger
    assert cluster.accounts() == before
    assert {bank: cluster.txn_states(bank) for bank in OPENING} == states
    # The restarted banks serve the ledger, not the opening balances of the config.
    for account, (balance, _) in before.items():
        reply = cluster.bank_stub(account.split("-")[0]).GetBalance(pb.BankBalanceRequest(account_number=account),
                                                                    timeout=5)
        assert reply.balance_paise == balance and reply.available_paise == balance
    assert alice.pay_until_final(key(), "SBI-1001", "HDFC-2001", 5, deadline=10).success
    assert cluster.balance("SBI-1001") == before["SBI-1001"][0] - 500
    assert_conserved(cluster)


# ---- two gateways on one store ---------------------------------------------------------------------------------
def test_duplicates_split_across_two_gateways_debit_exactly_once(cluster: Cluster) -> None:
    port2 = start_extra_gateway(cluster, "gateway2")
    gateways = [cluster.client("alice"), cluster.client("alice", address=f"localhost:{port2}")]
    k = key()
    successes, others = send_duplicates(gateways, k, "SBI-1001", "HDFC-2001", 42)
    assert successes and all(r == grpc.StatusCode.ABORTED for r in others), others
    assert len({r.transaction_id for r in successes}) == 1 and all(r.success for r in successes)
    assert sum(not r.replayed for r in successes) <= 1
    wait_until(lambda: all(f"key={k}" in cluster.procs[name].log() for name in ("gateway", "gateway2")), 5,
               message="both gateways logged the key")
    assert len(payments_with_key(cluster, "alice", k)) == 1
    assert committed(cluster, "SBI") == {successes[0].transaction_id}
    assert cluster.balance("SBI-1001") == 500_000 - 4_200
    assert cluster.balance("HDFC-2001") == 300_000 + 4_200
    assert_conserved(cluster)


@pytest.mark.parametrize("point", ["after_prepare", "after_decide"])
def test_payment_of_dead_gateway_is_taken_over_by_retry_through_live_gateway(make_cluster: MakeCluster,
                                                                             point: str) -> None:
    cluster = start_with_gateway_crash_at(make_cluster, point)
    port2 = start_extra_gateway(cluster, "gateway2")
    alice_dying, alice_live = cluster.client("alice"), cluster.client("alice", address=f"localhost:{port2}")
    k = key()
    txn = pay_into_the_crash(cluster, alice_dying, k, 60)

    # Straight to the live gateway: it finds the owner dead and finishes the payment (or its completer did).
    final = alice_live.pay_until_final(k, "SBI-1001", "HDFC-2001", 60, deadline=20)
    wait_settled(cluster)
    assert final.transaction_id == txn
    moved = final.status == SUCCEEDED
    if point == "after_decide":
        assert moved  # a decided commit is never turned into an abort
    else:
        assert final.status in (SUCCEEDED, FAILED)
    assert_settled_once(cluster, k, txn, moved, 6_000)
    replay = alice_live.pay(k, "SBI-1001", "HDFC-2001", 60)
    assert replay.replayed and replay.transaction_id == txn and replay.status == final.status


def freeze_outside_write_lock(proc: Proc, cluster: Cluster) -> None:
    """SIGSTOP a gateway, but never while it holds the SQLite store's write lock (that would stall every gateway;
    PostgreSQL has no such lock: a frozen replica's session stays, and with it its liveness)."""
    if cluster.store != "sqlite":
        proc.pause()
        return
    for _ in range(50):
        proc.pause()
        probe = sqlite3.connect(cluster.data_dir / "gateway.sqlite3", timeout=0.2, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            proc.resume()
        finally:
            probe.close()
    raise AssertionError(f"{proc.name} kept the store locked")


def test_live_gateway_takes_over_dead_owners_payment_but_never_a_live_owners(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(txn_timeout=TXN_TIMEOUT)
    port_b = start_extra_gateway(cluster, "gateway2")
    port_c = start_extra_gateway(cluster, "gateway3", crash_at="after_decide")
    gateway_a, gateway_b, gateway_c = (cluster.procs[n] for n in ("gateway", "gateway2", "gateway3"))
    alice_a, alice_b = cluster.client("alice"), cluster.client("alice", address=f"localhost:{port_b}")
    bob_c = cluster.client("bob", address=f"localhost:{port_c}")

    # Gateway A claims k1 and waits on a silent bank; then A itself is frozen: alive, owning k1, undecided.
    k1, answer_a = key(), []
    cluster.procs["SBI"].pause()
    payer = threading.Thread(target=lambda: answer_a.append(alice_a.pay(k1, "SBI-1001", "HDFC-2001", 30,
                                                                        timeout=60)))
    payer.start()
    wait_until(lambda: key_row(cluster, "alice", k1), 10, message="gateway A to claim k1")
    freeze_outside_write_lock(gateway_a, cluster)
    cluster.procs["SBI"].resume()
    owner_a = key_row(cluster, "alice", k1)
    assert owner_a.owner == cluster.owner_of("gateway") and owner_a.recovery_point == "started"

    # Gateway C dies right after deciding k2. B's completer is the only live one that can finish it.
    k2 = key()
    with pytest.raises(grpc.RpcError):
        bob_c.pay(k2, "HDFC-2001", "SBI-1002", 20)
    wait_killed_itself(gateway_c)
    k2_txn = key_row(cluster, "bob", k2).txn_id
    wait_until(lambda: key_row(cluster, "bob", k2).recovery_point == "finished", 10,
               message="gateway B's completer to finish the dead gateway's payment")
    wait_until(lambda: f"finished commit_decided payment {k2_txn}" in gateway_b.log(), 5, message="B's log line")
    assert cluster.txn_states("SBI")[k2_txn] == cluster.txn_states("HDFC")[k2_txn] == "committed"

    # That completer pass saw k1 too (it scans every unfinished key, oldest first) and left it to its live
    # owner; so does a retry through B.
    still = key_row(cluster, "alice", k1)
    assert still.owner == owner_a.owner and still.recovery_point == "started"
    with pytest.raises(grpc.RpcError) as err:
        alice_b.pay(k1, "SBI-1001", "HDFC-2001", 30)
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert key_row(cluster, "alice", k1).owner == owner_a.owner

    # Thawed, A finishes its own payment and answers its client.
    gateway_a.resume()
    payer.join(30)
    assert answer_a and answer_a[0].status in (SUCCEEDED, FAILED) and not answer_a[0].replayed
    wait_settled(cluster)
    k1_txn = answer_a[0].transaction_id
    moved = 3_000 if answer_a[0].status == SUCCEEDED else 0
    for bank in OPENING:
        assert cluster.txn_states(bank)[k1_txn] == ("committed" if moved else "aborted")
    assert payments_with_key(cluster, "alice", k1) == [(k1_txn, "succeeded" if moved else "failed")]
    assert cluster.balance("SBI-1001") == 500_000 - moved
    assert cluster.balance("HDFC-2001") == 300_000 + moved - 2_000
    assert cluster.balance("SBI-1002") == 250_000 + 2_000
    assert_conserved(cluster)


# ---- the sweep of old keys ----------------------------------------------------------------------------------------
def test_swept_key_executes_as_new_payment_and_history_keeps_the_old_one(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(txn_timeout=TXN_TIMEOUT, gateway_args=["--idempotency-ttl", "1"])
    alice = cluster.client("alice")
    k = key()
    first = alice.pay(k, "SBI-1001", "HDFC-2001", 10)
    assert first.success
    assert alice.pay(k, "SBI-1001", "HDFC-2001", 10).replayed  # kept until the TTL runs out
    wait_until(lambda: key_row(cluster, "alice", k) is None, 10, message="the finished key to be swept")
    assert cluster.balance("SBI-1001") == 500_000 - 1_000

    second = alice.pay(k, "SBI-1001", "HDFC-2001", 10)
    assert second.success and not second.replayed
    assert second.transaction_id != first.transaction_id
    assert cluster.balance("SBI-1001") == 500_000 - 2_000
    assert cluster.balance("HDFC-2001") == 300_000 + 2_000
    history = [(p.transaction_id, p.idempotency_key, p.status) for p in alice.history()]
    assert history[:2] == [(second.transaction_id, k, SUCCEEDED), (first.transaction_id, k, SUCCEEDED)]
    assert_conserved(cluster)
