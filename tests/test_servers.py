"""The servers as processes (CONTRACT §2, §3, §7): health, start-up failures, graceful stop, the certificate
generator, the logging interceptor, and the gateway's GetBalance and ListPayments as a wallet sees them."""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protofiles import payment_pb2 as pb
from tests.cert_support import issue
from tests.harness import (OPENING, OPENING_TOTAL, REPO, Cluster, certs_module_client_credentials, wait_until,
                           write_config)


def key() -> str:
    return f"servers-{uuid.uuid4()}"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path) -> Iterator[Cluster]:
    """A cluster shared by tests that only look at it (or only add payments of their own and check them)."""
    cluster = Cluster(root=tmp_path_factory.mktemp("servers"), certs_dir=certs_dir).start()
    yield cluster
    cluster.stop()


def run_server(args: list[str], timeout: float = 30) -> tuple[int, list[str]]:
    """Run `python -m <args>` to completion; its exit code and its non-empty output lines (stdout + stderr)."""
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=timeout, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return done.returncode, [line for line in done.stdout.splitlines() if line.strip()]


def common_args(config_dir: Path, certs_dir: Path, data_dir: Path) -> list[str]:
    return ["--config-dir", str(config_dir), "--certs-dir", str(certs_dir), "--data-dir", str(data_dir)]


def health_status(address: str, credentials: grpc.ChannelCredentials) -> int:
    with grpc.secure_channel(address, credentials) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


# ---- health --------------------------------------------------------------------------------------------------
def test_every_server_answers_its_health_check_serving(running: Cluster, tmp_path: Path) -> None:
    ca = grpc.ssl_channel_credentials((running.certs_dir / "ca.crt").read_bytes())
    assert health_status(f"localhost:{running.gateway_port}", ca) == health_pb2.HealthCheckResponse.SERVING
    issue(running.certs_dir, tmp_path, "monitor")  # e.g. a monitoring probe's own client certificate
    shutil.copy2(running.certs_dir / "ca.crt", tmp_path / "ca.crt")
    for bank in OPENING:
        address = f"localhost:{running.bank_ports[bank]}"
        # Health is open to any CA-signed client certificate, not only the gateway's.
        for certs, cert in ((running.certs_dir, "gateway"), (tmp_path, "monitor")):
            creds = certs_module_client_credentials(certs, cert)
            assert health_status(address, creds) == health_pb2.HealthCheckResponse.SERVING, (bank, cert)


# ---- start-up failures: one clear line, non-zero exit --------------------------------------------------------
def test_second_server_on_a_port_in_use_exits_with_one_clear_line(running: Cluster, tmp_path: Path) -> None:
    args = common_args(running.config_dir, running.certs_dir, tmp_path / "data")
    for name, command in [
        ("bank", ["servers.bank_server", "--bank", "SBI", "--port", str(running.bank_ports["SBI"]), *args]),
        ("gateway", ["servers.gateway_server", "--port", str(running.gateway_port), *args]),
        ("bank on the gateway's port", ["servers.bank_server", "--bank", "HDFC", "--port",
                                        str(running.gateway_port), *args]),
    ]:
        code, lines = run_server(command)
        assert code != 0, name
        assert len(lines) == 1, (name, lines)
        assert "cannot start" in lines[0] and "port" in lines[0], (name, lines)
        assert str(running.gateway_port if "gateway" in name else running.bank_ports["SBI"]) in lines[0]
    # The servers that own the ports were not disturbed.
    running.wait_bank("SBI", timeout=5)
    running.wait_gateway(timeout=5)
    assert running.client("alice").balances().accounts["SBI-1001"] == 5000.0


@pytest.mark.parametrize("server", ["bank", "gateway"])
@pytest.mark.parametrize("missing", ["all", "own key", "own certificate", "ca.crt"])
def test_missing_certificate_exits_with_one_clear_line(running: Cluster, tmp_path: Path, server: str,
                                                       missing: str) -> None:
    certs = tmp_path / "certs"
    shutil.copytree(running.certs_dir, certs)
    name = "SBI" if server == "bank" else "gateway"
    if missing == "all":
        shutil.rmtree(certs)
        certs.mkdir()
    else:
        gone = {"own key": f"{name}.key", "own certificate": f"{name}.crt", "ca.crt": "ca.crt"}[missing]
        (certs / gone).unlink()
    args = common_args(running.config_dir, certs, tmp_path / "data")
    command = (["servers.bank_server", "--bank", "SBI", "--port", "0", *args] if server == "bank"
               else ["servers.gateway_server", "--port", "0", *args])
    code, lines = run_server(command)
    assert code != 0
    assert len(lines) == 1 and "cannot start" in lines[0], lines
    assert re.search(r"certificate|key", lines[0]), lines


@pytest.mark.parametrize("case", ["users.json not JSON", "users.json missing", "users.json wrong shape",
                                  "banks.json not JSON", "banks.json missing", "user account malformed"])
def test_gateway_with_a_bad_config_exits_with_one_clear_line(running: Cluster, tmp_path: Path, case: str) -> None:
    config = tmp_path / "config"
    write_config(config, running.bank_addresses)
    target = config / ("banks.json" if case.startswith("banks") else "users.json")
    if "not JSON" in case:
        target.write_text('{"alice": {"password": "x", "accounts": [')
    elif "missing" in case:
        target.unlink()
    elif "wrong shape" in case:
        target.write_text('["alice", "bob"]')
    else:
        target.write_text('{"alice": {"password": "x", "accounts": ["SBI1001"]}}')
    code, lines = run_server(["servers.gateway_server", "--port", "0",
                              *common_args(config, running.certs_dir, tmp_path / "data")])
    assert code != 0
    assert len(lines) == 1 and "cannot start" in lines[0], lines
    assert target.name in lines[0], lines


@pytest.mark.parametrize("case", ["unknown --bank", "opening balances not JSON", "banks.json missing"])
def test_bank_with_a_bad_config_exits_with_one_clear_line(running: Cluster, tmp_path: Path, case: str) -> None:
    config = tmp_path / "config"
    write_config(config, running.bank_addresses)
    bank = "NOPE" if case == "unknown --bank" else "SBI"
    if case == "opening balances not JSON":
        (config / "SBI_accounts.json").write_text("{SBI-1001: 5000")
    elif case == "banks.json missing":
        (config / "banks.json").unlink()
    code, lines = run_server(["servers.bank_server", "--bank", bank, "--port", "0",
                              *common_args(config, running.certs_dir, tmp_path / "data")])
    assert code != 0
    assert len(lines) == 1 and "cannot start" in lines[0], lines
    expected = {"unknown --bank": "NOPE", "opening balances not JSON": "SBI_accounts.json",
                "banks.json missing": "banks.json"}[case]
    assert expected in lines[0], lines


# ---- graceful stop -------------------------------------------------------------------------------------------
def test_sigterm_and_sigint_stop_every_server_gracefully_with_exit_code_0(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    assert alice.pay(key(), "SBI-1001", "HDFC-2001", 10).success
    for name, sig in [("gateway", signal.SIGTERM), ("SBI", signal.SIGTERM), ("HDFC", signal.SIGINT)]:
        proc = cluster.procs[name]
        started = time.monotonic()
        proc.popen.send_signal(sig)
        try:
            code = proc.popen.wait(timeout=8)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not stop within 8 s of {sig.name}")
        assert code == 0, (name, proc.log()[-2000:])
        assert time.monotonic() - started < 8
        assert "stopped" in proc.log().splitlines()[-1], name
    assert cluster.balance("SBI-1001") == 500_000 - 1_000 and cluster.total() == OPENING_TOTAL


# ---- the certificate generator -------------------------------------------------------------------------------
def test_certs_command_creates_ca_gateway_and_bank_certificates(tmp_path: Path) -> None:
    config, certs = tmp_path / "config", tmp_path / "certs"
    write_config(config, {"SBI": "localhost:1", "HDFC": "localhost:2", "AXIS": "localhost:3"})
    code, lines = run_server(["servers.certs", "--certs-dir", str(certs), "--config-dir", str(config)])
    assert code == 0, lines
    names = ["gateway", "SBI", "HDFC", "AXIS"]
    assert sorted(p.name for p in certs.iterdir()) == sorted(
        ["ca.crt", "ca.key"] + [f"{n}.{ext}" for n in names for ext in ("crt", "key")])

    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in names:
        cert = x509.load_pem_x509_certificate((certs / f"{name}.crt").read_bytes())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert cert.issuer == ca.subject
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes,  # type: ignore[call-arg]
                               ec.ECDSA(cert.signature_hash_algorithm))  # raises if not signed by this CA
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "localhost" in san.get_values_for_type(x509.DNSName)
        assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    for key_file in certs.glob("*.key"):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, key_file.name


def test_certs_command_with_a_bad_config_exits_non_zero(tmp_path: Path) -> None:
    code, lines = run_server(["servers.certs", "--certs-dir", str(tmp_path / "certs"),
                              "--config-dir", str(tmp_path / "nothing-here")])
    assert code != 0 and len(lines) == 1 and "banks.json" in lines[0], lines
    assert not (tmp_path / "certs" / "ca.key").exists()


# ---- the logging interceptor ---------------------------------------------------------------------------------
def log_lines(text: str, *needles: str) -> list[str]:
    return [line for line in text.splitlines() if all(n in line for n in needles)]


def test_logging_interceptor_writes_one_line_per_call(running: Cluster) -> None:
    alice = running.client("alice")
    k = key()
    response = alice.pay(k, "SBI-1001", "HDFC-2001", 12.5)
    assert response.success
    gateway = running.procs["gateway"]
    line, = wait_until(lambda: log_lines(gateway.log(), f"key={k}"), 5, message="the payment's log line")
    assert "method=/PaymentGateway/ProcessPayment" in line
    assert re.search(r"\bpeer=ipv[46]:\S+", line), line
    assert " user=alice " in line and " amount=12.5 " in line and " status=OK " in line, line
    assert re.search(r"\bms=\d+(\.\d+)?\b", line) and line.endswith("retry=no"), line

    again = alice.pay(k, "SBI-1001", "HDFC-2001", 12.5)
    assert again.replayed
    lines = wait_until(lambda: len(log_lines(gateway.log(), f"key={k}")) == 2 and log_lines(gateway.log(),
                                                                                            f"key={k}"), 5)
    assert lines[0] == line and "retry=replay" in lines[1] and " status=OK " in lines[1]

    txn = response.transaction_id
    for bank in ("SBI", "HDFC"):
        bank_lines = wait_until(lambda: len(log_lines(running.procs[bank].log(), f"txn={txn}")) >= 2 and
                                log_lines(running.procs[bank].log(), f"txn={txn}"), 5, message=f"{bank} lines")
        methods = [re.search(r"method=(\S+)", b).group(1) for b in bank_lines]  # type: ignore[union-attr]
        assert methods == ["/Bank/Prepare", "/Bank/Commit"], (bank, bank_lines)
        assert all(" status=OK " in b and re.search(r"\bms=\d", b) for b in bank_lines), bank_lines

    # A refused call is logged too, with its final status.
    with pytest.raises(grpc.RpcError):
        alice.stub.GetBalance(pb.GatewayBalanceRequest(), metadata=[("authorization", "Bearer nope")], timeout=5)
    wait_until(lambda: log_lines(gateway.log(), "method=/PaymentGateway/GetBalance", "status=UNAUTHENTICATED"), 5)
    assert running.total() == OPENING_TOTAL and running.holds() == 0


# ---- GetBalance ----------------------------------------------------------------------------------------------
def test_get_balance_reports_each_accounts_balance_and_available_balance(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    assert alice.pay(key(), "SBI-1001", "HDFC-2001", 10.5).success
    hdfc = cluster.bank_stub("HDFC")
    hold = f"hold-{uuid.uuid4()}"
    assert hdfc.Prepare(pb.PrepareRequest(transaction_id=hold, from_account="HDFC-2002", to_account="SBI-1003",
                                          amount=100), timeout=5).vote  # ₹100 of HDFC-2002 on hold
    reply = alice.balances()
    details = {d.account: d for d in reply.details}
    assert list(details) == ["SBI-1001", "HDFC-2002"]
    sbi, hd = details["SBI-1001"], details["HDFC-2002"]
    assert sbi.available and hd.available
    assert (sbi.balance, sbi.available_balance, sbi.balance_paise, sbi.available_paise) == (
        4989.5, 4989.5, 498_950, 498_950)
    # A hold is still in the balance until it commits; only the available balance drops.
    assert (hd.balance, hd.available_balance, hd.balance_paise, hd.available_paise) == (
        1500.0, 1400.0, 150_000, 140_000)
    assert dict(reply.accounts) == {"SBI-1001": 4989.5, "HDFC-2002": 1500.0}
    assert hdfc.Abort(pb.AbortRequest(transaction_id=hold), timeout=5).success
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0


def test_balance_at_a_bank_that_is_down_is_unavailable_never_made_up(cluster: Cluster) -> None:
    alice = cluster.client("alice")
    assert alice.pay(key(), "SBI-1001", "HDFC-2002", 25).success  # alice to herself, across banks
    cluster.procs["HDFC"].kill()

    started = time.monotonic()
    reply = alice.balances()
    assert time.monotonic() - started < 5
    details = {d.account: d for d in reply.details}
    assert set(details) == {"SBI-1001", "HDFC-2002"}
    down = details["HDFC-2002"]
    assert not down.available and "HDFC" in down.message and "unavailable" in down.message
    assert (down.balance, down.available_balance, down.balance_paise, down.available_paise) == (0, 0, 0, 0)
    assert "HDFC-2002" not in reply.accounts
    up = details["SBI-1001"]
    assert up.available and up.balance_paise == 497_500
    assert dict(reply.accounts) == {"SBI-1001": 4975.0}

    # A silent bank (stopped, not dead) is no different: unavailable within the balance timeout.
    cluster.procs["SBI"].pause()
    try:
        started = time.monotonic()
        reply = alice.balances()
        assert time.monotonic() - started < 6
        assert all(not d.available for d in reply.details) and dict(reply.accounts) == {}
    finally:
        cluster.procs["SBI"].resume()

    cluster.restart("HDFC")
    reply = wait_until(lambda: (r := alice.balances()) and len(r.accounts) == 2 and r, 10,
                       message="both banks to answer again")
    assert dict(reply.accounts) == {"SBI-1001": 4975.0, "HDFC-2002": 1525.0}
    assert cluster.total() == OPENING_TOTAL


# ---- ListPayments --------------------------------------------------------------------------------------------
def test_list_payments_shows_sent_and_received_newest_first_with_status(cluster: Cluster) -> None:
    alice, bob, dave = cluster.client("alice"), cluster.client("bob"), cluster.client("dave")
    k_paid, k_declined, k_bob = key(), key(), key()
    paid = alice.pay(k_paid, "SBI-1001", "HDFC-2001", 10)
    declined = alice.pay(k_declined, "HDFC-2002", "HDFC-2001", 99_999)  # more than alice has
    received = bob.pay(k_bob, "HDFC-2001", "SBI-1001", 2.5)
    assert paid.status == pb.PAYMENT_STATUS_SUCCEEDED and received.status == pb.PAYMENT_STATUS_SUCCEEDED
    assert declined.status == pb.PAYMENT_STATUS_DECLINED

    history = alice.history()
    assert [p.transaction_id for p in history] == [received.transaction_id, declined.transaction_id,
                                                   paid.transaction_id]  # newest first
    incoming, no, yes = history
    assert not incoming.outgoing and incoming.idempotency_key == ""  # never the sender's key
    assert (incoming.from_account, incoming.to_account, incoming.amount_paise) == ("HDFC-2001", "SBI-1001", 250)
    assert incoming.status == pb.PAYMENT_STATUS_SUCCEEDED
    assert no.outgoing and no.status == pb.PAYMENT_STATUS_DECLINED and no.idempotency_key == k_declined
    assert yes.outgoing and yes.status == pb.PAYMENT_STATUS_SUCCEEDED and yes.idempotency_key == k_paid
    assert (yes.from_account, yes.to_account, yes.amount, yes.amount_paise) == ("SBI-1001", "HDFC-2001", 10.0,
                                                                               1_000)
    assert history[0].created_at_ms >= history[1].created_at_ms >= history[2].created_at_ms > 0
    assert all(p.finished_at_ms >= p.created_at_ms for p in history)

    bob_history = bob.history()  # alice's declined payment never reached bob: not in his history
    assert [p.transaction_id for p in bob_history] == [received.transaction_id, paid.transaction_id]
    assert bob_history[0].outgoing and bob_history[0].idempotency_key == k_bob
    assert not bob_history[1].outgoing and bob_history[1].idempotency_key == ""
    assert k_paid not in str(bob_history[1]) and k_paid not in bob_history[1].message

    assert [p.transaction_id for p in alice.history(limit=1)] == [received.transaction_id]
    assert [p.transaction_id for p in alice.history(limit=2)] == [received.transaction_id, declined.transaction_id]
    assert len(alice.history(limit=500)) == 3
    assert dave.history() == []

    assert cluster.balance("SBI-1001") == 500_000 - 1_000 + 250
    assert cluster.balance("HDFC-2001") == 300_000 + 1_000 - 250
    assert cluster.balance("HDFC-2002") == 150_000
    assert cluster.total() == OPENING_TOTAL and cluster.holds() == 0
