"""Idempotent payments (CONTRACT §5), against real banks and a real gateway over TLS."""
from __future__ import annotations

import uuid

import grpc
import pytest

from protofiles import payment_pb2 as pb
from tests.pg_support import on_both_stores
from tests.harness import OPENING_ACCOUNTS, OPENING_TOTAL, Client, Cluster, send_duplicates, wait_until

gateway_store = on_both_stores  # every cluster test here runs on SQLite and on PostgreSQL


def key() -> str:
    return f"test-{uuid.uuid4()}"


def test_first_request_moves_money_once(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    response = alice.pay(key(), "SBI-1001", "HDFC-2001", 120.25)
    assert response.success and response.status == pb.PAYMENT_STATUS_SUCCEEDED
    assert not response.replayed and response.transaction_id
    assert cluster.balance("SBI-1001") == 500_000 - 12_025
    assert cluster.balance("HDFC-2001") == 300_000 + 12_025
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0


def test_replay_returns_stored_response_and_touches_no_bank(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    k = key()
    first, first_md = alice.pay_with_call(k, "SBI-1001", "HDFC-2001", 10)
    assert "idempotent-replayed" not in first_md
    # Call lines are written once the answer is on its way: wait for the first payment's Prepare and Commit.
    wait_until(lambda: cluster.procs["SBI"].log().count(f"txn={first.transaction_id}") >= 2, 5,
               message="the first payment's bank lines")
    bank_calls_before = cluster.procs["SBI"].log().count("method=/Bank/")
    second, second_md = alice.pay_with_call(k, "SBI-1001", "HDFC-2001", 10)
    assert second_md.get("idempotent-replayed") == "true"
    assert second.replayed and not first.replayed
    second.replayed = False
    assert second == first  # unchanged: same transaction id, outcome, message
    assert cluster.balance("SBI-1001") == 500_000 - 1_000
    # A fence: a new payment through the same bank. Lines are written in the order the bank works, so once
    # the fence's two lines are there, any line a (wrong) bank call by the replay caused would be there too.
    fence = alice.pay(key(), "SBI-1001", "HDFC-2001", 1)
    wait_until(lambda: cluster.procs["SBI"].log().count(f"txn={fence.transaction_id}") >= 2, 5, message="fence")
    assert cluster.procs["SBI"].log().count("method=/Bank/") == bank_calls_before + 2
    assert cluster.balance("SBI-1001") == 500_000 - 1_000 - 100
    assert cluster.total() == OPENING_TOTAL


def test_declined_payment_is_replayed_as_declined(cluster: Cluster) -> None:
    dave = cluster.client("dave")
    k = key()
    first = dave.pay(k, "SBI-1004", "HDFC-2001", 1000)  # dave has ₹100
    assert first.status == pb.PAYMENT_STATUS_DECLINED and not first.success
    assert "insufficient funds" in first.message
    again = dave.pay(k, "SBI-1004", "HDFC-2001", 1000)
    assert again.replayed and again.status == pb.PAYMENT_STATUS_DECLINED
    assert again.transaction_id == first.transaction_id
    assert cluster.balance("SBI-1004") == 10_000 and cluster.holds() == 0


def test_transaction_id_field_is_the_key_when_metadata_absent(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    txn = key()
    first = alice.pay(None, "SBI-1001", "HDFC-2001", 5, transaction_id=txn)
    again = alice.pay(None, "SBI-1001", "HDFC-2001", 5, transaction_id=txn)
    assert first.success and again.replayed and again.transaction_id == first.transaction_id
    assert again.idempotency_key == txn
    assert cluster.balance("SBI-1001") == 500_000 - 500


@pytest.mark.parametrize("bad_key", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_missing_or_invalid_key_is_rejected(cluster: Cluster, bad_key: str) -> None:
    alice = cluster.client("alice")
    with pytest.raises(grpc.RpcError) as err:
        if bad_key == "":
            alice.pay(None, "SBI-1001", "HDFC-2001", 5)  # neither metadata nor transaction_id
        else:
            alice.pay(None, "SBI-1001", "HDFC-2001", 5, transaction_id=bad_key)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cluster.balance("SBI-1001") == 500_000


def test_key_of_255_printable_characters_is_accepted(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    assert alice.pay("k" * 255, "SBI-1001", "HDFC-2001", 1).success


@pytest.mark.parametrize("bad_key", ["k ", " k", " ", "  k  "])
@pytest.mark.parametrize("how", ["metadata", "transaction_id"])
def test_key_with_a_leading_or_trailing_space_is_rejected(untouched: Cluster, alice: Client, bad_key: str,
                                                          how: str) -> None:
    """A proxy that trims header values would make "k " the same key as "k" on one path and not on another:
    a retry could become a second payment. Such keys are refused, and nothing is stored."""
    with pytest.raises(grpc.RpcError) as err:
        if how == "metadata":
            alice.pay(bad_key, "SBI-1001", "HDFC-2001", 5)
        else:
            alice.pay(None, "SBI-1001", "HDFC-2001", 5, transaction_id=bad_key)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "space" in err.value.details()
    with untouched.gateway_db() as db:
        assert db.execute("SELECT count(*) FROM idempotency_keys").fetchone()[0] == 0
    assert untouched.accounts() == OPENING_ACCOUNTS


def test_key_with_an_inner_space_is_a_key_of_its_own(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    first = alice.pay("order 17", "SBI-1001", "HDFC-2001", 5)
    assert first.success and alice.pay("order 17", "SBI-1001", "HDFC-2001", 5).replayed
    assert not alice.pay("order17", "SBI-1001", "HDFC-2001", 5).replayed
    assert cluster.balance("SBI-1001") == 500_000 - 1_000


def test_key_reused_with_other_parameters_is_rejected(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    k = key()
    assert alice.pay(k, "SBI-1001", "HDFC-2001", 10).success
    for other in [("SBI-1001", "HDFC-2001", 11), ("SBI-1001", "SBI-1002", 10), ("HDFC-2002", "HDFC-2001", 10)]:
        with pytest.raises(grpc.RpcError) as err:
            alice.pay(k, *other)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert cluster.balance("SBI-1001") == 500_000 - 1_000
    assert cluster.balance("HDFC-2002") == 150_000
    assert cluster.total() == OPENING_TOTAL


def test_rejected_request_does_not_burn_its_key(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    k = key()
    with pytest.raises(grpc.RpcError) as err:
        alice.pay(k, "SBI-1001", "HDFC-2001", -5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        alice.pay(k, "SBI-1001", "NOPE-1", 5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        alice.pay(k, "HDFC-2001", "SBI-1001", 5)  # bob's account
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    response = alice.pay(k, "SBI-1001", "HDFC-2001", 5)  # corrected request, same key: executes
    assert response.success and not response.replayed
    assert cluster.balance("SBI-1001") == 500_000 - 500


def test_keys_are_scoped_per_user(cluster: Cluster) -> None:
    alice, carol = cluster.client("alice"), cluster.client("carol")
    k = "shared-key-0001"
    a = alice.pay(k, "SBI-1001", "HDFC-2001", 10)
    c = carol.pay(k, "SBI-1002", "HDFC-2001", 20)  # different parameters: fine, another user's key space
    assert a.success and c.success and not c.replayed
    assert a.transaction_id != c.transaction_id
    assert cluster.balance("SBI-1001") == 500_000 - 1_000
    assert cluster.balance("SBI-1002") == 250_000 - 2_000
    assert cluster.balance("HDFC-2001") == 300_000 + 3_000


def test_twenty_concurrent_duplicates_debit_exactly_once(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    k = key()
    successes, others = send_duplicates([alice], k, "SBI-1001", "HDFC-2001", 42)
    assert successes, "at least the executing request answers"
    assert all(r == grpc.StatusCode.ABORTED for r in others), others
    assert len({r.transaction_id for r in successes}) == 1
    assert all(r.success for r in successes)
    assert sum(not r.replayed for r in successes) <= 1
    assert cluster.balance("SBI-1001") == 500_000 - 4_200
    assert cluster.balance("HDFC-2001") == 300_000 + 4_200
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0
