"""Run the starter code (shared/baseline-starter) side by side with Strife, from a writable copy."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc

from tests.harness import wait_until

DEFAULT_STARTER = Path(__file__).resolve().parent.parent.parent / "shared" / "baseline-starter"
STARTER_PORTS = {"SBI": 50051, "HDFC": 50052, "gateway": 50053}


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Starter:
    def __init__(self, source: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="strife-starter-")) / "baseline-starter"
        shutil.copytree(source, self.root)
        subprocess.run(["sh", "gen_certs.sh", "certificates"], cwd=self.root, check=True)
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.",
                        "payment.proto"], cwd=self.root / "protofiles", check=True)
        self.procs: list[subprocess.Popen] = []

    def start(self) -> str:
        servers = self.root / "servers"
        log = open(self.root / "servers.log", "ab")
        for bank, port in (("SBI", 50051), ("HDFC", 50052)):
            self.procs.append(subprocess.Popen([sys.executable, "bank_server.py", "--bank", bank, "--port", str(port)],
                                               cwd=servers, stdout=log, stderr=log))
        self.procs.append(subprocess.Popen([sys.executable, "gateway_server.py"], cwd=servers, stdout=log, stderr=log))
        creds = grpc.ssl_channel_credentials((self.root / "certificates" / "ca.crt").read_bytes())
        # The starter has no health service: wait until its gateway answers a Login at all.
        from protofiles import payment_pb2 as pb
        from protofiles import payment_pb2_grpc as pbg

        def up() -> bool:
            with grpc.secure_channel("localhost:50053", creds) as ch:
                try:
                    pbg.PaymentGatewayStub(ch).Login(pb.LoginRequest(username="alice", password="alice123"), timeout=1)
                    return True
                except grpc.RpcError:
                    return False
        wait_until(up, 30, 0.1, "the starter's gateway")
        # Its gateway answers Login without the banks: wait until both accept connections too.
        for bank, port in (("SBI", 50051), ("HDFC", 50052)):
            wait_until(lambda: _accepts(port), 30, 0.1, f"the starter's bank {bank} on port {port}")
        return "localhost:50053"

    @property
    def ca(self) -> bytes:
        return (self.root / "certificates" / "ca.crt").read_bytes()

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.root.parent, ignore_errors=True)
