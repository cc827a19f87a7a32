"""Peers pin each other's names (CONTRACT §3), with real processes and real certificates: a server holding
another role's CA-signed certificate is refused by its peer in the TLS handshake, before any request
reaches it, so it never sees a password or votes on a payment."""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Callable

import grpc
import pytest

from protofiles import payment_pb2 as pb
from protofiles import payment_pb2_grpc as pbg
from tests.cert_support import impostor_dir
from tests.harness import OPENING_ACCOUNTS, OPENING_TOTAL, PASSWORDS, Cluster, Proc, wait_until
from wallet_tui.gateway import GatewayError, GrpcGateway


def as_impostor(proc: Proc) -> Proc:
    """The same server, run as someone holding a stolen key would: without its own start-up identity check."""
    proc.args = ["tests.impostor", *proc.args]
    return proc


def test_a_server_holding_another_banks_certificate_at_a_banks_address_gets_no_vote(
        make_cluster: Callable[..., Cluster], certs_dir: Path, tmp_path: Path) -> None:
    # The reproduction: an "SBI" server (SBI's accounts, SBI's ledger, SBI's port) presenting HDFC's
    # certificate. Unpinned, the gateway took its YES and the payment succeeded.
    cluster = make_cluster(start=False)
    cluster.process_certs["SBI"] = impostor_dir(certs_dir, tmp_path / "impostor", role="SBI", holder="HDFC")
    cluster.procs["SBI"] = impostor = as_impostor(cluster.bank_proc("SBI")).start()
    cluster.procs["HDFC"] = cluster.bank_proc("HDFC").start()
    cluster.procs["gateway"] = cluster.gateway_proc().start()
    for bank in ("SBI", "HDFC"):
        cluster.wait_bank(bank)  # the impostor serves: its certificate is valid for localhost
    cluster.wait_gateway()

    reply = cluster.client("alice").pay(f"pin-{uuid.uuid4()}", "SBI-1001", "HDFC-2001", 100)
    assert not reply.success and reply.status == pb.PAYMENT_STATUS_FAILED, reply
    assert "bank SBI" in reply.message and "no money moved" in reply.message, reply.message
    wait_until(lambda: cluster.holds() == 0, message="HDFC's hold to be released")
    assert cluster.accounts() == OPENING_ACCOUNTS and cluster.total() == OPENING_TOTAL
    assert list(cluster.txn_states("HDFC").values()) == ["aborted"]  # the real bank voted, then was told
    assert cluster.txn_states("SBI") == {}  # the impostor never saw the payment
    assert "/Bank/" not in impostor.log(), impostor.log()[-2000:]


def test_a_gateway_holding_a_banks_certificate_never_receives_a_password(
        make_cluster: Callable[..., Cluster], certs_dir: Path, tmp_path: Path) -> None:
    cluster = make_cluster(start=False)
    cluster.process_certs["gateway"] = impostor_dir(certs_dir, tmp_path / "impostor", role="gateway",
                                                    holder="SBI")
    cluster.procs["gateway"] = impostor = as_impostor(cluster.gateway_proc()).start()
    cluster.wait_gateway()  # it serves, and its certificate is valid for localhost

    wallet = GrpcGateway(f"localhost:{cluster.gateway_port}", certs_dir / "ca.crt")
    try:
        with pytest.raises(GatewayError) as refused:
            wallet.login("alice", PASSWORDS["alice"])
        assert not wallet.health()
    finally:
        wallet.close()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value
    assert "/PaymentGateway/Login" not in impostor.log(), impostor.log()[-2000:]

    # The control: a client that checks only the CA (as the wallet did) hands the impostor the password, and
    # the impostor's log shows it. So the absence above is the pin's doing.
    pbg.PaymentGatewayStub(cluster.channel()).Login(pb.LoginRequest(username="alice", password=PASSWORDS["alice"]),
                                                   timeout=10)
    wait_until(lambda: "/PaymentGateway/Login" in impostor.log(), message="the impostor to log the Login")


def test_the_wallet_logs_in_to_the_gateway_at_any_address_it_is_dialled_at(untouched: Cluster) -> None:
    # The pin replaces the host name check: 127.0.0.1 (or any name the gateway is reached by) verifies as
    # `gateway`, which the real gateway's certificate carries.
    for host in ("localhost", "127.0.0.1"):
        wallet = GrpcGateway(f"{host}:{untouched.gateway_port}", untouched.certs_dir / "ca.crt")
        try:
            assert wallet.login("dave", PASSWORDS["dave"]).accounts == ("SBI-1004",)
        finally:
            wallet.close()
