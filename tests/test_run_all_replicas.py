"""`run_all.py --gateways N --store URL` (CONTRACT §9): N gateway replicas on consecutive ports share one
PostgreSQL store; a token from one works on the others and a key is one key across them."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc

from protofiles import payment_pb2 as pb
from protofiles import payment_pb2_grpc as pbg
from tests.harness import (OPENING, OPENING_TOTAL, PASSWORDS, REPO, free_port, free_port_base, health_ok,
                           run_all_servers, server_processes, write_config)
from tests.store_view import StoreView


def _dirs(tmp_path: Path) -> list[str]:
    config, certs, data = tmp_path / "config", tmp_path / "certs", tmp_path / "data"
    write_config(config, {bank: f"localhost:{free_port()}" for bank in OPENING})
    return ["--config-dir", str(config), "--certs-dir", str(certs), "--data-dir", str(data), "--no-metrics"]


def test_run_all_starts_replicas_on_one_postgresql_store_and_a_key_is_one_key_across_them(
        tmp_path: Path, postgres_url: str) -> None:
    first = free_port_base([0, 1])
    certs, data = tmp_path / "certs", tmp_path / "data"
    proc, banner = run_all_servers(*_dirs(tmp_path), "--gateways", "2", "--store", postgres_url, "--gateway-port",
                                   str(first))
    try:
        assert f"2 gateway replicas on localhost:{first}–{first + 1}" in banner, banner
        assert {p.name for p in (data / "logs").iterdir()} >= {"gateway.log", "gateway_2.log"}
        assert len(server_processes(str(data))) == 4  # two banks, two replicas
        tls = grpc.ssl_channel_credentials((certs / "ca.crt").read_bytes())
        options = [("grpc.ssl_target_name_override", "gateway")]
        with grpc.secure_channel(f"localhost:{first}", tls, options) as one, \
                grpc.secure_channel(f"localhost:{first + 1}", tls, options) as two:
            a, b = pbg.PaymentGatewayStub(one), pbg.PaymentGatewayStub(two)
            token = a.Login(pb.LoginRequest(username="alice", password=PASSWORDS["alice"]), timeout=10).token
            md = [("authorization", f"Bearer {token}"), ("idempotency-key", "run-all-replicas-1")]
            request = pb.PaymentRequest(from_account="SBI-1001", to_account="HDFC-2001", amount=12.5)
            paid = b.ProcessPayment(request, metadata=md, timeout=10)      # a token from replica 1 on replica 2
            again = a.ProcessPayment(request, metadata=md, timeout=10)     # the same key on replica 1: a replay
        assert paid.success and not paid.replayed
        assert again.replayed and again.transaction_id == paid.transaction_id
        assert StoreView(postgres_url, data).payments_with_key("alice", "run-all-replicas-1") == \
            [(paid.transaction_id, "succeeded")]
        assert not (data / "gateway.sqlite3").exists()  # the replicas' state is in PostgreSQL, not --data-dir

        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert not server_processes(str(data))
        assert not health_ok(f"localhost:{first + 1}", tls, timeout=0.5)
        ledgers = [data / f"bank_{bank}.sqlite3" for bank in OPENING]
        total = sum(sqlite3.connect(path).execute("SELECT sum(balance) FROM accounts").fetchone()[0]
                    for path in ledgers)
        assert total == OPENING_TOTAL
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in server_processes(str(data)):
            os.kill(pid, signal.SIGKILL)


def test_replicas_without_a_postgresql_store_are_refused_before_anything_starts(tmp_path: Path) -> None:
    refused = subprocess.run([sys.executable, "run_all.py", "--servers-only", *_dirs(tmp_path), "--gateways", "2"],
                             cwd=REPO, capture_output=True, text=True, timeout=20)
    assert refused.returncode == 2
    assert "replicas share a PostgreSQL store; add --store" in refused.stderr, refused.stderr
    assert not (tmp_path / "certs").exists() and not (tmp_path / "data").exists()
