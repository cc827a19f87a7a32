"""`run_all.py --servers-only` starts every server (making certificates), and SIGTERM stops them all."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc

from protofiles import payment_pb2 as pb
from protofiles import payment_pb2_grpc as pbg
from tests.harness import (OPENING, PASSWORDS, REPO, certs_module_client_credentials, free_port, health_ok,
                           run_all_servers, server_processes, wait_until, write_config)


def _processes_mentioning(text: str) -> list[int]:
    return list(server_processes(text))


def test_run_all_servers_only_starts_everything_and_sigterm_stops_everything(tmp_path: Path) -> None:
    ports = {bank: free_port() for bank in OPENING}
    gateway_port = free_port()
    config, certs, data = tmp_path / "config", tmp_path / "certs", tmp_path / "data"
    write_config(config, {bank: f"localhost:{port}" for bank, port in ports.items()})
    proc, banner = run_all_servers("--config-dir", str(config), "--certs-dir", str(certs), "--data-dir", str(data),
                                   "--gateway-port", str(gateway_port), "--no-metrics")
    try:
        assert "created certificates" in banner
        assert {p.name for p in certs.iterdir()} >= {"ca.crt", "gateway.crt", "gateway.key", "SBI.crt", "HDFC.key"}
        mtls = certs_module_client_credentials(certs, "gateway")
        for port in ports.values():
            assert health_ok(f"localhost:{port}", mtls)
        assert health_ok(f"localhost:{gateway_port}", grpc.ssl_channel_credentials((certs / "ca.crt").read_bytes()))
        assert len(_processes_mentioning(str(data))) == 3

        with grpc.secure_channel(f"localhost:{gateway_port}",
                                 grpc.ssl_channel_credentials((certs / "ca.crt").read_bytes())) as channel:
            stub = pbg.PaymentGatewayStub(channel)
            token = stub.Login(pb.LoginRequest(username="alice", password=PASSWORDS["alice"]), timeout=10).token
            md = [("authorization", f"Bearer {token}"), ("idempotency-key", "run-all-1")]
            paid = stub.ProcessPayment(pb.PaymentRequest(from_account="SBI-1001", to_account="HDFC-2001",
                                                         amount=12.5), metadata=md, timeout=10)
            assert paid.success
        assert {p.name for p in (data / "logs").iterdir()} == {"bank_SBI.log", "bank_HDFC.log", "gateway.log",
                                                               "run_all.log"}
        wait_until(lambda: "ProcessPayment" in (data / "logs" / "gateway.log").read_text(), 5,
                   message="the payment's log line")

        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "all servers stopped" in out
        assert _processes_mentioning(str(data)) == []
        for port in ports.values():
            assert not health_ok(f"localhost:{port}", mtls, timeout=0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _processes_mentioning(str(data)):
            os.kill(pid, signal.SIGKILL)


def test_run_all_reports_a_server_that_cannot_start(tmp_path: Path) -> None:
    config = tmp_path / "config"
    earlier = tmp_path / "data" / "logs" / "bank_HDFC.log"  # logs are appended to from run to run
    earlier.parent.mkdir(parents=True)
    earlier.write_text("2026-01-01 00:00:00,000 bank HDFC INFO an earlier run's last words\n")
    with socket.socket() as squatter:  # another program already holds HDFC's port
        squatter.bind(("0.0.0.0", 0))
        squatter.listen()
        write_config(config, {"SBI": f"localhost:{free_port()}", "HDFC": f"localhost:{squatter.getsockname()[1]}"})
        result = subprocess.run([sys.executable, "run_all.py", "--servers-only", "--config-dir", str(config),
                                 "--certs-dir", str(tmp_path / "certs"), "--data-dir", str(tmp_path / "data"),
                                 "--gateway-port", str(free_port()), "--no-metrics"], cwd=REPO,
                                capture_output=True, text=True,
                                timeout=60)
    assert result.returncode != 0
    assert "cannot start" in result.stderr and "port" in result.stderr
    assert "earlier run" not in result.stderr  # the report quotes this run's lines only
    wait_until(lambda: _processes_mentioning(str(tmp_path / "data")) == [], 10, message="no server left running")


def test_run_all_runs_the_wallet_in_the_foreground_and_stops_the_servers_when_it_quits(tmp_path: Path) -> None:
    import pty
    import select
    import time

    ports = {bank: free_port() for bank in OPENING}
    config, data = tmp_path / "config", tmp_path / "data"
    write_config(config, {bank: f"localhost:{port}" for bank, port in ports.items()})
    pid, fd = pty.fork()
    if pid == 0:  # the child: run_all on a real terminal, as a person would start it
        os.chdir(REPO)
        os.environ.update(TERM="xterm-256color", COLUMNS="120", LINES="40")
        os.execv(sys.executable, [sys.executable, "run_all.py", "--config-dir", str(config), "--certs-dir",
                                  str(tmp_path / "certs"), "--data-dir", str(data), "--gateway-port", str(free_port()),
                                  "--no-metrics"])
    screen = b""
    try:
        def read_for(seconds: float) -> None:
            nonlocal screen
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                ready, _, _ = select.select([fd], [], [], 0.1)
                if ready:
                    try:
                        screen += os.read(fd, 65536)
                    except OSError:
                        return

        deadline = time.monotonic() + 60
        while b"Log in" not in screen and time.monotonic() < deadline:  # the login screen is drawn
            read_for(0.2)
        assert b"Log in" in screen, screen[-2000:]
        assert len(_processes_mentioning(str(data))) == 3
        # A gateway killed under the wallet is restarted, and run_all says so in its log, not on the screen.
        gateway = [pid for pid, cmd in server_processes(str(data)).items() if "servers.gateway_server" in cmd]
        os.kill(gateway[0], signal.SIGKILL)
        wait_until(lambda: "gateway is serving again" in (data / "logs" / "run_all.log").read_text(), 15,
                   message="the gateway's restart in run_all.log")
        read_for(0.5)
        assert b"INFO" not in screen and b"method=" not in screen  # no server log drawn over the wallet
        os.write(fd, b"\x11")  # ctrl+q quits the wallet
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            read_for(0.2)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
        else:
            raise AssertionError("run_all did not exit after the wallet quit")
        assert os.waitstatus_to_exitcode(status) == 0
        assert b"all servers stopped" in screen
        assert b"restart" not in screen and b"SIGKILL" not in screen  # run_all's notes stayed in its log
        assert _processes_mentioning(str(data)) == []
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(fd)
        for leftover in _processes_mentioning(str(data)):
            os.kill(leftover, signal.SIGKILL)
