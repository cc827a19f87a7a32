"""The calls the benchmarks make to a gateway, as `call(worker, i)` for a pool of client threads."""
from __future__ import annotations

from typing import Callable

from protofiles import payment_pb2 as pb
from protofiles import payment_pb2_grpc as pbg


def payment_caller(stub: pbg.PaymentGatewayStub, token: str | None, tag: str) -> Callable[[int, int], None]:
    """A new payment of 0.01 per call, under the key `tag-worker-i`; raises unless it succeeded."""
    auth = [("authorization", f"Bearer {token}")] if token else []

    def call(w: int, i: int) -> None:
        key = f"{tag}-{w}-{i}"
        response = stub.ProcessPayment(pb.PaymentRequest(transaction_id=key, from_account="SBI-1001",
                                                         to_account="HDFC-2001", amount=0.01),
                                       metadata=auth, timeout=30)
        if not response.success:
            raise RuntimeError(f"payment {key} failed: {response.message}")
    return call


def replay_one_key(stub: pbg.PaymentGatewayStub, token: str, key: str) -> Callable[[int, int], None]:
    """The same payment again and again under one key, already paid: raises unless it was replayed."""
    auth = [("authorization", f"Bearer {token}"), ("idempotency-key", key)]
    request = pb.PaymentRequest(from_account="SBI-1001", to_account="HDFC-2001", amount=0.01)

    def call(_w: int, _i: int) -> None:
        if not stub.ProcessPayment(request, metadata=auth, timeout=30).replayed:
            raise RuntimeError(f"key {key} was not replayed")
    return call
