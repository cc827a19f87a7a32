"""Two-phase commit (CONTRACT §6) against real banks: holds that survive a bank restart, no overdraft under
concurrency, banks that are down or silent past `--txn-timeout`, and payments inside one bank.

Every test reads the ledgers on disk: balances, holds and each transaction id's state, and checks that the
total of all balances is what the banks opened with.
"""
from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest

from protofiles import payment_pb2 as pb
from tests.gateway_support import MakeCluster, assert_conserved, wait_settled
from tests.pg_support import on_both_stores
from tests.harness import OPENING, Cluster, wait_until

SUCCEEDED, DECLINED, FAILED = pb.PAYMENT_STATUS_SUCCEEDED, pb.PAYMENT_STATUS_DECLINED, pb.PAYMENT_STATUS_FAILED
OPENING_PAISE = {a: int(round(v * 100)) for accounts in OPENING.values() for a, v in accounts.items()}

gateway_store = on_both_stores  # every cluster test here runs on SQLite and on PostgreSQL


@pytest.fixture
def cluster(make_cluster: MakeCluster) -> Cluster:
    return make_cluster(txn_timeout=5.0)  # generous where a timeout is not what the test is about


def key() -> str:
    return f"test-{uuid.uuid4()}"


def balances(cluster: Cluster) -> dict[str, int]:
    return {account: balance for account, (balance, _) in cluster.accounts().items()}


# ---- a prepared hold survives a bank restart ---------------------------------------------------------------------
def prepare_at_both(cluster: Cluster, txn: str, src: str, dst: str, rupees: float) -> None:
    request = pb.PrepareRequest(transaction_id=txn, from_account=src, to_account=dst, amount=rupees)
    for bank in ("SBI", "HDFC"):
        vote = cluster.bank_stub(bank).Prepare(request, timeout=5)
        assert vote.vote, f"{bank}: {vote.reason}"


def available(cluster: Cluster, account: str) -> int:
    reply = cluster.bank_stub(account.split("-")[0]).GetBalance(pb.BankBalanceRequest(account_number=account),
                                                                timeout=5)
    return reply.available_paise


def test_prepared_hold_survives_bank_restart_and_commit_applies_it_once(cluster: Cluster) -> None:
    txn = f"direct-{uuid.uuid4()}"
    prepare_at_both(cluster, txn, "SBI-1001", "HDFC-2001", 100)
    assert cluster.accounts()["SBI-1001"] == (500_000, 10_000)
    assert cluster.txn_states("SBI")[txn] == "prepared"

    cluster.restart("SBI")  # SIGKILL with the hold in place
    assert cluster.accounts()["SBI-1001"] == (500_000, 10_000)
    assert cluster.txn_states("SBI")[txn] == "prepared"
    assert available(cluster, "SBI-1001") == 490_000
    # The restarted bank still counts the hold: what is left cannot be spent twice.
    greedy = cluster.bank_stub("SBI").Prepare(pb.PrepareRequest(
        transaction_id=f"direct-{uuid.uuid4()}", from_account="SBI-1001", to_account="HDFC-2001", amount=4_950),
        timeout=5)
    assert not greedy.vote and "insufficient funds" in greedy.reason
    assert cluster.accounts()["SBI-1001"] == (500_000, 10_000)

    for _ in range(2):  # Commit is idempotent: the second one changes nothing
        for bank in ("SBI", "HDFC"):
            ack = cluster.bank_stub(bank).Commit(pb.CommitRequest(transaction_id=txn), timeout=5)
            assert ack.success, ack.message
        assert cluster.accounts()["SBI-1001"] == (490_000, 0)
        assert cluster.accounts()["HDFC-2001"] == (310_000, 0)
    assert not cluster.bank_stub("SBI").Abort(pb.AbortRequest(transaction_id=txn), timeout=5).success
    assert cluster.txn_states("SBI")[txn] == cluster.txn_states("HDFC")[txn] == "committed"
    assert available(cluster, "SBI-1001") == 490_000
    assert_conserved(cluster)


def test_prepared_hold_survives_bank_restart_and_abort_releases_it(cluster: Cluster) -> None:
    txn = f"direct-{uuid.uuid4()}"
    prepare_at_both(cluster, txn, "SBI-1001", "HDFC-2001", 100)
    cluster.restart("SBI")
    assert cluster.accounts()["SBI-1001"] == (500_000, 10_000)
    assert available(cluster, "SBI-1001") == 490_000

    for _ in range(2):  # Abort is idempotent
        for bank in ("SBI", "HDFC"):
            ack = cluster.bank_stub(bank).Abort(pb.AbortRequest(transaction_id=txn), timeout=5)
            assert ack.success, ack.message
        assert balances(cluster) == OPENING_PAISE
        assert cluster.holds() == 0
    assert available(cluster, "SBI-1001") == 500_000
    assert not cluster.bank_stub("SBI").Commit(pb.CommitRequest(transaction_id=txn), timeout=5).success
    late = cluster.bank_stub("SBI").Prepare(pb.PrepareRequest(transaction_id=txn, from_account="SBI-1001",
                                                              to_account="HDFC-2001", amount=100), timeout=5)
    assert not late.vote
    assert cluster.txn_states("SBI")[txn] == cluster.txn_states("HDFC")[txn] == "aborted"
    assert balances(cluster) == OPENING_PAISE
    assert_conserved(cluster)


# ---- concurrency ----------------------------------------------------------------------------------------------------
def test_concurrent_payments_never_overdraw(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(txn_timeout=10.0)  # every payment gets a vote, however loaded the machine is
    dave = cluster.client("dave")  # SBI-1004 opens with ₹100
    start = threading.Barrier(20)
    results: list[object] = []
    lock = threading.Lock()
    sampling = threading.Event()
    samples: list[tuple[int, int]] = []

    def send() -> None:
        start.wait()
        try:
            outcome: object = dave.pay(key(), "SBI-1004", "HDFC-2001", 30)
        except grpc.RpcError as exc:
            outcome = exc.code()
        with lock:
            results.append(outcome)

    def sample() -> None:
        while not sampling.is_set():
            samples.append(cluster.accounts()["SBI-1004"])

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=send) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    sampling.set()
    sampler.join(10)

    assert len(results) == 20 and all(isinstance(r, pb.PaymentResponse) for r in results), results
    succeeded = [r for r in results if r.status == SUCCEEDED]
    declined = [r for r in results if r.status == DECLINED]
    assert len(succeeded) == 3 and len(declined) == 17, [r.message for r in results]
    assert all("insufficient funds" in r.message for r in declined)
    assert samples and all(balance >= 0 and balance - held >= 0 for balance, held in samples)
    assert max(held for _, held in samples) <= 9_000
    wait_settled(cluster)
    sbi, hdfc = cluster.txn_states("SBI"), cluster.txn_states("HDFC")
    assert {t for t, s in sbi.items() if s == "committed"} == {r.transaction_id for r in succeeded}
    assert all(sbi[r.transaction_id] == hdfc[r.transaction_id] == "aborted" for r in declined)
    assert cluster.balance("SBI-1004") == 1_000
    assert cluster.balance("HDFC-2001") == 300_000 + 9_000
    assert_conserved(cluster)


# ---- a bank that is down or silent ----------------------------------------------------------------------------------
@pytest.mark.parametrize("down", ["SBI", "HDFC"])
def test_payment_fails_within_timeout_when_a_bank_is_down(make_cluster: MakeCluster, down: str) -> None:
    cluster = make_cluster(txn_timeout=1.0)
    alice = cluster.client("alice")
    cluster.procs[down].kill()
    begun = time.monotonic()
    response = alice.pay(key(), "SBI-1001", "HDFC-2001", 50, timeout=10)
    elapsed = time.monotonic() - begun
    assert elapsed < 1.0 + 1.0
    assert response.status == FAILED and not response.success
    assert f"bank {down}" in response.message and "no money moved" in response.message
    assert balances(cluster) == OPENING_PAISE  # every ledger, the dead bank's read from its file
    up = "HDFC" if down == "SBI" else "SBI"
    assert cluster.txn_states(up)[response.transaction_id] == "aborted"

    cluster.restart(down)
    wait_settled(cluster)  # the completer's Abort reaches the bank that was away
    for bank in OPENING:
        assert cluster.txn_states(bank)[response.transaction_id] == "aborted"
    assert balances(cluster) == OPENING_PAISE
    assert_conserved(cluster)
    after = alice.pay(key(), "SBI-1001", "HDFC-2001", 50)
    assert after.success
    assert cluster.balance("SBI-1001") == 500_000 - 5_000
    assert_conserved(cluster)


def test_silent_bank_past_txn_timeout_fails_payment_and_late_prepare_votes_no(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(txn_timeout=1.0)
    alice = cluster.client("alice")
    # Connections to both banks are up (a balance query uses them), then the sender's bank goes silent:
    # requests reach it and nothing comes back.
    assert all(d.available for d in alice.balances().details)
    sbi = cluster.procs["SBI"]
    sbi.pause()
    try:
        begun = time.monotonic()
        response = alice.pay(key(), "SBI-1001", "HDFC-2001", 70, timeout=10)
        elapsed = time.monotonic() - begun
        assert 1.0 - 0.05 <= elapsed < 1.0 + 1.0, (elapsed, response)
        assert response.status == FAILED and not response.success
        assert "bank SBI did not answer within 1 s" in response.message
        txn = response.transaction_id
        assert balances(cluster) == OPENING_PAISE and cluster.holds() == 0
        assert cluster.txn_states("HDFC")[txn] == "aborted"
        assert txn not in cluster.txn_states("SBI")  # SBI has not run anything yet
    finally:
        sbi.resume()

    # SBI wakes up to the queued, late Prepare and to the completer's Abort; whichever runs first, the
    # transaction ends aborted and no hold is left.
    wait_until(lambda: cluster.txn_states("SBI").get(txn) == "aborted", 10, message="SBI to abort the txn")
    wait_settled(cluster)
    late = cluster.bank_stub("SBI").Prepare(pb.PrepareRequest(transaction_id=txn, from_account="SBI-1001",
                                                              to_account="HDFC-2001", amount=70), timeout=5)
    assert not late.vote and "aborted" in late.reason
    assert cluster.txn_states("SBI")[txn] == "aborted"
    assert balances(cluster) == OPENING_PAISE
    assert_conserved(cluster)
    replay = alice.pay(response.idempotency_key, "SBI-1001", "HDFC-2001", 70)
    assert replay.replayed and replay.status == FAILED and replay.transaction_id == txn


# ---- one bank on both sides ------------------------------------------------------------------------------------------
def test_same_bank_payments_conserve_money_and_settle(cluster: Cluster) -> None:
    alice, bob, dave = cluster.client("alice"), cluster.client("bob"), cluster.client("dave")
    sbi = alice.pay(key(), "SBI-1001", "SBI-1002", 250.50)
    hdfc = bob.pay(key(), "HDFC-2001", "HDFC-2003", 99.99)
    assert sbi.success and hdfc.success
    refused = dave.pay(key(), "SBI-1004", "SBI-1001", 150)  # dave has ₹100
    assert refused.status == DECLINED and "insufficient funds" in refused.message

    expected = dict(OPENING_PAISE)
    expected["SBI-1001"] -= 25_050
    expected["SBI-1002"] += 25_050
    expected["HDFC-2001"] -= 9_999
    expected["HDFC-2003"] += 9_999
    wait_settled(cluster)
    assert balances(cluster) == expected
    sbi_states, hdfc_states = cluster.txn_states("SBI"), cluster.txn_states("HDFC")
    assert sbi_states[sbi.transaction_id] == "committed" and sbi.transaction_id not in hdfc_states
    assert hdfc_states[hdfc.transaction_id] == "committed" and hdfc.transaction_id not in sbi_states
    assert sbi_states[refused.transaction_id] == "aborted" and refused.transaction_id not in hdfc_states
    assert_conserved(cluster)
