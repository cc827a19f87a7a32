"""The calls the benchmarks make to a gateway, as `call(worker, i)`, and the pool of client threads that makes
them (`drive`)."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import grpc

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


def drive(call: Callable[[int, int], None], threads: int, *, seconds: float | None = None,
          calls: int | None = None) -> dict[str, Any]:
    """`call(w, i)` from `threads` threads, for `seconds` or `calls` calls in all: count, rate, latency
    percentiles of the answered calls, and the calls refused by gRPC code (a client of the benchmark goes on
    with its next payment; a refused payment moved no money or moved it exactly once, as the checks show)."""
    deadline = time.monotonic() + (seconds if seconds is not None else float("inf"))
    per_thread = calls // threads if calls is not None else None
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: dict[str, int] = {}
    lock = threading.Lock()

    def worker(w: int) -> None:
        i = 0
        while time.monotonic() < deadline and (per_thread is None or i < per_thread):
            t = time.perf_counter()
            try:
                call(w, i)
                latencies[w].append(time.perf_counter() - t)
            except Exception as exc:  # noqa: BLE001 - counted and reported; the client goes on, as a wallet would
                kind = exc.code().name if isinstance(exc, grpc.RpcError) else type(exc).__name__
                with lock:
                    errors[kind] = errors.get(kind, 0) + 1
            i += 1

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    every = sorted(x for mine in latencies for x in mine)
    if not every:
        raise RuntimeError(f"no call was answered in the window: {errors}")
    return {"count": len(every), "seconds": elapsed, "rate": len(every) / elapsed, "errors": errors,
            "p50_ms": every[len(every) // 2] * 1000, "p99_ms": every[min(len(every) - 1, int(len(every) * .99))] * 1000}
