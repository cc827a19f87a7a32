"""Sessions end when they should (issue 12, point 4): at Logout (at once, on every gateway sharing the store),
when the user's password changes, and when the user is removed — answered UNAUTHENTICATED, never UNKNOWN.
Real gateways, restarted with changed users.json; every refused payment is checked to have moved nothing."""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest

from protofiles import payment_pb2 as pb
from protofiles import payment_pb2_grpc as pbg
from servers.config import credential_id, hash_password
from servers.gateway.store.sqlite_sessions import Sessions
from servers.sqlite_store import SQLiteStore
from tests.harness import OPENING_ACCOUNTS, OPENING_TOTAL, PASSWORDS, Client, Cluster, write_config
from tests.gateway_support import start_extra_gateway
from tests.test_security import RPCS, call_rpc, code_of
from tests.wallet_support import wallet_argv
from wallet_tui.core import WalletCore
from wallet_tui.gateway import LOGOUT_TIMEOUT, GrpcGateway
from wallet_tui.settings import parse_args

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def key() -> str:
    return f"sessions-{uuid.uuid4()}"


def logout(client: Client) -> pb.LogoutResponse:
    return client.stub.Logout(pb.LogoutRequest(), metadata=client.md(), timeout=10)


def assert_refused_everywhere(client: Client) -> None:
    """Every authenticated RPC answers UNAUTHENTICATED for this client's token (a payment included)."""
    for rpc in RPCS:
        assert code_of(call_rpc, client.stub, rpc, client.md()) == UNAUTHENTICATED, rpc


def edit_users(cluster: Cluster, change: Callable[[dict[str, Any]], None]) -> None:
    path = cluster.config_dir / "users.json"
    users = json.loads(path.read_text())
    change(users)
    path.write_text(json.dumps(users))


def test_logout_ends_that_session_at_once_and_no_other(cluster: Cluster) -> None:
    alice, alice_elsewhere, bob = cluster.client("alice"), cluster.client("alice"), cluster.client("bob")
    assert alice.balances().accounts["SBI-1001"] == 5000.0  # the token is in use right before
    logout(alice)
    assert_refused_everywhere(alice)
    # Her other session and other users' sessions go on.
    assert alice_elsewhere.pay(key(), "SBI-1001", "HDFC-2001", 10).status == pb.PAYMENT_STATUS_SUCCEEDED
    assert bob.balances().accounts["HDFC-2001"] == 3010.0
    assert cluster.balance("SBI-1001") == 500_000 - 1_000 and cluster.total() == OPENING_TOTAL


def test_logout_again_is_ok_for_the_holder_and_an_unknown_token_is_unauthenticated(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    logout(alice)
    logout(alice)  # a retry after a lost reply: the same answer
    assert_refused_everywhere(alice)
    for metadata in ([], [("authorization", "Bearer not-a-token")], [("authorization", f"Basic {alice.token}")]):
        assert code_of(alice.stub.Logout, pb.LogoutRequest(), metadata=metadata, timeout=10) == UNAUTHENTICATED


def test_logout_through_one_gateway_ends_the_session_on_another_sharing_the_store(cluster: Cluster) -> None:
    port_b = start_extra_gateway(cluster, "gateway-b")
    alice_a = cluster.client("alice")
    alice_b = Client(pbg.PaymentGatewayStub(cluster.channel(f"localhost:{port_b}")), "alice", alice_a.token)
    assert alice_b.balances().accounts["SBI-1001"] == 5000.0  # B knows the session, and has just used it
    logout(alice_a)
    assert_refused_everywhere(alice_b)  # at once: no process keeps a copy of the session
    assert cluster.accounts() == OPENING_ACCOUNTS


@pytest.mark.parametrize("plain", [False, True], ids=["hashed", "plain"])
def test_password_change_ends_the_sessions_issued_before(make_cluster: Callable[..., Cluster], plain: bool) -> None:
    cluster = make_cluster(start=False)
    write_config(cluster.config_dir, cluster.bank_addresses, plain_password_users=["alice"] if plain else [])
    cluster.start()
    alice, bob = cluster.client("alice"), cluster.client("bob")
    cluster.restart("gateway")
    assert alice.balances().accounts["SBI-1001"] == 5000.0  # a restart alone keeps sessions

    new_password = "alice-new-pw"
    edit_users(cluster, lambda users: users["alice"].update(
        {"password": new_password} if plain else {"password_hash": hash_password(new_password)}))
    cluster.restart("gateway")
    assert_refused_everywhere(alice)
    assert bob.balances().accounts["HDFC-2001"] == 3000.0  # bob's credential did not change
    stub = alice.stub
    assert code_of(stub.Login, pb.LoginRequest(username="alice", password=PASSWORDS["alice"]),
                   timeout=10) == UNAUTHENTICATED
    token = stub.Login(pb.LoginRequest(username="alice", password=new_password), timeout=10).token
    assert Client(stub, "alice", token).pay(key(), "SBI-1001", "HDFC-2001", 5).success
    assert cluster.balance("SBI-1001") == 500_000 - 500 and cluster.total() == OPENING_TOTAL


def test_removed_user_is_unauthenticated_not_unknown(cluster: Cluster) -> None:
    carol = cluster.client("carol")
    edit_users(cluster, lambda users: users.pop("carol"))
    cluster.restart("gateway")
    assert_refused_everywhere(carol)
    assert code_of(carol.stub.Login, pb.LoginRequest(username="carol", password=PASSWORDS["carol"]),
                   timeout=10) == UNAUTHENTICATED
    log = cluster.procs["gateway"].log()
    assert "KeyError" not in log and "status=UNKNOWN" not in log
    assert cluster.accounts() == OPENING_ACCOUNTS


def test_wallet_logout_ends_the_session_at_the_gateway(cluster: Cluster, tmp_path: Path) -> None:
    settings = parse_args(wallet_argv(cluster, tmp_path))
    core = WalletCore(settings, GrpcGateway(settings.gateway, settings.ca_path))
    try:
        token = core.login("alice", PASSWORDS["alice"]).token
        ending = core.logout()
        assert core.session is None and core.outbox is None  # logged out here before the gateway answers
        ending.join(LOGOUT_TIMEOUT + 5)
        assert not ending.is_alive()
        assert_refused_everywhere(Client(pbg.PaymentGatewayStub(cluster.channel()), "alice", token))
    finally:
        core.close()


def test_wallet_that_cannot_reach_the_gateway_still_logs_out(cluster: Cluster, tmp_path: Path) -> None:
    settings = parse_args(wallet_argv(cluster, tmp_path))
    core = WalletCore(settings, GrpcGateway(settings.gateway, settings.ca_path))
    try:
        core.login("alice", PASSWORDS["alice"])
        cluster.procs["gateway"].kill()
        ending = core.logout()
        assert core.session is None and core.outbox is None
        ending.join(LOGOUT_TIMEOUT + 5)  # the call has a deadline: the thread ends although nobody answered
        assert not ending.is_alive()
    finally:
        core.close()


# ---- in-process: the store and the credential fingerprint ------------------------------------------------------
_SCHEMA_BEFORE = """CREATE TABLE sessions (token_hash TEXT PRIMARY KEY, username TEXT NOT NULL,
    created_at REAL NOT NULL, expires_at REAL NOT NULL)"""


def test_a_store_made_before_is_upgraded_and_its_sessions_log_in_again(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "gateway.sqlite3", _SCHEMA_BEFORE)
    with store.transaction() as db:
        db.execute("INSERT INTO sessions VALUES (?, 'alice', ?, ?)",
                   (hashlib.sha256(b"old-token").hexdigest(), time.time(), time.time() + 3600))
    sessions = Sessions(store)
    assert sessions.resolve("old-token") == ("alice", "")  # issued against no credential: the gateway refuses it
    token, _ = sessions.create("alice", "credential-1", 3600)
    assert sessions.resolve(token) == ("alice", "credential-1")
    store.close()


def test_credential_id_changes_with_the_password_and_gives_neither_it_nor_its_hash_away() -> None:
    hashed = hash_password("pw-1")
    assert credential_id("alice", hashed, None) == credential_id("alice", hashed, None)
    assert credential_id("alice", hashed, None) != credential_id("alice", hash_password("pw-1"), None)  # new salt
    assert credential_id("alice", None, "pw-1") == credential_id("alice", None, "pw-1")  # stable across restarts
    assert credential_id("alice", None, "pw-1") != credential_id("alice", None, "pw-2")
    assert credential_id("alice", None, "pw-1") != credential_id("bob", None, "pw-1")
    for fingerprint in (credential_id("alice", hashed, None), credential_id("alice", None, "pw-1")):
        assert "pw-1" not in fingerprint and fingerprint not in hashed and hashed.split("$")[-1] not in fingerprint
