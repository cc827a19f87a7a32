"""Strife benchmark: real servers in a temp sandbox, the starter code side by side, one table and a JSON line.

    python -m bench.run [--starter ../shared/baseline-starter] [--payments 2000] [--quick] [--repeat N]
                        [--store postgresql://USER@HOST:PORT/DB [--rounds 5] [--replicas 1,2,3] ...]

With --store (an admin URL), the PostgreSQL store and gateway replicas are measured after the table, beside
the SQLite store again (bench/replicas.py; `python -m bench.replicas` runs that part alone).
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protofiles import payment_pb2 as pb
from protofiles import payment_pb2_grpc as pbg
from tests.harness import Cluster, free_port, health_ok, make_certs, wait_until

from bench.calls import drive, payment_caller
from bench.ceiling import sequential_rate as bare_contract_rate
from bench.process_stats import rss_mb
from bench.starter import DEFAULT_STARTER, Starter
from bench.wallet import drain_rate, startup_seconds


def measure(call: Callable[[int, int], None], total: int, threads: int = 1) -> dict[str, float]:
    """Run `call(worker, i)` `total` times over `threads` threads; rate and latency percentiles."""
    result = drive(call, threads, calls=total)
    if result["errors"]:
        print(f"bench: calls that failed (not counted): {result['errors']}", file=sys.stderr)
    return {key: result[key] for key in ("rate", "p50_ms", "p99_ms")}


def floor_rate(certs: Path, n: int) -> float:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.floor_server", str(certs), str(port)],
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        creds = grpc.ssl_channel_credentials((certs / "ca.crt").read_bytes())
        wait_until(lambda: health_ok(f"localhost:{port}", creds), 20, 0.05, "floor server")
        with grpc.secure_channel(f"localhost:{port}", creds) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest()
            for _ in range(200):
                stub.Check(request, timeout=5)
            return measure(lambda w, i: stub.Check(request, timeout=5), n)["rate"]
    finally:
        proc.terminate()
        proc.wait(10)


def seed_finished_keys(db_path: Path, user: str, count: int, prefix: str) -> None:
    """Fill the gateway's table with finished keys (what weeks of traffic leave), straight into SQLite."""
    now = time.time()
    with sqlite3.connect(db_path, timeout=30) as db:
        start = db.execute("SELECT coalesce(max(id), 0) FROM payments").fetchone()[0] + 1
        db.executemany("INSERT INTO payments (id, txn_id, username, idem_key, from_account, to_account, amount, status,"
                       " message, created_at, finished_at) VALUES (?, ?, ?, ?, 'SBI-1001', 'HDFC-2001', 1, 'succeeded',"
                       " 'seeded', ?, ?)",
                       ((start + i, f"seed-{uuid.uuid4().hex}", user, f"{prefix}-{i}", now, now) for i in range(count)))
        response = pb.PaymentResponse(success=True, status=pb.PAYMENT_STATUS_SUCCEEDED, message="seeded").SerializeToString()
        db.executemany("INSERT INTO idempotency_keys (username, idem_key, fingerprint, payment_id, recovery_point,"
                       " response, created_at, last_run_at, finished_at) VALUES (?, ?, ?, ?, 'finished', ?, ?, ?, ?)",
                       ((user, f"{prefix}-{i}", "ProcessPayment\x1fSBI-1001\x1fHDFC-2001\x1f1", start + i, response,
                         now, now, now) for i in range(count)))


def replay_caller(stub: pbg.PaymentGatewayStub, token: str, prefix: str, count: int) -> Callable[[int, int], None]:
    auth = [("authorization", f"Bearer {token}")]

    def call(w: int, i: int) -> None:
        key = f"{prefix}-{(i * 7919 + w) % count}"
        response = stub.ProcessPayment(pb.PaymentRequest(from_account="SBI-1001", to_account="HDFC-2001", amount=0.01),
                                       metadata=[*auth, ("idempotency-key", key)], timeout=30)
        if not response.replayed:
            raise RuntimeError(f"key {key} was not replayed")
    return call


def bench_strife(work: Path, n: int, quick: bool) -> dict[str, float]:
    certs = make_certs(work / "certs")
    results: dict[str, float] = {"floor": floor_rate(certs, n),
                                 "bare_path": bare_contract_rate(certs, work / "ceiling", sync=True, payments=n)}
    cluster = Cluster(root=work / "strife", certs_dir=certs, txn_timeout=5.0).start()
    try:
        client = cluster.client("alice")
        stub, token = client.stub, client.token
        gateway_pid = cluster.procs["gateway"].popen.pid
        payment_caller(stub, token, "warm")(0, 0)
        seq = measure(payment_caller(stub, token, "seq"), n)
        results.update(sequential=seq["rate"], p50_ms=seq["p50_ms"], p99_ms=seq["p99_ms"])
        results["concurrent"] = measure(payment_caller(stub, token, "conc"), n * 2, threads=16)["rate"]
        key = f"replay-{uuid.uuid4()}"
        auth = [("authorization", f"Bearer {token}"), ("idempotency-key", key)]
        request = pb.PaymentRequest(from_account="SBI-1001", to_account="HDFC-2001", amount=0.01)
        stub.ProcessPayment(request, metadata=auth, timeout=30)
        results["replay"] = measure(lambda w, i: stub.ProcessPayment(request, metadata=auth, timeout=30), n)["rate"]

        seed_finished_keys(cluster.data_dir / "gateway.sqlite3", "alice", 1000, "small")
        results["replay_1k_keys"] = measure(replay_caller(stub, token, "small", 1000), n)["rate"]
        seed_finished_keys(cluster.data_dir / "gateway.sqlite3", "alice", 99_000, "big")
        results["replay_100k_keys"] = measure(replay_caller(stub, token, "big", 99_000), n)["rate"]

        results.update(drain_rate(cluster, work / "wallet", 100 if quick else 500))
        results["wallet_startup_s"] = startup_seconds(certs, work / "wallet-startup")

        mem_payments = 2000 if quick else 20_000
        results["rss_before_mb"] = rss_mb(gateway_pid)
        measure(payment_caller(stub, token, "mem"), mem_payments, threads=16)
        results["rss_after_mb"] = rss_mb(gateway_pid)
        results["rss_payments"] = mem_payments
        wait_until(lambda: cluster.unfinished_payments() == 0, 30, 0.1, "every payment finished")
        results["conserved"] = float(cluster.total() == _opening_total() and cluster.holds() == 0)
    finally:
        cluster.stop()
    return results


def _opening_total() -> int:
    from tests.harness import OPENING_TOTAL
    return OPENING_TOTAL


def bench_starter(source: Path, n: int) -> dict[str, float]:
    starter = Starter(source)
    try:
        address = starter.start()
        with grpc.secure_channel(address, grpc.ssl_channel_credentials(starter.ca)) as channel:
            stub = pbg.PaymentGatewayStub(channel)
            payment_caller(stub, None, "warm")(0, 0)
            seq = measure(payment_caller(stub, None, "seq"), n)
            conc = measure(payment_caller(stub, None, "conc"), n * 2, threads=16)
        return {"sequential": seq["rate"], "p50_ms": seq["p50_ms"], "p99_ms": seq["p99_ms"], "concurrent": conc["rate"]}
    finally:
        starter.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starter", type=Path, default=None,
                        help=f"the starter code's folder (default: {DEFAULT_STARTER}, if it is there)")
    parser.add_argument("--payments", type=int, default=2000, help="payments per sequential measurement")
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test of the benchmark)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run everything N times and report each measure's median (a small VM swings ±25 %%"
                             " from run to run)")
    from bench import replicas  # here, not above: it builds on this module
    replicas.add_arguments(parser, store_required=False)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.payments < MIN_PAYMENTS:
        parser.error(f"--payments must be at least {MIN_PAYMENTS} (the concurrent run spreads twice that over 16"
                     " threads)")
    try:
        starter_dir = find_starter(args.starter)
    except ValueError as exc:
        parser.error(str(exc))
    replicas.check_arguments(parser, args)  # a bad --store or an unreachable server: refused before anything runs
    if starter_dir is None:
        print(f"bench: no starter code at {DEFAULT_STARTER}: its column stays empty and no ratio to it is shown;"
              " pass --starter DIR (the starter is shared/baseline-starter in the Strife workspace)",
              file=sys.stderr, flush=True)
    n = 300 if args.quick else args.payments
    runs: list[tuple[dict[str, float], dict[str, float]]] = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="strife-bench-") as tmp:
            strife = bench_strife(Path(tmp), n, args.quick)
        starter = bench_starter(starter_dir, max(100, n // 4)) if starter_dir is not None else {}
        runs.append((strife, starter))
        if args.repeat > 1:
            print(f"run {i + 1}/{args.repeat}: {summary(strife, starter)}", flush=True)
    strife, starter = median_of([r[0] for r in runs]), median_of([r[1] for r in runs])
    if args.repeat > 1:
        print(f"medians of {args.repeat} runs (each ratio below is of medians):")
    print_table(strife, starter)
    postgres = {"postgres": replicas.run(args)} if args.store else {}
    print(json.dumps({"strife": strife, "starter": starter, **postgres,
                      **({"runs": [{"strife": a, "starter": b} for a, b in runs]} if args.repeat > 1 else {})},
                     sort_keys=True, default=str))
    return 0


ALL_MUST_HOLD = ("conserved", "drain_exactly_once")
MIN_PAYMENTS = 50


def find_starter(given: Path | None) -> Path | None:
    """The starter's folder: the one given (which must look like the starter), else the default if it is
    there, else None (the benchmark then runs Strife alone and says so)."""
    folder = DEFAULT_STARTER if given is None else given
    if not folder.is_dir():
        if given is None:
            return None
        raise ValueError(f"--starter {given}: no such folder")
    missing = [part for part in ("servers", "protofiles/payment.proto", "gen_certs.sh") if not (folder / part).exists()]
    if missing:
        raise ValueError(f"--starter {folder}: not the starter code (no {', '.join(missing)} in it)")
    return folder


def median_of(results: list[dict[str, float]]) -> dict[str, float]:
    """Each measure's median over the runs; a check that must hold in every run counts only if it did."""
    keys = results[0].keys() if results else ()
    return {k: (min(r[k] for r in results) if k in ALL_MUST_HOLD else statistics.median(r[k] for r in results))
            for k in keys}


def times(value: float, of: float) -> str:
    """A ratio a target is judged by, to two decimal places: rounded to one, a run at 4.98x the starter
    printed as "5.0x". (Shares of floor/3 likewise keep one decimal place.)"""
    return f"{value / of:.2f}x"


def summary(s: dict[str, float], b: dict[str, float]) -> str:
    line = (f"floor {s['floor']:.0f}/s, bare path {s['bare_path']:.0f}/s, sequential {s['sequential']:.0f}/s,"
            f" concurrent {s['concurrent']:.0f}/s,"
            f" replay {s['replay']:.0f}/s, drain {s['drain']:.0f}/s")
    if b:
        line += (f"; starter {b['sequential']:.0f} / {b['concurrent']:.0f}/s →"
                 f" {times(s['sequential'], b['sequential'])} / {times(s['concurrent'], b['concurrent'])}")
    return line


def print_table(s: dict[str, float], b: dict[str, float]) -> None:
    ceiling = s["floor"] / 3

    def theirs(fmt: str, *keys: str) -> str:
        return fmt.format(*(b[k] for k in keys)) if b else "not run"

    rows = [
        ("floor: bare TLS health check /s", f"{s['floor']:.0f}", "", ""),
        ("sequential payments /s", f"{s['sequential']:.0f}", theirs("{:.0f}", "sequential"),
         f"{times(s['sequential'], b['sequential'])} starter, {s['sequential'] / ceiling:.1%} of floor/3" if b else
         f"{s['sequential'] / ceiling:.1%} of floor/3"),
        ("bare contract path /s (no Strife code)", f"{s['bare_path']:.0f}", "",
         f"sequential is {s['sequential'] / s['bare_path']:.0%} of it"
         + (f"; 5x starter would be {5 * b['sequential'] / s['bare_path']:.0%}" if b else "")),
        ("concurrent payments /s (16 threads)", f"{s['concurrent']:.0f}", theirs("{:.0f}", "concurrent"),
         f"{times(s['concurrent'], b['concurrent'])} starter" if b else ""),
        ("payment latency p50 / p99 ms", f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f}",
         theirs("{:.1f} / {:.1f}", "p50_ms", "p99_ms"), ""),
        ("replays /s (same key)", f"{s['replay']:.0f}", "", f"{times(s['replay'], s['sequential'])} sequential"),
        ("replays /s, 1k vs 100k keys", f"{s['replay_1k_keys']:.0f} / {s['replay_100k_keys']:.0f}", "",
         f"{s['replay_100k_keys'] / s['replay_1k_keys']:.0%}"),
        (f"gateway RSS MB before / after {s['rss_payments']:.0f} payments",
         f"{s['rss_before_mb']:.1f} / {s['rss_after_mb']:.1f}", "", f"+{s['rss_after_mb'] - s['rss_before_mb']:.1f} MB"),
    ]
    rows.append((f"outbox drain /s ({s['drain_count']:.0f} queued offline)", f"{s['drain']:.0f}", "",
                 f"{s['drain'] / s['sequential']:.0%} of sequential; exactly once: {bool(s['drain_exactly_once'])}"))
    rows.append(("wallet start-up to login screen s", f"{s['wallet_startup_s']:.2f}", "", "headless"))
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'Strife':>14}  {'starter':>14}  note")
    for name, mine, other, note in rows:
        print(f"{name:<{width}}  {mine:>14}  {other:>14}  {note}")


if __name__ == "__main__":
    sys.exit(main())
