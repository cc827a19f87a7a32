"""What Prometheus metrics cost the payment path: two clusters side by side, one without and one with
`--metrics-port`, paid through at the same time.

    python -m bench.metrics_cost [--rounds 8] [--seconds 6] [--scrape-interval 1]

On a shared machine a rate swings by ±25 % from minute to minute, far more than the few per cent looked for.
So each round starts two fresh clusters, metrics off and metrics on (every server with `--metrics-port`,
all three scraped over HTTP every `--scrape-interval` seconds: Prometheus' default is 15 s, so 1 s is the
pessimistic case; 0: never, the counting alone), and drives both at once for the same window of time:
whatever else the machine does weighs on both alike. Measured per cluster, over the same `--seconds`: the
sequential rate (one client thread each), the concurrent rate (16 client threads each, as `bench.run`), and
the servers' CPU time (user + system, from /proc) per concurrent payment. The clusters start in alternating
order. Reported: every round's on/off ratios, and per measure the median of the rounds' ratios with their
range. Money is checked conserved on every cluster.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from bench.calls import drive, payment_caller
from bench.process_stats import cpu_seconds
from tests.harness import OPENING_TOTAL, Cluster, make_certs, wait_until

CONCURRENT_THREADS = 16
MEASURES = ("sequential", "concurrent", "cpu_ms_per_payment")
MODES = ("off", "on")


def pay_until(call: Callable[[int, int], None], deadline: float, threads: int) -> int:
    """Call `call(worker, i)` from `threads` threads until `deadline` (time.monotonic()); how many calls."""
    return drive(call, threads, seconds=max(0.0, deadline - time.monotonic()))["count"]


class Scraper(threading.Thread):
    """GETs every server's /metrics every `interval` seconds until stopped (what Prometheus would do)."""

    def __init__(self, cluster: Cluster, interval: float) -> None:
        super().__init__(daemon=True)
        self.cluster, self.interval = cluster, interval
        self.stop = threading.Event()
        self.scrapes = 0

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            for name in self.cluster.metrics_ports:
                self.cluster.scrape(name)
                self.scrapes += 1


def one_round(root: Path, certs: Path, seconds: float, scrape_interval: float, on_first: bool
              ) -> dict[str, dict[str, float]]:
    clusters: dict[str, Cluster] = {}
    scraper: Scraper | None = None
    try:
        for mode in (("on", "off") if on_first else MODES):
            clusters[mode] = Cluster(root=root / mode, certs_dir=certs, txn_timeout=5.0,
                                     metrics=mode == "on").start()
        if scrape_interval:
            scraper = Scraper(clusters["on"], scrape_interval)
            scraper.start()
        clients = {mode: cluster.client("alice") for mode, cluster in clusters.items()}
        for mode, client in clients.items():
            payment_caller(client.stub, client.token, "warm")(0, 0)

        def both(tag: str, threads: int) -> dict[str, tuple[int, float]]:
            """Both clusters paid through at once until one deadline: (payments, servers' CPU s) each."""
            deadline = time.monotonic() + seconds
            pids = {mode: [p.popen.pid for p in cluster.procs.values()] for mode, cluster in clusters.items()}
            cpu = {mode: sum(map(cpu_seconds, pids[mode])) for mode in MODES}
            with ThreadPoolExecutor(len(MODES)) as pool:
                counts = dict(zip(MODES, pool.map(
                    lambda mode: pay_until(payment_caller(clients[mode].stub, clients[mode].token, tag), deadline,
                                           threads), MODES)))
            return {mode: (counts[mode], sum(map(cpu_seconds, pids[mode])) - cpu[mode]) for mode in MODES}

        sequential = both("seq", 1)
        concurrent = both("conc", CONCURRENT_THREADS)
        for mode, cluster in clusters.items():
            wait_until(lambda: cluster.unfinished_payments() == 0, 30, 0.1, "every payment finished")
            if cluster.total() != OPENING_TOTAL or cluster.holds() != 0:
                raise RuntimeError(f"money not conserved in {cluster.root}")
        if scraper is not None and scraper.scrapes == 0:
            raise RuntimeError("the metrics were never scraped: --scrape-interval is longer than the run")
        return {mode: {"sequential": sequential[mode][0] / seconds, "concurrent": concurrent[mode][0] / seconds,
                       "cpu_ms_per_payment": concurrent[mode][1] * 1000 / concurrent[mode][0]} for mode in MODES}
    finally:
        if scraper is not None:
            scraper.stop.set()
            scraper.join(10)
        for cluster in clusters.values():
            cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="rounds of two clusters side by side")
    parser.add_argument("--seconds", type=float, default=6.0, help="each measurement's window (s)")
    parser.add_argument("--scrape-interval", type=float, default=1.0,
                        help="seconds between scrapes with metrics on (0: no scrapes, the counting alone)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or not args.seconds > 0 or args.scrape_interval < 0:
        parser.error("--rounds must be ≥ 1, --seconds > 0, --scrape-interval ≥ 0")
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="strife-metrics-cost-") as tmp:
        certs = make_certs(Path(tmp) / "certs")
        for i in range(args.rounds):
            row = one_round(Path(tmp) / f"round{i}", certs, args.seconds, args.scrape_interval, on_first=i % 2 == 1)
            rounds.append(row)
            print(f"round {i + 1}/{args.rounds}: " + "; ".join(
                f"{m} off {row['off'][m]:.2f} / on {row['on'][m]:.2f} = {row['on'][m] / row['off'][m]:.3f}"
                for m in MEASURES), flush=True)
    ratios = {m: [r["on"][m] / r["off"][m] for r in rounds] for m in MEASURES}
    summary = {m: {"off": statistics.median(r["off"][m] for r in rounds),
                   "on": statistics.median(r["on"][m] for r in rounds),
                   "ratio": statistics.median(ratios[m]), "ratio_min": min(ratios[m]), "ratio_max": max(ratios[m])}
               for m in MEASURES}
    print(f"{args.rounds} rounds, side by side; ratio = median of the rounds' on/off ratios [min–max]:")
    for m in MEASURES:
        s = summary[m]
        print(f"  {m:<20} off {s['off']:9.2f}  on {s['on']:9.2f}  ratio {s['ratio']:.3f}"
              f" [{s['ratio_min']:.3f}–{s['ratio_max']:.3f}]")
    print(json.dumps({"summary": summary, "rounds": rounds, "seconds": args.seconds,
                      "scrape_interval": args.scrape_interval}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
