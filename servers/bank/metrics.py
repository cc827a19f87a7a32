"""A bank's Prometheus metrics (CONTRACT §10), beside the gRPC request metrics every server has.

Counted as they happen: Prepare, Commit and Abort by result — on every path (unary calls, the `Exchange`
stream, the gateway's frames) — and the duration of each ledger COMMIT (the fsync a frame's answers wait for).
Read when scraped, from the ledger: the holds outstanding (prepared debits not yet committed or aborted).
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from servers import metrics
from servers.bank.ledger import Ledger, Outcome, Vote

KINDS = ("prepare", "commit", "abort")
# Seconds. A WAL commit with fsync takes ~0.2–2 ms on this machine's disk; slow disks show up in the tail.
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class _Holds(Collector):
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def collect(self) -> Iterator[GaugeMetricFamily]:
        count, paise = self._ledger.holds()
        yield GaugeMetricFamily("strife_bank_holds", "holds outstanding: debits prepared here and not yet"
                                " committed or aborted", value=count)
        yield GaugeMetricFamily("strife_bank_held_paise", "money on hold in those debits, in paise", value=paise)


class BankMetrics(metrics.ServerMetrics):
    def __init__(self, ledger: Ledger) -> None:
        super().__init__()
        registry = self.registry
        # A Prepare's result is its vote (yes / no); a Commit's or Abort's is ok or refused (e.g. Commit of an
        # aborted transaction); error: the message was malformed or the ledger failed, nothing was answered.
        by_kind = {kind: Counter(f"strife_bank_{kind}s", f"{kind.capitalize()} messages answered, by result",
                                 ["result"], registry=registry) for kind in KINDS}
        self._answered = {(kind, accepted): by_kind[kind].labels(label).inc for kind in KINDS
                          for accepted, label in ((True, "yes" if kind == "prepare" else "ok"),
                                                  (False, "no" if kind == "prepare" else "refused"))}
        self._errors = {kind: by_kind[kind].labels("error").inc for kind in KINDS}
        self._commit = Histogram("strife_bank_commit_duration_seconds", "time of each ledger COMMIT (the fsync"
                                 " that every answer in its transaction waits for)", buckets=COMMIT_BUCKETS,
                                 registry=registry).observe
        registry.register(_Holds(ledger))

    def answered(self, kind: str, result: Vote | Outcome) -> None:
        self._answered[kind, result.yes if isinstance(result, Vote) else result.ok]()

    def failed(self, kind: str) -> None:
        self._errors[kind]()

    def committed(self, seconds: float) -> None:
        self._commit(seconds)


class BankMetricsOff(metrics.Off, BankMetrics):
    def answered(self, kind: str, result: Vote | Outcome) -> None:
        pass

    def failed(self, kind: str) -> None:
        pass

    def committed(self, seconds: float) -> None:
        pass


def start(port: int | None, ledger: Ledger) -> BankMetrics:
    """The bank's metrics, served on `port`; with no port, metrics are off."""
    if port is None:
        return BankMetricsOff()
    bank = BankMetrics(ledger)
    bank.serve(port)
    return bank
