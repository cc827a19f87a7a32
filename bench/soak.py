"""Load held: sustained concurrent payments against a real cluster, then a check that nothing leaked.

    python -m bench.soak [--seconds 60] [--threads 16] [--warmup 5] [--interval 1]

Starts two banks and a gateway (real processes, real TLS) in a temp sandbox, warms them up, then runs
`--threads` client threads paying each other small random amounts for `--seconds`. Every payment uses a fresh
idempotency key and is retried with that key until it gets a final answer, as a wallet would. Meanwhile the
gateway's and the banks' resident memory (VmRSS) and open file descriptors are sampled every `--interval`.

Printed at the end: throughput, outcome counts, latency percentiles, memory and descriptors over time, and
the verdicts: memory and descriptors flat (growth over the second half of the run within the thresholds),
money conserved (every ledger balance is exactly its opening balance plus the succeeded payments, and the sum
is unchanged), no hold and no unfinished payment left behind. Exits 1 if any verdict fails.

What "flat" allows, and why: each server keeps one SQLite connection per thread that used its store, and each
connection caches up to 2000 KiB of pages (SQLite's default). Those caches fill as the tables grow — a gateway's
RSS rises by ~25-30 MB over its first ~7000 payments, then stays flat (seen in 150 s runs) — and a late thread
adds a connection (2 fds). So memory may grow by the threshold plus that bounded cache headroom, SQLite's
descriptors must stay within two per thread, and every other descriptor must be flat. A leak grows without
bound; run longer (e.g. --seconds 180) to see the plateau and check memory with no headroom needed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from protofiles import payment_pb2 as pb
from tests.harness import OPENING, OPENING_TOTAL, USER_ACCOUNTS, Client, Cluster, make_certs, wait_until

ALL_ACCOUNTS = sorted(a for accounts in OPENING.values() for a in accounts)
SQLITE_CACHE_KB = 2000  # SQLite's default page cache per connection (PRAGMA cache_size = -2000)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.CANCELLED}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Threads for pid {pid}")


def fd_counts(pid: int) -> tuple[int, int]:
    """(all open fds, those of SQLite files). A SQLite connection holds the database and its WAL open (the
    -shm file is shared by the process), and the servers keep one connection per thread that used the store."""
    total = sqlite = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed between listdir and readlink
            continue
        total += 1
        sqlite += ".sqlite3" in target
    return total, sqlite


@dataclass
class Sample:
    t: float  # seconds since the measured run started
    rss_kb: dict[str, int]
    fds: dict[str, int]
    sqlite_fds: dict[str, int] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)

    @property
    def other_fds(self) -> dict[str, int]:
        """Sockets, pipes, logs, lock files: everything but SQLite's per-thread connections."""
        return {p: n - self.sqlite_fds.get(p, 0) for p, n in self.fds.items()}


@dataclass
class SoakResult:
    seconds: float
    threads: int
    latencies_ms: list[float] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=lambda: {"succeeded": 0, "declined": 0, "failed": 0})
    retries: int = 0
    errors: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    moved: dict[str, int] = field(default_factory=lambda: {a: 0 for a in ALL_ACCOUNTS})
    final_accounts: dict[str, tuple[int, int]] = field(default_factory=dict)
    unfinished: int = -1
    rss_growth_limit_kb: int = 16 * 1024
    fd_growth_limit: int = 4

    # ---- figures ----
    @property
    def payments(self) -> int:
        return sum(self.outcomes.values())

    @property
    def rate(self) -> float:
        return self.payments / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")

    def growth(self, series: str, name: str) -> float:
        """Second-half growth: median of the last quarter of samples minus median of the second quarter."""
        values = [getattr(s, series)[name] for s in self.samples]
        if len(values) < 4:
            return 0.0
        n = len(values)
        return statistics.median(values[3 * n // 4:]) - statistics.median(values[n // 4:n // 2])

    # ---- verdicts ----
    def cache_headroom_kb(self, name: str) -> int:
        """What SQLite's page caches may still legitimately add: each connection caches up to 2000 KiB (the
        default cache_size), and a server has one connection per thread that used its store. Measured: a
        gateway's RSS rises by ~25-30 MB over its first ~7000 payments as those caches fill, then is flat."""
        connections = max(0, (self.samples[-1].sqlite_fds[name] - 1) // 2)  # db + WAL each; one shared -shm
        return SQLITE_CACHE_KB * connections

    def memory_flat(self) -> bool:
        return all(self.growth("rss_kb", p) <= self.rss_growth_limit_kb + self.cache_headroom_kb(p)
                   for p in self.samples[0].rss_kb)

    def fds_flat(self) -> bool:
        """Non-SQLite descriptors flat over the second half; SQLite's bounded by one connection per thread.

        A server's thread pool may still recruit a thread late in a run (up to its maximum), and that thread
        opens its own SQLite connection (2 fds): bounded, not a leak. A leak of anything else (a socket, a
        file, a channel) shows as growth of the other descriptors; a leak of connections as more SQLite
        descriptors than two per thread (+1 for the shared -shm file).
        """
        others_flat = all(self.growth("other_fds", p) <= self.fd_growth_limit for p in self.samples[0].fds)
        bounded = all(s.sqlite_fds[p] <= 2 * s.threads[p] + 1 for s in self.samples for p in s.fds)
        return others_flat and bounded

    def money_conserved(self) -> bool:
        opening = {a: int(round(v * 100)) for accounts in OPENING.values() for a, v in accounts.items()}
        expected = {a: opening[a] + self.moved[a] for a in ALL_ACCOUNTS}
        balances = {a: b for a, (b, _) in self.final_accounts.items()}
        return balances == expected and sum(balances.values()) == OPENING_TOTAL

    def nothing_left_behind(self) -> bool:
        return all(h == 0 for _, h in self.final_accounts.values()) and self.unfinished == 0

    def ok(self) -> bool:
        return (not self.errors and self.payments > 0 and self.memory_flat() and self.fds_flat()
                and self.money_conserved() and self.nothing_left_behind())

    def summary(self) -> dict[str, object]:
        procs = list(self.samples[0].rss_kb) if self.samples else []
        return {
            "seconds": round(self.seconds, 1), "threads": self.threads, "payments": self.payments,
            "per_second": round(self.rate, 1), **self.outcomes, "retries": self.retries, "errors": len(self.errors),
            "p50_ms": round(self.percentile(0.50), 1), "p90_ms": round(self.percentile(0.90), 1),
            "p99_ms": round(self.percentile(0.99), 1), "max_ms": round(max(self.latencies_ms, default=0), 1),
            "rss_mb": {p: [round(self.samples[0].rss_kb[p] / 1024, 1), round(self.samples[-1].rss_kb[p] / 1024, 1)]
                       for p in procs},
            "rss_growth_2nd_half_mb": {p: round(self.growth("rss_kb", p) / 1024, 2) for p in procs},
            "sqlite_cache_headroom_mb": {p: round(self.cache_headroom_kb(p) / 1024, 1) for p in procs},
            "fds": {p: [self.samples[0].fds[p], self.samples[-1].fds[p]] for p in procs},
            "fd_growth_2nd_half": {p: self.growth("fds", p) for p in procs},
            "non_sqlite_fd_growth_2nd_half": {p: self.growth("other_fds", p) for p in procs},
            "sqlite_fds": {p: [self.samples[0].sqlite_fds[p], self.samples[-1].sqlite_fds[p]] for p in procs},
            "server_threads": {p: [self.samples[0].threads[p], self.samples[-1].threads[p]] for p in procs},
            "memory_flat": self.memory_flat() if self.samples else False,
            "fds_flat": self.fds_flat() if self.samples else False,
            "money_conserved": self.money_conserved(), "nothing_left_behind": self.nothing_left_behind(),
        }


class Load:
    """`threads` wallets paying random small amounts to random other accounts until told to stop."""

    def __init__(self, cluster: Cluster, threads: int, result: SoakResult, seed: int = 0) -> None:
        self.cluster = cluster
        self.result = result
        self.stop = threading.Event()
        self.measuring = threading.Event()
        self._lock = threading.Lock()
        users = sorted(USER_ACCOUNTS)
        self._clients = [cluster.client(users[i % len(users)]) for i in range(threads)]
        self._threads = [threading.Thread(target=self._run, args=(c, random.Random(seed + i)), daemon=True,
                                          name=f"soak-{i}") for i, c in enumerate(self._clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self, timeout: float = 60) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout)
            if thread.is_alive():
                self.result.errors.append(f"{thread.name} did not stop")

    def _run(self, client: Client, rng: random.Random) -> None:
        while not self.stop.is_set():
            from_account = rng.choice(USER_ACCOUNTS[client.user])
            to_account = rng.choice([a for a in ALL_ACCOUNTS if a != from_account])
            paise = rng.randint(1, 100)  # ₹0.01 … ₹1.00: the run can go on for long without emptying anyone
            try:
                self._pay(client, f"soak-{uuid.uuid4()}", from_account, to_account, paise)
            except Exception as exc:  # noqa: BLE001 - reported as a failed verdict, never swallowed
                with self._lock:
                    self.result.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                self.stop.wait(0.1)

    def _pay(self, client: Client, key: str, from_account: str, to_account: str, paise: int) -> None:
        measured = self.measuring.is_set()
        start = time.perf_counter()
        retries = 0
        while True:
            try:
                response = client.pay(key, from_account, to_account, paise / 100, timeout=15)
                break
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or (self.stop.is_set() and retries > 50):
                    raise
                retries += 1
                self.stop.wait(0.02)
        elapsed_ms = (time.perf_counter() - start) * 1000
        status = pb.PaymentStatus.Name(response.status).removeprefix("PAYMENT_STATUS_").lower()
        with self._lock:
            if response.success:
                # Every succeeded payment counts for the conservation check, measured or not.
                self.result.moved[from_account] -= response.amount_paise
                self.result.moved[to_account] += response.amount_paise
            if measured:
                self.result.latencies_ms.append(elapsed_ms)
                self.result.outcomes[status] = self.result.outcomes.get(status, 0) + 1
                self.result.retries += retries


def sample(cluster: Cluster, started: float) -> Sample:
    pids = {name: proc.popen.pid for name, proc in cluster.procs.items()}
    fds = {n: fd_counts(p) for n, p in pids.items()}
    return Sample(time.monotonic() - started, {n: rss_kb(p) for n, p in pids.items()},
                  {n: total for n, (total, _) in fds.items()}, {n: sqlite for n, (_, sqlite) in fds.items()},
                  {n: thread_count(p) for n, p in pids.items()})


def run_soak(cluster: Cluster, seconds: float, threads: int, *, warmup: float = 5.0, interval: float = 1.0,
             log: bool = False) -> SoakResult:
    """Drive an already started cluster; the caller owns (and stops) the cluster."""
    result = SoakResult(seconds=0.0, threads=threads)
    load = Load(cluster, threads, result)
    load.start()
    try:
        load.stop.wait(warmup)  # connections, thread pools and caches fill up before anything is measured
        load.measuring.set()
        started = time.monotonic()
        result.samples.append(sample(cluster, started))
        while not load.stop.wait(interval):
            result.samples.append(sample(cluster, started))
            if log:
                s = result.samples[-1]
                print(f"  t={s.t:5.1f}s payments={result.payments:6d} "
                      + " ".join(f"{n}: {s.rss_kb[n] / 1024:.1f} MB {s.fds[n]} fds {s.threads[n]} thr"
                                 for n in s.rss_kb), flush=True)
            if result.samples[-1].t >= seconds:
                break
        load.measuring.clear()
        result.seconds = time.monotonic() - started
    finally:
        load.join()
    for name, proc in cluster.procs.items():
        if not proc.alive:
            result.errors.append(f"{name} died during the run")
    wait_until(lambda: cluster.holds() == 0 and cluster.unfinished_payments() == 0, 30,
               message="every payment finished and every hold released")
    result.final_accounts = cluster.accounts()
    result.unfinished = cluster.unfinished_payments()
    return result


def report(result: SoakResult) -> str:
    s = result.summary()
    lines = [
        f"soak: {s['seconds']} s, {s['threads']} threads, {s['payments']} payments ({s['per_second']}/s):"
        f" {s['succeeded']} succeeded, {s['declined']} declined, {s['failed']} failed;"
        f" {s['retries']} retries, {s['errors']} errors",
        f"latency ms: p50 {s['p50_ms']}  p90 {s['p90_ms']}  p99 {s['p99_ms']}  max {s['max_ms']}",
    ]
    for proc in s["rss_mb"]:  # type: ignore[union-attr]
        last = result.samples[-1]
        lines.append(f"{proc:8s} RSS {s['rss_mb'][proc][0]} → {s['rss_mb'][proc][1]} MB"  # type: ignore[index]
                     f" (2nd-half growth {result.growth('rss_kb', proc) / 1024:.2f} MB; allowed"
                     f" {result.rss_growth_limit_kb / 1024:g} + SQLite cache"
                     f" {result.cache_headroom_kb(proc) / 1024:.1f}"
                     f" MB), fds {result.samples[0].fds[proc]} → {last.fds[proc]} (2nd-half growth"
                     f" {result.growth('fds', proc)}, non-SQLite {result.growth('other_fds', proc)};"
                     f" SQLite {last.sqlite_fds[proc]} for {last.threads[proc]} threads)")
    lines.append(f"memory flat: {s['memory_flat']}  fds flat: {s['fds_flat']}  money conserved:"
                 f" {s['money_conserved']}  nothing left behind: {s['nothing_left_behind']}")
    for error in result.errors[:10]:
        lines.append(f"error: {error}")
    lines.append(json.dumps(s, ensure_ascii=False))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured run length (s)")
    parser.add_argument("--threads", type=int, default=16, help="concurrent paying clients")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured load before the run (s)")
    parser.add_argument("--interval", type=float, default=1.0, help="memory/fd sampling interval (s)")
    parser.add_argument("--txn-timeout", type=float, default=5.0)
    parser.add_argument("--keep", action="store_true", help="keep the sandbox (logs, ledgers) afterwards")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="strife-soak-"))
    cluster = Cluster(root=root / "cluster", certs_dir=make_certs(root / "certs"), txn_timeout=args.txn_timeout)
    try:
        cluster.start()
        print(f"soak: cluster in {root}; warming up {args.warmup:g} s, then {args.seconds:g} s with"
              f" {args.threads} threads", flush=True)
        result = run_soak(cluster, args.seconds, args.threads, warmup=args.warmup, interval=args.interval, log=True)
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(report(result))
    return 0 if result.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
