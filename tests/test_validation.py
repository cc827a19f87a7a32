"""Every bad input of CONTRACT §4 gets its exact status code, and a refused call changes nothing anywhere:
no balance, no hold, no bank transaction, no stored idempotency key. Also the rupees → paise edge
(`servers.money`), where exactness is decided."""
from __future__ import annotations

import json
import math
import uuid
from typing import Callable

import grpc
import pytest

from protofiles import payment_pb2 as pb
from servers.money import MAX_PAYMENT_PAISE, MoneyError, rupees_to_paise
from tests.harness import OPENING_ACCOUNTS, OPENING_TOTAL, Client, Cluster

MAX_RUPEES = MAX_PAYMENT_PAISE / 100  # ₹1,00,00,000


def key() -> str:
    return f"validation-{uuid.uuid4()}"


def assert_nothing_changed(cluster: Cluster) -> None:
    """No balance moved, no money held, no bank saw a transaction, the gateway stored no key or payment.

    Everything sent to this module's cluster is refused, so its state must still be the opening state.
    """
    assert cluster.accounts() == OPENING_ACCOUNTS
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0
    assert cluster.txn_states("SBI") == {} and cluster.txn_states("HDFC") == {}
    with cluster.gateway_db() as db:
        assert db.execute("SELECT count(*) FROM idempotency_keys").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM payments").fetchone()[0] == 0


def refused(call: Callable[..., object], *args: object, **kwargs: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value.code()


# ---- amounts -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amount", [
    math.nan, math.inf, -math.inf,                 # not finite
    0.0, -0.0, -5.0, -0.01, -MAX_RUPEES,           # not positive
    0.001, 1.005, 10.123, 1e-3, 5e-324,            # more than two decimals (or below one paisa)
    0.1 + 0.2,                                     # 0.30000000000000004: never silently rounded
    MAX_RUPEES + 0.01, MAX_RUPEES * 10, 1e300,     # above ₹1,00,00,000
], ids=lambda a: repr(a))
def test_bad_amount_is_invalid_argument(untouched: Cluster, alice: Client, amount: float) -> None:
    assert refused(alice.pay, key(), "SBI-1001", "HDFC-2001", amount) == grpc.StatusCode.INVALID_ARGUMENT
    assert_nothing_changed(untouched)


def test_exactly_the_maximum_is_paid_and_one_paisa_more_is_refused(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(start=False)
    opening = json.loads((cluster.config_dir / "SBI_accounts.json").read_text())
    opening["SBI-1001"] = 2 * MAX_RUPEES  # rich enough for the largest payment allowed
    (cluster.config_dir / "SBI_accounts.json").write_text(json.dumps(opening))
    cluster.start()
    total = cluster.total()
    alice = cluster.client("alice")

    assert refused(alice.pay, key(), "SBI-1001", "HDFC-2001", MAX_RUPEES + 0.01) == grpc.StatusCode.INVALID_ARGUMENT
    assert cluster.balance("SBI-1001") == 2 * MAX_PAYMENT_PAISE and cluster.balance("HDFC-2001") == 300_000

    response = alice.pay(key(), "SBI-1001", "HDFC-2001", MAX_RUPEES)
    assert response.status == pb.PAYMENT_STATUS_SUCCEEDED, response.message
    assert response.amount_paise == MAX_PAYMENT_PAISE
    assert cluster.balance("SBI-1001") == MAX_PAYMENT_PAISE
    assert cluster.balance("HDFC-2001") == 300_000 + MAX_PAYMENT_PAISE
    assert cluster.total() == total and cluster.holds() == 0


# ---- accounts ------------------------------------------------------------------------------------------------
MALFORMED_ACCOUNTS = [
    "", "SBI", "SBI-", "-1", "-", "SBI-12a", "SBI-1001 ", " SBI-1001", "SBI 1001", "SBI_1001", "SBI--1001",
    "SBI-1001\n",            # a trailing newline must not slip past the pattern
    "SBI-\u0661\u0662\u0663",  # Arabic-Indic digits are digits to Python, not to an account number
    "\uff33\uff22\uff29-1001",  # full-width SBI
    "S\u0307BI-1001", "SBI-1001\x00", "x" * 10_000, "SBI-" + "1" * 10_000,
]


@pytest.mark.parametrize("account", MALFORMED_ACCOUNTS, ids=lambda a: repr(a)[:24])
def test_malformed_from_account_is_invalid_argument(untouched: Cluster, alice: Client, account: str) -> None:
    assert refused(alice.pay, key(), account, "HDFC-2001", 10) == grpc.StatusCode.INVALID_ARGUMENT
    assert_nothing_changed(untouched)


@pytest.mark.parametrize("account", MALFORMED_ACCOUNTS + ["HDFC-2001\n"], ids=lambda a: repr(a)[:24])
def test_malformed_to_account_is_invalid_argument(untouched: Cluster, alice: Client, account: str) -> None:
    assert refused(alice.pay, key(), "SBI-1001", account, 10) == grpc.StatusCode.INVALID_ARGUMENT
    assert_nothing_changed(untouched)


@pytest.mark.parametrize("from_account,to_account", [
    ("SBI-1001", "AXIS-1001"), ("SBI-1001", "sbi-1002"), ("SBI-1001", "NOPE-1"), ("ICICI-1001", "HDFC-2001"),
])
def test_unknown_bank_is_invalid_argument(untouched: Cluster, alice: Client, from_account: str,
                                          to_account: str) -> None:
    assert refused(alice.pay, key(), from_account, to_account, 10) == grpc.StatusCode.INVALID_ARGUMENT
    assert_nothing_changed(untouched)


@pytest.mark.parametrize("account", ["SBI-1001", "HDFC-2002"])
def test_payment_to_the_same_account_is_invalid_argument(untouched: Cluster, alice: Client, account: str) -> None:
    assert refused(alice.pay, key(), account, account, 10) == grpc.StatusCode.INVALID_ARGUMENT
    assert_nothing_changed(untouched)


@pytest.mark.parametrize("from_account", ["HDFC-2001", "SBI-1002", "SBI-1003", "HDFC-9999"])
def test_paying_from_an_account_the_caller_does_not_own_is_permission_denied(
        untouched: Cluster, alice: Client, from_account: str) -> None:
    # HDFC-2001 is bob's, SBI-1002 carol's, SBI-1003 nobody's, HDFC-9999 does not exist.
    assert refused(alice.pay, key(), from_account, "SBI-1001", 10) == grpc.StatusCode.PERMISSION_DENIED
    assert_nothing_changed(untouched)


# ---- balances and history ------------------------------------------------------------------------------------
@pytest.mark.parametrize("username", ["bob", "carol", "mallory", "ALICE", "alice "])
def test_get_balance_for_another_username_is_permission_denied(untouched: Cluster, alice: Client,
                                                               username: str) -> None:
    code = refused(alice.stub.GetBalance, pb.GatewayBalanceRequest(username=username), metadata=alice.md(),
                   timeout=10)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert_nothing_changed(untouched)


def test_get_balance_for_own_username_is_answered(untouched: Cluster, alice: Client) -> None:
    reply = alice.stub.GetBalance(pb.GatewayBalanceRequest(username="alice"), metadata=alice.md(), timeout=10)
    assert dict(reply.accounts) == {"SBI-1001": 5000.0, "HDFC-2002": 1500.0}


@pytest.mark.parametrize("limit", [-1, -50, -(2**31)])
def test_list_payments_with_negative_limit_is_invalid_argument(untouched: Cluster, alice: Client,
                                                               limit: int) -> None:
    code = refused(alice.stub.ListPayments, pb.ListPaymentsRequest(limit=limit), metadata=alice.md(), timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert_nothing_changed(untouched)


# ---- rupees → paise (unit) -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rupees,paise", [
    (100.1, 10_010), (0.01, 1), (0.1, 10), (19.99, 1_999), (1.1, 110), (4.35, 435), (1, 100), (5000, 500_000),
    (MAX_RUPEES, MAX_PAYMENT_PAISE), (MAX_RUPEES - 0.01, MAX_PAYMENT_PAISE - 1),
])
def test_rupees_to_paise_is_exact(rupees: float, paise: int) -> None:
    value = rupees_to_paise(rupees)
    assert value == paise and type(value) is int


@pytest.mark.parametrize("amount", [
    0.1 + 0.2, 1e-3, 0.005, 100.001, MAX_RUPEES + 0.01, MAX_RUPEES + 1, 0, 0.0, -0.0, -1, -0.01,
    math.nan, math.inf, -math.inf, True, False, "10", None, 5e-324,
], ids=lambda a: repr(a))
def test_rupees_to_paise_rejects(amount: object) -> None:
    with pytest.raises(MoneyError):
        rupees_to_paise(amount)  # type: ignore[arg-type]


def test_rupees_to_paise_honours_a_custom_maximum() -> None:
    assert rupees_to_paise(10.0, maximum=1_000) == 1_000
    with pytest.raises(MoneyError):
        rupees_to_paise(10.01, maximum=1_000)
