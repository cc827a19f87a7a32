"""A payment's key outlives the configuration it was made under (issue 12, point 1).

The gateway reads its configuration at start. A retry with a key that already has an outcome must get that
outcome whatever the configuration says now: a bank removed from banks.json, an account moved to another
user or a lower maximum must never turn a payment that succeeded into an error the wallet records as failed
(and its user then pays again). Only a new key is checked against today's configuration, and a refused new key
stores nothing. Real gateway processes, restarted with changed config files or flags.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest

from protofiles import payment_pb2 as pb
from tests.harness import OPENING_ACCOUNTS, OPENING_TOTAL, Client, Cluster, wait_until
from tests.gateway_support import (TXN_TIMEOUT, key_row, pay_into_the_crash, start_extra_gateway,
                                   start_with_gateway_crash_at)

SUCCEEDED, FAILED = pb.PAYMENT_STATUS_SUCCEEDED, pb.PAYMENT_STATUS_FAILED


def key() -> str:
    return f"config-{uuid.uuid4()}"


def edit_json(path: Path, change: Callable[[Any], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def refused(call: Callable[..., object], *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args)
    return err.value


def assert_replayed(again: pb.PaymentResponse, first: pb.PaymentResponse) -> None:
    assert again.replayed and not first.replayed
    again.replayed = False
    assert again == first  # the stored response, unchanged: same transaction id, status and message


def test_payment_replays_after_its_bank_is_removed_from_banks_json(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    k = key()
    first = alice.pay(k, "SBI-1001", "HDFC-2001", 25)
    assert first.status == SUCCEEDED
    edit_json(cluster.config_dir / "banks.json", lambda banks: banks.pop("HDFC"))
    cluster.restart("gateway")

    assert_replayed(alice.pay(k, "SBI-1001", "HDFC-2001", 25), first)
    # Other parameters under that key are still a mismatch; a new key to the removed bank is refused.
    assert refused(alice.pay, k, "SBI-1001", "HDFC-2001", 26).code() == grpc.StatusCode.FAILED_PRECONDITION
    error = refused(alice.pay, key(), "SBI-1001", "HDFC-2001", 25)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown bank 'HDFC'" in error.details()
    assert cluster.view.count_keys() == 1  # the refused key stored nothing
    assert cluster.balance("SBI-1001") == 500_000 - 2_500 and cluster.balance("HDFC-2001") == 300_000 + 2_500
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0


def test_payment_replays_after_its_account_moves_to_another_user(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    k = key()
    first = alice.pay(k, "HDFC-2002", "SBI-1002", 40)
    assert first.status == SUCCEEDED

    def move(users: dict[str, Any]) -> None:
        users["alice"]["accounts"].remove("HDFC-2002")
        users["carol"]["accounts"].append("HDFC-2002")

    edit_json(cluster.config_dir / "users.json", move)
    cluster.restart("gateway")

    assert_replayed(alice.pay(k, "HDFC-2002", "SBI-1002", 40), first)
    error = refused(alice.pay, key(), "HDFC-2002", "SBI-1002", 40)  # a new payment from it: no longer hers
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert cluster.view.count_keys() == 1
    assert cluster.client("carol").pay(key(), "HDFC-2002", "SBI-1002", 10).status == SUCCEEDED  # now carol's
    assert cluster.balance("HDFC-2002") == 150_000 - 5_000 and cluster.balance("SBI-1002") == 250_000 + 5_000
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0


def test_payment_replays_after_the_maximum_is_lowered(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    k = key()
    first = alice.pay(k, "SBI-1001", "HDFC-2001", 1000)
    assert first.status == SUCCEEDED
    cluster.restart("gateway", ["--max-payment", "500"])

    assert_replayed(alice.pay(k, "SBI-1001", "HDFC-2001", 1000), first)
    error = refused(alice.pay, key(), "SBI-1001", "HDFC-2001", 1000)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "maximum of ₹500.00" in error.details()
    assert cluster.view.count_keys() == 1
    assert alice.pay(key(), "SBI-1001", "HDFC-2001", 500).status == SUCCEEDED  # the maximum itself is allowed
    assert cluster.balance("SBI-1001") == 500_000 - 150_000 and cluster.balance("HDFC-2001") == 300_000 + 150_000
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0


def test_undecided_payment_whose_bank_was_removed_is_decided_failed_when_resumed(
        make_cluster: Callable[..., Cluster]) -> None:
    """Gateway A dies holding a prepared payment to HDFC; gateway B, on the same store, was started after HDFC
    left banks.json. The retry through B resumes the payment: B cannot run it, so it decides it as failed
    (no money moved) instead of crashing, and tells every bank it still knows. The abort reaches HDFC once
    HDFC is configured again."""
    cluster = start_with_gateway_crash_at(make_cluster, "after_prepare")
    edit_json(cluster.config_dir / "banks.json", lambda banks: banks.pop("HDFC"))
    cluster.gateway_args = ["--completer-interval", "600"]  # B: the retry, not B's completer, finds the payment
    port_b = start_extra_gateway(cluster, "gateway-b")
    cluster.gateway_args = []
    alice_a, alice_b = cluster.client("alice"), cluster.client("alice", address=f"localhost:{port_b}")
    k = key()
    txn = pay_into_the_crash(cluster, alice_a, k, 30)
    assert cluster.txn_states("HDFC")[txn] == "prepared" and cluster.holds() == 3_000

    final = alice_b.pay(k, "SBI-1001", "HDFC-2001", 30, timeout=TXN_TIMEOUT + 10)
    assert final.status == FAILED and not final.success and final.transaction_id == txn
    assert "unknown bank 'HDFC'" in final.message and "no money moved" in final.message
    assert_replayed(alice_b.pay(k, "SBI-1001", "HDFC-2001", 30), final)
    wait_until(lambda: cluster.txn_states("SBI")[txn] == "aborted", 10, message="SBI to hear the abort")
    assert cluster.holds() == 0 and cluster.txn_states("HDFC")[txn] == "prepared"  # HDFC cannot be told yet
    assert key_row(cluster, "alice", k).recovery_point == "abort_decided"

    # B's completer, still without HDFC, keeps the decision waiting and says why; no crash, no traceback.
    gateway_b = cluster.procs["gateway-b"]
    gateway_b.kill()
    cluster.procs["gateway-b"] = gateway_b = cluster.gateway_proc(port=port_b, name="gateway-b").start()
    wait_until(lambda: f"abort of {txn} at HDFC not sent: bank HDFC is not configured" in gateway_b.log(), 15,
               message="B's completer to report the unconfigured bank")
    assert "Traceback" not in gateway_b.log() and "KeyError" not in gateway_b.log()

    # HDFC back in banks.json: the abort is delivered and the payment finished, no money having moved.
    edit_json(cluster.config_dir / "banks.json",
              lambda banks: banks.update(HDFC={"address": cluster.bank_addresses["HDFC"]}))
    gateway_b.kill()
    cluster.procs["gateway-b"] = cluster.gateway_proc(port=port_b, name="gateway-b").start()
    wait_until(lambda: cluster.unfinished_payments() == 0, 20, message="the payment to be finished")
    assert cluster.txn_states("HDFC")[txn] == "aborted"
    assert cluster.accounts() == OPENING_ACCOUNTS and cluster.total() == OPENING_TOTAL


def test_same_key_other_parameters_is_still_a_mismatch_when_the_new_ones_are_refused(cluster: Cluster) -> None:
    alice: Client = cluster.client("alice")
    k = key()
    assert alice.pay(k, "SBI-1001", "HDFC-2001", 5).status == SUCCEEDED
    # Another user's account and an unknown bank: the key's other use is what the caller needs to hear.
    assert refused(alice.pay, k, "HDFC-2001", "SBI-1001", 5).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused(alice.pay, k, "SBI-1001", "AXIS-1", 5).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert cluster.view.count_keys() == 1 and cluster.balance("SBI-1001") == 500_000 - 500
