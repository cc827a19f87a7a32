"""The PostgreSQL store and gateway replicas, measured beside the SQLite store (CONTRACT §9).

    python -m bench.replicas --store postgresql://USER@HOST:PORT/DB [--rounds 5] [--seconds 5]
                             [--replicas 1,2,3] [--soak-payments 20000] [--quick]

(`python -m bench.run --store URL` runs this after its SQLite table.) URL is an admin URL of a server: every
cluster gets a fresh database of its own, dropped afterwards; a password in it is never printed.

On a shared 2-core machine a rate swings ±25 % from minute to minute, so the configurations are interleaved:
each round starts, one after the other in an order that rotates from round to round, a cluster on SQLite and
one on PostgreSQL per replica count (two banks and N gateways on one fresh database), and measures each for
`--seconds` per measure — sequential payments (one client thread), concurrent payments (16 client threads)
and replays of one key (one thread), every client spreading its calls round robin over the replicas — with
the CPU time each process used (/proc: the client, the gateways, each bank, and the PostgreSQL backends
serving that database). The gateways run their completer at its default interval. Money is checked
conserved on every cluster, and whatever the gateways logged as an ERROR or a lost store session is shown. A target is judged by the median of
the rounds' ratios (two measurements a minute apart), shown with their range.

Then the soak: `--soak-payments` payments by 16 threads through 2 replicas on PostgreSQL, sampling every
`--sample-every` seconds PostgreSQL's sessions per replica and each gateway's RSS. Then what one commit and
one round trip cost on each store (bench/pg_why.py), and from the measured CPU per payment, a paper estimate
of what N replicas on N machines would carry (bench/replicas_report.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from bench import pg_why, replicas_report
from bench.pg_observe import (CpuMeter, PgAdmin, backend_pids, bench_database, connections_by_replica, database_of,
                              probe, server_port)
from bench.calls import drive, payment_caller, replay_one_key
from bench.process_stats import rss_mb
from protofiles import payment_pb2_grpc as pbg
from tests.harness import OPENING_TOTAL, Client, Cluster, free_port, make_certs, wait_until

THREADS = 16
SOAK_REPLICAS = 2
COMPLETER_INTERVAL = 1.0
IDLE_SECONDS = 10.0  # CPU times tick in 10 ms: a long window to see a few ms per second
POSTGRES_OPTIONS = ("rounds", "seconds", "replicas", "soak_payments", "sample_every")


@dataclass
class Setup:
    """A running cluster: two banks and `len(gateways)` gateway replicas on one store."""
    cluster: Cluster
    gateways: list[str]                       # process names in cluster.procs
    clients: list[Client] = field(default_factory=list)  # one per replica, all with one token

    def pids(self) -> dict[str, int]:
        return {name: self.cluster.procs[name].popen.pid for name in self.gateways}


def start_setup(root: Path, certs: Path, store: str, replicas: int) -> Setup:
    # The completer at its default interval (the test harness polls 5× as often): each replica's passes are
    # background load on the store, and N replicas make N times as many.
    cluster = Cluster(root=root, certs_dir=certs, txn_timeout=5.0, store=store,
                      gateway_args=["--completer-interval", str(COMPLETER_INTERVAL)])
    setup = Setup(cluster, ["gateway"])
    try:
        cluster.start()
        ports = [cluster.gateway_port]
        for i in range(2, replicas + 1):
            name, port = f"gateway{i}", free_port()
            cluster.procs[name] = cluster.gateway_proc(port=port, name=name).start()
            setup.gateways.append(name)
            ports.append(port)
        for name, port in zip(setup.gateways, ports):
            cluster.wait_gateway(port=port, name=name)
        first = cluster.client("alice")  # one login: a token from one replica is valid on every replica
        setup.clients = [first] + [Client(pbg.PaymentGatewayStub(cluster.channel(f"localhost:{port}")), "alice",
                                          first.token) for port in ports[1:]]
    except BaseException:
        cluster.stop()
        raise
    return setup


def spread(setup: Setup, make: Callable[[Client], Callable[[int, int], None]]) -> Callable[[int, int], None]:
    """Call i of client thread w goes to replica (w + i) mod N: every thread uses every replica in turn."""
    calls = [make(client) for client in setup.clients]
    return lambda w, i: calls[(w + i) % len(calls)](w, i)


def gateway_trouble(setup: Setup) -> list[str]:
    """What the gateways' own logs say went wrong: every lost store session (the replica refuses payments
    until it is back), and how many ERROR lines each logged, with the first of them."""
    found = []
    for name in setup.gateways:
        lines = setup.cluster.procs[name].log().splitlines()
        found += [f"{name}: {line.strip()}" for line in lines if "lost the store session" in line]
        errors = [line.strip() for line in lines if " ERROR " in line]
        if errors:
            found.append(f"{name}: {len(errors)} ERROR line(s) in its log, the first: {errors[0]}")
    return found


def check_conserved(cluster: Cluster) -> None:
    wait_until(lambda: cluster.unfinished_payments() == 0, 60, 0.1, "every payment finished")
    if cluster.total() != OPENING_TOTAL or cluster.holds() != 0:
        raise RuntimeError(f"money not conserved in {cluster.root}: total {cluster.total()} paise (opening "
                           f"{OPENING_TOTAL}), holds {cluster.holds()}")


def meter_for(setup: Setup, admin: PgAdmin | None) -> CpuMeter:
    procs = setup.cluster.procs
    roles = {"client": [os.getpid()], "gateways": list(setup.pids().values()),
             "SBI": [procs["SBI"].popen.pid], "HDFC": [procs["HDFC"].popen.pid]}
    if admin is None:
        return CpuMeter(roles)
    return CpuMeter(roles, admin, database_of(setup.cluster.store))


def measure_setup(setup: Setup, meter: CpuMeter, seconds: float) -> dict[str, Any]:
    """Sequential, concurrent and replay windows on a running setup, each with its CPU per payment by role."""
    for client in setup.clients:  # warm every replica: its channel, its pool, its statement caches
        for i in range(3):
            payment_caller(client.stub, client.token, f"warm-{id(client)}")(0, i)
    key = "replayed-key"
    setup.clients[0].pay(key, "SBI-1001", "HDFC-2001", 0.01)
    windows = {"sequential": (spread(setup, lambda c: payment_caller(c.stub, c.token, "seq")), 1),
               "concurrent": (spread(setup, lambda c: payment_caller(c.stub, c.token, "conc")), THREADS),
               "replay": (spread(setup, lambda c: replay_one_key(c.stub, c.token, key)), 1)}
    out: dict[str, Any] = {"cpu_ms": {}, "cpu_busy": {}, "machine_busy": {}}
    for measure_name, (call, threads) in windows.items():
        before = meter.read()
        result = drive(call, threads, seconds=seconds)
        if result["errors"]:
            out.setdefault("errors", {})[measure_name] = result["errors"]
        used = CpuMeter.used(before, meter.read())
        machine = used.pop("machine")
        capacity = result["seconds"] * (os.cpu_count() or 1)
        out[measure_name] = result["rate"]
        out[f"{measure_name}_p50_ms"], out[f"{measure_name}_p99_ms"] = result["p50_ms"], result["p99_ms"]
        out["cpu_ms"][measure_name] = {role: s * 1000 / result["count"] for role, s in used.items()}
        out["cpu_busy"][measure_name] = sum(used.values()) / capacity  # this cluster and its client
        out["machine_busy"][measure_name] = machine / capacity        # everything: also other people's work
    check_conserved(setup.cluster)
    out["gateway_trouble"] = gateway_trouble(setup)
    return out


def configurations(replica_counts: list[int]) -> list[tuple[str, int]]:
    return [("sqlite", 1)] + [(f"pg×{n}", n) for n in replica_counts]


def one_round(root: Path, certs: Path, admin: PgAdmin, replica_counts: list[int], seconds: float, turn: int
              ) -> dict[str, dict[str, Any]]:
    configs = configurations(replica_counts)
    order = configs[turn % len(configs):] + configs[:turn % len(configs)]  # each config leads once in a while
    results: dict[str, dict[str, Any]] = {}
    for label, replicas in order:
        with nullcontext("sqlite") if label == "sqlite" else bench_database(admin) as store:
            setup = start_setup(root / label.replace("×", "x"), certs, store, replicas)
            try:
                results[label] = measure_setup(setup, meter_for(setup, None if store == "sqlite" else admin), seconds)
            finally:
                setup.cluster.stop()
    return {label: results[label] for label, _ in configs}


def soak(root: Path, certs: Path, admin: PgAdmin, payments: int, every: float, idle_seconds: float
         ) -> dict[str, Any]:
    """`payments` payments by 16 threads through 2 replicas: PostgreSQL sessions per replica, gateways' RSS;
    before them, what each process spends with no payments at all (completer passes, liveness checks)."""
    with bench_database(admin) as url:
        setup = start_setup(root, certs, url, SOAK_REPLICAS)
        try:
            pids = setup.pids()
            samples: list[dict[str, Any]] = []
            done = threading.Event()

            def sample() -> None:
                sessions = connections_by_replica(admin, database_of(url), pids, server_port(url))
                samples.append({"t": time.monotonic(), "sessions": sessions,
                                "rss_mb": {n: rss_mb(p) for n, p in pids.items()}})

            def sampler() -> None:
                while not done.wait(every):
                    sample()

            for client in setup.clients:
                payment_caller(client.stub, client.token, f"warm-{id(client)}")(0, 0)
            meter = meter_for(setup, admin)
            before = meter.read()
            time.sleep(idle_seconds)  # the window measured: no payments
            idle_cpu = {role: s * 1000 / idle_seconds for role, s in CpuMeter.used(before, meter.read()).items()}
            sample()
            thread = threading.Thread(target=sampler, daemon=True)
            thread.start()
            try:
                result = drive(spread(setup, lambda c: payment_caller(c.stub, c.token, "soak")), THREADS,
                               calls=payments)
            finally:
                done.set()
                thread.join(30)
            sample()
            check_conserved(setup.cluster)
            trouble = gateway_trouble(setup)
        finally:
            setup.cluster.stop()
        per_payment = transactions_per_payment(admin, database_of(url), payments)
    start, idle, loaded = samples[0]["t"], samples[0], samples[1:]  # the last one: all payments answered
    return {"payments": result["count"], "rate": result["rate"], "p99_ms": result["p99_ms"],
            "errors": result["errors"], "gateway_trouble": trouble, "idle_cpu_ms_per_s": idle_cpu,
            "idle_seconds": idle_seconds,
            "samples": [{**s, "t": round(s["t"] - start, 2)} for s in samples],
            "sessions": {n: _trend(idle["sessions"][n], [s["sessions"][n] for s in loaded]) for n in pids},
            "other_sessions_max": max(s["sessions"]["other"] for s in samples),
            "rss_mb": {n: _trend(idle["rss_mb"][n], [s["rss_mb"][n] for s in loaded]) for n in pids},
            "per_payment": per_payment}


def transactions_per_payment(admin: PgAdmin, database: str, payments: int) -> dict[str, float]:
    """PostgreSQL's own counts for the database over a cluster's whole life, per payment: with every session
    gone its statistics are all in (a backend reports at most once a second while busy, and at its exit).
    A statement outside a transaction block is a transaction of its own, so this counts round trips that
    commit; the background (completer passes, liveness checks, start-up, the checks here) is included."""
    wait_until(lambda: not backend_pids(admin, database), 30, 0.1, "the cluster's PostgreSQL sessions to end")
    (commits, rollbacks, inserted, updated, deleted), = admin.fetch(
        "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database"
        " WHERE datname = $1", database)
    return {"transactions": (commits + rollbacks) / payments, "rows inserted": inserted / payments,
            "rows updated": updated / payments, "rows deleted": deleted / payments}


def _trend(before: float, values: list[float]) -> dict[str, float]:
    """Before the load (after one warm-up payment per replica), then its first, last and largest sample."""
    return {"before": before, "first": values[0], "last": values[-1], "max": max(values), "min": min(values)}


def add_arguments(parser: argparse.ArgumentParser, *, store_required: bool) -> None:
    parser.add_argument("--store", required=store_required, metavar="URL",
                        help="a PostgreSQL admin URL (postgresql://USER[:PASSWORD]@HOST[:PORT]/DB): each cluster gets"
                             " a fresh database there, dropped afterwards")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every configuration")
    parser.add_argument("--seconds", type=float, default=5.0, help="each measurement's window (s)")
    parser.add_argument("--replicas", default="1,2,3", help="gateway replica counts on PostgreSQL (comma-separated)")
    parser.add_argument("--soak-payments", type=int, default=20_000,
                        help="payments through 2 replicas while sessions and memory are sampled (0: no soak)")
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between soak samples")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad options before anything starts; --quick shrinks every part to a smoke test."""
    if args.store is None:
        given = [option for option in POSTGRES_OPTIONS if getattr(args, option) != parser.get_default(option)]
        if given:
            parser.error(f"--{given[0].replace('_', '-')} measures the PostgreSQL store: it needs --store URL")
        return
    if urlsplit(args.store).scheme not in ("postgresql", "postgres"):
        parser.error("--store takes a PostgreSQL admin URL (postgresql://USER@HOST:PORT/DB); the SQLite store is"
                     " always measured beside it")
    try:
        args.replica_counts = sorted({int(n) for n in args.replicas.split(",")})
    except ValueError:
        parser.error(f"--replicas {args.replicas!r}: give replica counts like 1,2,3")
    if not args.replica_counts or not 1 <= args.replica_counts[0] <= args.replica_counts[-1] <= 8:
        parser.error("--replicas: each count must be 1 to 8 (every replica holds up to 9 sessions)")
    if args.rounds < 1 or not args.seconds > 0 or not args.sample_every > 0:
        parser.error("--rounds must be ≥ 1, --seconds > 0, --sample-every > 0")
    if args.soak_payments < 0 or 0 < args.soak_payments < THREADS:
        parser.error(f"--soak-payments must be 0 (no soak) or at least {THREADS} (one per client thread)")
    if args.quick:
        args.rounds, args.seconds = 1, min(args.seconds, 1.5)
        args.soak_payments = min(args.soak_payments, 2000)
    problem = probe(args.store)
    if problem is not None:
        parser.error(f"--store: {problem}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every part, printed as it comes; the whole as a dict (the JSON line's "postgres")."""
    admin = PgAdmin(args.store)
    try:
        with tempfile.TemporaryDirectory(prefix="strife-bench-pg-") as tmp:
            certs = make_certs(Path(tmp) / "certs")
            rounds = []
            for i in range(args.rounds):
                rounds.append(one_round(Path(tmp) / f"round{i}", certs, admin, args.replica_counts, args.seconds, i))
                print(f"round {i + 1}/{args.rounds}: {replicas_report.round_line(rounds[-1])}", flush=True)
            soaked = soak(Path(tmp) / "soak", certs, admin, args.soak_payments, args.sample_every,
                          min(IDLE_SECONDS, args.seconds * 2)) if args.soak_payments else None
            with bench_database(admin) as url:
                why = pg_why.store_costs(url, Path(tmp) / "why", pg_why.QUICK if args.quick else pg_why.Counts())
    finally:
        admin.close()
    summary = replicas_report.summarise(rounds)
    replicas_report.print_report(summary, soaked, why, args.seconds, args.rounds)
    return {"summary": summary, "rounds": rounds, "soak": soaked, "why": why, "seconds": args.seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, store_required=True)
    parser.add_argument("--quick", action="store_true", help="one short round and a 2,000-payment soak")
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    print(json.dumps(run(args), sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
