"""Authentication and authorization at the gateway, and mutual TLS at the banks (CONTRACT §4), against real
servers: every refused call is checked to have changed nothing in any balance."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Callable

import grpc
import pytest

from protofiles import payment_pb2 as pb
from protofiles import payment_pb2_grpc as pbg
from servers import certs as certs_module
from tests.cert_support import issue
from tests.harness import OPENING_ACCOUNTS, OPENING_TOTAL, PASSWORDS, Client, Cluster, wait_until, write_config

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def key() -> str:
    return f"security-{uuid.uuid4()}"


def assert_nothing_changed(cluster: Cluster) -> None:
    assert cluster.accounts() == OPENING_ACCOUNTS
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0
    assert cluster.txn_states("SBI") == {} and cluster.txn_states("HDFC") == {}
    with cluster.gateway_db() as db:
        assert db.execute("SELECT count(*) FROM idempotency_keys").fetchone()[0] == 0


def code_of(call: Callable[..., object], *args: object, **kwargs: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value.code()


def call_rpc(stub: pbg.PaymentGatewayStub, rpc: str, metadata: list[tuple[str, str]]) -> object:
    """One well-formed call of a non-Login RPC (a valid payment for alice) with the given metadata."""
    if rpc == "ProcessPayment":
        return stub.ProcessPayment(pb.PaymentRequest(from_account="SBI-1001", to_account="HDFC-2001", amount=10),
                                   metadata=[*metadata, ("idempotency-key", key())], timeout=10)
    if rpc == "GetBalance":
        return stub.GetBalance(pb.GatewayBalanceRequest(), metadata=metadata, timeout=10)
    return stub.ListPayments(pb.ListPaymentsRequest(), metadata=metadata, timeout=10)


RPCS = ["ProcessPayment", "GetBalance", "ListPayments"]


# ---- Login ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("username,password", [
    ("alice", "wrong"), ("alice", ""), ("alice", PASSWORDS["bob"]), ("alice", PASSWORDS["alice"] + " "),
    ("ALICE", PASSWORDS["alice"]), ("mallory", "anything"), ("mallory", ""), ("", ""), ("", PASSWORDS["alice"]),
    ("alice", "x" * 5000),
])
def test_login_with_wrong_credentials_is_unauthenticated(untouched: Cluster, username: str, password: str) -> None:
    stub = pbg.PaymentGatewayStub(untouched.channel())
    assert code_of(stub.Login, pb.LoginRequest(username=username, password=password), timeout=10) == UNAUTHENTICATED


def test_login_with_right_password_returns_a_token_with_expiry_and_accounts(untouched: Cluster) -> None:
    stub = pbg.PaymentGatewayStub(untouched.channel())
    reply = stub.Login(pb.LoginRequest(username="carol", password=PASSWORDS["carol"]), timeout=10)
    assert len(reply.token) >= 32 and list(reply.accounts) == ["SBI-1002", "HDFC-2003"]
    assert time.time() < reply.expires_at_unix
    other = stub.Login(pb.LoginRequest(username="carol", password=PASSWORDS["carol"]), timeout=10)
    assert other.token != reply.token  # random per login, not derived from the user


# ---- every other RPC needs a live bearer token ---------------------------------------------------------------
@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize("auth", ["none", "garbage", "basic", "basic-with-real-token", "bearer-empty",
                                  "token-without-scheme", "bearer-garbage-long"])
def test_rpc_without_a_valid_bearer_token_is_unauthenticated(untouched: Cluster, alice: Client, rpc: str,
                                                             auth: str) -> None:
    metadata = {
        "none": [],
        "garbage": [("authorization", "Bearer garbage")],
        "basic": [("authorization", "Basic xxx")],
        "basic-with-real-token": [("authorization", f"Basic {alice.token}")],
        "bearer-empty": [("authorization", "Bearer ")],
        "token-without-scheme": [("authorization", alice.token)],
        "bearer-garbage-long": [("authorization", "Bearer " + "a" * 4000)],
    }[auth]
    stub = pbg.PaymentGatewayStub(untouched.channel())
    assert code_of(call_rpc, stub, rpc, metadata) == UNAUTHENTICATED
    assert_nothing_changed(untouched)


@pytest.mark.parametrize("rpc", ["GetBalance", "ListPayments"])
def test_rpc_with_a_valid_bearer_token_is_answered(untouched: Cluster, alice: Client, rpc: str) -> None:
    call_rpc(alice.stub, rpc, alice.md())  # the control for the test above: the same call, authenticated


def test_expired_token_is_unauthenticated_everywhere(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(gateway_args=["--token-ttl", "2"])
    alice = cluster.client("alice")
    assert alice.balances().accounts["SBI-1001"] == 5000.0  # the token works while it is fresh

    def refused() -> bool:
        try:
            alice.balances()
        except grpc.RpcError as exc:
            assert exc.code() == UNAUTHENTICATED, exc
            return True
        return False

    wait_until(refused, timeout=15, interval=0.1, message="the token to expire")
    for rpc in RPCS:
        assert code_of(call_rpc, alice.stub, rpc, alice.md()) == UNAUTHENTICATED, rpc
    assert cluster.accounts() == OPENING_ACCOUNTS and cluster.total() == OPENING_TOTAL
    assert cluster.txn_states("SBI") == {} and cluster.txn_states("HDFC") == {}
    # Expiry ends that session only: logging in again gives a working token.
    assert cluster.client("alice").balances().accounts["SBI-1001"] == 5000.0


# ---- one user's token never reaches another user's money -----------------------------------------------------
@pytest.mark.parametrize("from_account", ["HDFC-2001", "SBI-1002", "HDFC-2003", "SBI-1004"])
def test_token_of_one_user_cannot_pay_from_another_users_account(untouched: Cluster, alice: Client,
                                                                  from_account: str) -> None:
    code = code_of(alice.pay, key(), from_account, "SBI-1001", 1)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert_nothing_changed(untouched)


def test_token_of_one_user_cannot_read_another_users_balances(untouched: Cluster, alice: Client) -> None:
    for other in ("bob", "carol", "dave"):
        code = code_of(alice.stub.GetBalance, pb.GatewayBalanceRequest(username=other), metadata=alice.md(),
                       timeout=10)
        assert code == grpc.StatusCode.PERMISSION_DENIED
    own = alice.balances()
    assert sorted(own.accounts) == ["HDFC-2002", "SBI-1001"]
    assert sorted(d.account for d in own.details) == ["HDFC-2002", "SBI-1001"]
    assert_nothing_changed(untouched)


def test_tokens_survive_a_gateway_restart(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    assert alice.pay(key(), "SBI-1001", "HDFC-2001", 10).success
    old_pid = cluster.procs["gateway"].popen.pid
    cluster.restart("gateway")  # SIGKILL: nothing but the SQLite store carries the session over
    assert cluster.procs["gateway"].popen.pid != old_pid

    assert alice.balances().accounts["SBI-1001"] == 4990.0  # the same token, without logging in again
    assert alice.pay(key(), "SBI-1001", "HDFC-2001", 20).success
    assert cluster.balance("SBI-1001") == 500_000 - 3_000
    assert cluster.balance("HDFC-2001") == 300_000 + 3_000
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0


def test_plain_password_users_still_log_in(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(start=False)
    write_config(cluster.config_dir, cluster.bank_addresses, plain_password_users=["bob"])
    users = json.loads((cluster.config_dir / "users.json").read_text())
    assert users["bob"]["password"] == PASSWORDS["bob"] and "password_hash" not in users["bob"]
    assert "password_hash" in users["alice"]
    cluster.start()

    stub = pbg.PaymentGatewayStub(cluster.channel())
    for wrong in ("", "bob", PASSWORDS["bob"].upper(), PASSWORDS["bob"] + "x"):
        assert code_of(stub.Login, pb.LoginRequest(username="bob", password=wrong), timeout=10) == UNAUTHENTICATED
    bob = cluster.client("bob")
    assert bob.pay(key(), "HDFC-2001", "SBI-1001", 25).success
    assert cluster.balance("HDFC-2001") == 300_000 - 2_500 and cluster.balance("SBI-1001") == 500_000 + 2_500
    assert cluster.client("alice").balances().accounts["SBI-1001"] == 5025.0  # hashed users alongside
    assert cluster.total() == OPENING_TOTAL


# ---- banks answer only the gateway's certificate -------------------------------------------------------------
def try_to_move_money(stub: pbg.BankStub) -> list[grpc.StatusCode]:
    """Prepare and commit a debit and abort another, as a caller would who wanted money moved: every call's
    status code, OK included."""
    txn = f"intruder-{uuid.uuid4()}"
    calls = [
        lambda: stub.Prepare(pb.PrepareRequest(transaction_id=txn, from_account="SBI-1001",
                                               to_account="HDFC-2001", amount=100), timeout=5),
        lambda: stub.Commit(pb.CommitRequest(transaction_id=txn), timeout=5),
        lambda: stub.Abort(pb.AbortRequest(transaction_id=f"{txn}-2"), timeout=5),
        lambda: stub.GetBalance(pb.BankBalanceRequest(account_number="SBI-1001"), timeout=5),
    ]
    codes = []
    for call in calls:
        try:
            call()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    return codes


@pytest.mark.parametrize("bank", ["SBI", "HDFC"])
def test_bank_refuses_a_caller_without_a_client_certificate(untouched: Cluster, bank: str) -> None:
    codes = try_to_move_money(untouched.bank_stub(bank, cert_name=None))
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 4  # the TLS handshake itself fails
    assert_nothing_changed(untouched)


@pytest.mark.parametrize("bank,cert_name", [("SBI", "SBI"), ("SBI", "HDFC"), ("HDFC", "SBI"), ("HDFC", "HDFC")])
def test_bank_refuses_a_banks_certificate_as_a_client_in_the_handshake(untouched: Cluster, bank: str,
                                                                       cert_name: str) -> None:
    # A bank's certificate is for serving only (no clientAuth usage): BoringSSL refuses it as a client
    # certificate ("unsupported certificate purpose") before any call reaches the bank.
    codes = try_to_move_money(untouched.bank_stub(bank, cert_name=cert_name))
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 4
    assert_nothing_changed(untouched)


@pytest.mark.parametrize("bank,common_name", [("SBI", "SBI"), ("SBI", "HDFC"), ("HDFC", "Gateway"),
                                              ("HDFC", "gateway.example")])
def test_bank_refuses_a_ca_signed_client_certificate_whose_common_name_is_not_gateway(
        untouched: Cluster, bank: str, common_name: str, tmp_path: Path) -> None:
    # Valid for clientAuth and signed by the cluster's CA (as the generator made every certificate before
    # usages were split): the handshake succeeds, and the bank's own check of the peer's CN refuses each call.
    issue(untouched.certs_dir, tmp_path, common_name)
    credentials = grpc.ssl_channel_credentials((untouched.certs_dir / "ca.crt").read_bytes(),
                                               (tmp_path / f"{common_name}.key").read_bytes(),
                                               (tmp_path / f"{common_name}.crt").read_bytes())
    channel = grpc.secure_channel(f"localhost:{untouched.bank_ports[bank]}", credentials)
    try:
        codes = try_to_move_money(pbg.BankStub(channel))
    finally:
        channel.close()
    assert codes == [grpc.StatusCode.PERMISSION_DENIED] * 4
    assert_nothing_changed(untouched)


@pytest.mark.parametrize("bank", ["SBI", "HDFC"])
def test_bank_refuses_a_gateway_certificate_from_another_ca(untouched: Cluster, bank: str,
                                                            tmp_path: Path) -> None:
    rogue = tmp_path / "rogue-ca"
    certs_module.generate(rogue, ["SBI", "HDFC"])  # a complete CA of its own, with a CN=gateway certificate
    credentials = grpc.ssl_channel_credentials((untouched.certs_dir / "ca.crt").read_bytes(),  # trusts the bank
                                               (rogue / "gateway.key").read_bytes(),
                                               (rogue / "gateway.crt").read_bytes())
    channel = grpc.secure_channel(f"localhost:{untouched.bank_ports[bank]}", credentials)
    try:
        codes = try_to_move_money(pbg.BankStub(channel))
    finally:
        channel.close()
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 4  # refused during the handshake
    assert_nothing_changed(untouched)


@pytest.mark.parametrize("bank,account,paise", [("SBI", "SBI-1001", 500_000), ("HDFC", "HDFC-2001", 300_000)])
def test_bank_answers_the_gateways_certificate(untouched: Cluster, bank: str, account: str, paise: int) -> None:
    reply = untouched.bank_stub(bank, cert_name="gateway").GetBalance(
        pb.BankBalanceRequest(account_number=account), timeout=5)
    assert reply.balance_paise == paise and reply.available_paise == paise
