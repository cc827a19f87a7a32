"""The gateway's Prometheus metrics (CONTRACT §10), beside the gRPC request metrics every server has.

Counted as they happen (one call at each event): payments by outcome (one per decision, whoever decided it:
the request, or recovery — at start-up or by the completer — aborting what a dead gateway left undecided;
never per replay), replays, refusals of a key still in flight (ABORTED), the time from a payment's claim to
its reply, and how many payments the completer's last pass left unfinished (after each pass, every
`--completer-interval`: not a query of the store at scrape time, which a PostgreSQL store shared by replicas
would answer for all of them). Read when scraped: frames and messages on each bank link.
"""
from __future__ import annotations

import time
from typing import Iterator, Mapping

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from servers import metrics
from servers.gateway.banklink import BankLink

OUTCOMES = ("succeeded", "declined", "failed")


class _BankLinks(Collector):
    """Each link's running totals (banklink.LinkStats), read at scrape time: the payment path only adds to two
    ints it kept anyway."""

    def __init__(self, links: Mapping[str, BankLink]) -> None:
        self._links = links

    def collect(self) -> Iterator[CounterMetricFamily]:
        frames = CounterMetricFamily("strife_banklink_frames", "frames written on each bank's 2PC stream (the bank"
                                     " applies each in one transaction, one fsync)", labels=["bank"])
        messages = CounterMetricFamily("strife_banklink_messages", "2PC messages (Prepare, Commit, Abort) sent in"
                                       " those frames; messages per frame is the ratio of the two", labels=["bank"])
        for name, link in sorted(self._links.items()):
            frames.add_metric([name], link.stats.frames)
            messages.add_metric([name], link.stats.messages)
        yield frames
        yield messages


class GatewayMetrics(metrics.ServerMetrics):
    def __init__(self, bank_links: Mapping[str, BankLink]) -> None:
        super().__init__()
        registry = self.registry
        payments = Counter("strife_payments", "payments executed to a decision, by outcome (replays are not"
                           " counted)", ["outcome"], registry=registry)
        self._decided = {outcome: payments.labels(outcome).inc for outcome in OUTCOMES}
        self._replays = Counter("strife_payment_replays", "requests answered with a payment's stored response"
                                " (idempotent replays)", registry=registry).inc
        self._in_flight = Counter("strife_payment_in_flight_refusals", "requests refused with ABORTED: their key's"
                                  " payment was still being executed", registry=registry).inc
        self._duration = Histogram("strife_payment_duration_seconds", "time from a payment's claim (its key stored)"
                                   " to its reply: prepare, decision, delivery of the decision",
                                   buckets=metrics.LATENCY_BUCKETS, registry=registry).observe
        self._awaiting = Gauge("strife_payments_awaiting_completer", "unfinished payments the completer's last pass"
                               " could not finish (a bank is away); they wait for its next pass", registry=registry)
        registry.register(_BankLinks(bank_links))

    def decided(self, outcome: str) -> None:
        self._decided[outcome]()

    def replied(self, started: float) -> None:
        """A payment's reply is ready; `started` is time.perf_counter() when its claim was in."""
        self._duration(time.perf_counter() - started)

    def replayed(self) -> None:
        self._replays()

    def refused_in_flight(self) -> None:
        self._in_flight()

    def completer_pass(self, left: int) -> None:
        self._awaiting.set(left)


class GatewayMetricsOff(metrics.Off, GatewayMetrics):
    def decided(self, outcome: str) -> None:
        pass

    def replied(self, started: float) -> None:
        pass

    def replayed(self) -> None:
        pass

    def refused_in_flight(self) -> None:
        pass

    def completer_pass(self, left: int) -> None:
        pass


def start(port: int | None, bank_links: Mapping[str, BankLink]) -> GatewayMetrics:
    """The gateway's metrics, served on `port`; with no port, metrics are off."""
    if port is None:
        return GatewayMetricsOff()
    gateway = GatewayMetrics(bank_links)
    gateway.serve(port)
    return gateway
