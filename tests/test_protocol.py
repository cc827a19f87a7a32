"""The committed generated code is what payment.proto generates now, and the starter's wire is intact."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from protofiles import payment_pb2

REPO = Path(__file__).resolve().parent.parent


def _significant(text: str) -> list[str]:
    """The generated code minus the generator's version stamps (a newer grpcio-tools may stamp another)."""
    text = re.sub(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)", "", text)
    return [line for line in text.splitlines()
            if "Protobuf Python Version" not in line and not line.startswith("GRPC_GENERATED_VERSION")]


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", "protofiles/payment.proto"], cwd=REPO, check=True)
    for name in ("payment_pb2.py", "payment_pb2_grpc.py"):
        fresh = (tmp_path / "protofiles" / name).read_text()
        committed = (REPO / "protofiles" / name).read_text()
        assert _significant(fresh) == _significant(committed), (
            f"protofiles/{name} is stale: run `python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. "
            f"protofiles/payment.proto`")


def test_starter_fields_keep_their_numbers() -> None:
    expected = {
        "LoginRequest": {"username": 1, "password": 2}, "LoginResponse": {"token": 1},
        "PaymentRequest": {"transaction_id": 1, "from_account": 2, "to_account": 3, "amount": 4},
        "PaymentResponse": {"success": 1}, "PrepareRequest": {"transaction_id": 1, "from_account": 2,
                                                              "to_account": 3, "amount": 4},
        "Vote": {"vote": 1}, "CommitRequest": {"transaction_id": 1}, "AbortRequest": {"transaction_id": 1},
        "Ack": {"success": 1}, "GatewayBalanceRequest": {"username": 1}, "GatewayBalanceResponse": {"accounts": 1},
        "BankBalanceRequest": {"account_number": 1}, "BankBalanceResponse": {"balance": 1},
    }
    for message, fields in expected.items():
        descriptor = payment_pb2.DESCRIPTOR.message_types_by_name[message]
        assert {n: descriptor.fields_by_name[n].number for n in fields} == fields, message
    gateway = payment_pb2.DESCRIPTOR.services_by_name["PaymentGateway"]
    bank = payment_pb2.DESCRIPTOR.services_by_name["Bank"]
    assert {"Login", "ProcessPayment", "GetBalance", "ListPayments"} <= set(gateway.methods_by_name)
    assert {"Prepare", "Commit", "Abort", "GetBalance"} <= set(bank.methods_by_name)
