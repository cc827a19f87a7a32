"""The ceiling: the payment path the contract fixes, with no Strife code in it.

    python -m bench.ceiling [--payments 2000]

A bare gateway and two bare banks (grpc.aio, the same TLS and mutual TLS, the same gRPC engine as Strife,
raw bytes instead of protobuf) do only what CONTRACT §5–§6 make a payment wait for, one step after another:

    wallet → gateway (TLS)
      gateway commits the key (SQLite, WAL, synchronous=FULL)        — "written durably before the first bank"
      → both banks in parallel on a long-lived stream; each commits  — a YES vote must survive a crash
      gateway commits the decision                                   — "stored durably → Commit"
      → both banks in parallel; each commits                         — a committed balance survives kill -9
    ← wallet

Each commit is one tiny INSERT: the cheapest durable write SQLite can do. No validation, no logging, no
idempotency lookup, no ledger. Measured with and without fsync (synchronous=FULL vs OFF), it shows how much of
a sequential payment's time is the machine's, not the code's: an upper bound for a sequential payment that
keeps the contract's guarantees on this stack (Python gRPC, SQLite) and machine. (The other shape tried, a
thread-pool gateway calling unary bank methods in parallel, measured a third slower than this one.)
"""
from __future__ import annotations

import sys

from servers import grpc_engine

if __name__ == "__main__" and sys.argv[1:2] in (["bank"], ["gateway"]):
    grpc_engine.choose()  # the bare servers run on the same gRPC engine as Strife's

import argparse
import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

import grpc

from servers import serving
from servers.certs import GATEWAY_CN
from servers.sqlite_store import SQLiteStore

REPO = Path(__file__).resolve().parent.parent
PAY = "/ceiling.Gateway/Pay"
EXCHANGE = "/ceiling.Bank/Exchange"


class Journal:
    """One SQLite file set up as Strife's are (WAL, preallocated, synchronous=FULL unless `sync` is off);
    `write()` commits one small row."""

    def __init__(self, path: Path, sync: bool) -> None:
        self.store = SQLiteStore(path, "CREATE TABLE IF NOT EXISTS j (id INTEGER PRIMARY KEY, body BLOB)",
                                 preallocate=True)
        self.db = self.store.new_connection()
        if not sync:
            self.db.execute("PRAGMA synchronous=OFF")

    def write(self, body: bytes) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO j (body) VALUES (?)", (body,))
        self.db.execute("COMMIT")


def _service(path: str, method: grpc.RpcMethodHandler) -> grpc.GenericRpcHandler:
    service, name = path.strip("/").split("/")
    return grpc.method_handlers_generic_handler(service, {name: method})


async def _serve(handler: grpc.GenericRpcHandler, port: int, credentials: grpc.ServerCredentials) -> None:
    """Serve `handler` as Strife's servers serve theirs (serving.make_server and serving.bind), until killed."""
    server = serving.make_server([])
    server.add_generic_rpc_handlers([handler])
    serving.bind(server, port, credentials)
    await server.start()
    await server.wait_for_termination()


async def serve_bank(certs: Path, port: int, data: Path, sync: bool) -> None:
    journal = Journal(data, sync)

    async def exchange(requests, context):  # type: ignore[no-untyped-def]
        async for message in requests:
            journal.write(message)
            yield message

    await _serve(_service(EXCHANGE, grpc.stream_stream_rpc_method_handler(exchange)), port,
                 serving.server_credentials(certs, "SBI", require_client_auth=True))


async def serve_gateway(certs: Path, port: int, data: Path, sync: bool, bank_ports: list[int]) -> None:
    journal = Journal(data, sync)
    credentials = serving.client_credentials(certs, GATEWAY_CN)
    channels = [grpc.aio.secure_channel(f"localhost:{p}", credentials) for p in bank_ports]
    streams = [ch.stream_stream(EXCHANGE)(wait_for_ready=True) for ch in channels]

    async def round_trip(stream, body: bytes) -> bytes:  # type: ignore[no-untyped-def]
        await stream.write(body)
        return await stream.read()

    async def work(request: bytes) -> bytes:
        journal.write(request)  # the key, before any bank
        await asyncio.gather(*(round_trip(s, b"prepare" + request) for s in streams))
        journal.write(b"decided")  # the decision, before any Commit
        await asyncio.gather(*(round_trip(s, b"commit" + request) for s in streams))
        return b"ok"

    async def pay(request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
        # Shielded, as Strife's payments are: a caller that gives up (a warm-up call's 1 s deadline on a busy
        # machine) must not cut a payment between its banks, leaving one stream a reply behind the other.
        return await asyncio.shield(work(request))

    await _serve(_service(PAY, grpc.unary_unary_rpc_method_handler(pay)), port,
                 serving.server_credentials(certs, "gateway", require_client_auth=False))


def sequential_rate(certs: Path, work: Path, sync: bool, payments: int) -> float:
    """Start the bare gateway and banks in `work`, pay `payments` times in a row, return payments per second."""
    from tests.harness import free_port, wait_until

    work.mkdir(parents=True, exist_ok=True)
    flag = "sync" if sync else "nosync"
    bank_ports = [free_port(), free_port()]
    gateway_port = free_port()
    me = [sys.executable, "-m", "bench.ceiling"]
    procs = [subprocess.Popen([*me, "bank", str(certs), str(p), str(work / f"bank{p}.db"), flag], cwd=REPO)
             for p in bank_ports]
    procs.append(subprocess.Popen([*me, "gateway", str(certs), str(gateway_port), str(work / "gateway.db"), flag,
                                   *map(str, bank_ports)], cwd=REPO))
    try:
        with grpc.secure_channel(f"localhost:{gateway_port}", serving.client_credentials(certs)) as channel:
            pay = channel.unary_unary(PAY)

            def up() -> bool:
                if any(proc.poll() is not None for proc in procs):
                    raise RuntimeError("a bare server exited at start (its error is above)")
                try:
                    return pay(b"warm", timeout=1) == b"ok"
                except grpc.RpcError:
                    return False
            wait_until(up, 30, 0.05, "the bare gateway and banks")
            for i in range(200):
                pay(b"warm-%d" % i, timeout=5)
            start = time.perf_counter()
            for i in range(payments):
                pay(b"payment-%d" % i, timeout=5)
            return payments / (time.perf_counter() - start)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bank"]:
        asyncio.run(serve_bank(Path(argv[1]), int(argv[2]), Path(argv[3]), argv[4] == "sync"))
        return 0
    if argv[:1] == ["gateway"]:
        asyncio.run(serve_gateway(Path(argv[1]), int(argv[2]), Path(argv[3]), argv[4] == "sync",
                                  [int(p) for p in argv[5:]]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payments", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.payments < 1:
        parser.error("--payments must be at least 1")
    from tests.harness import make_certs
    with tempfile.TemporaryDirectory(prefix="strife-ceiling-") as tmp:
        certs = make_certs(Path(tmp) / "certs")
        for sync in (True, False):
            rate = sequential_rate(certs, Path(tmp) / ("sync" if sync else "nosync"), sync, args.payments)
            print(f"bare contract path, {'synchronous=FULL' if sync else 'no fsync':17}: {rate:.0f} payments/s"
                  f" ({1000 / rate:.2f} ms each)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
