"""Prometheus metrics, what every server shares (CONTRACT §10): the `--metrics-port` option, a registry of the
server's own, gRPC requests by method and final status (counted by the logging interceptor), and the HTTP
endpoint that serves `http://HOST:PORT/metrics`. The gateway's and a bank's own metrics extend `ServerMetrics`
(servers/gateway/metrics.py, servers/bank/metrics.py).

Events are counted by the servers' code as they happen (one call each); what a store or a link already knows
(holds at a bank, frames on a bank link) is read when Prometheus scrapes, so it costs the payment path nothing.
With metrics off (no `--metrics-port`, the default) each role uses its `…MetricsOff`, whose events do nothing:
nothing is counted and no port is opened.

Events run on the server's event loop; prometheus_client's metrics take a lock per update, so a scrape (on an
HTTP thread) reads whole values whatever thread counts.
"""
from __future__ import annotations

import argparse
import logging
from typing import Callable

import grpc
from prometheus_client import (CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics,
                               start_http_server)

from servers.serving import StartupError

log = logging.getLogger("strife.metrics")

# prometheus_client adds a `…_created` timestamp series beside every counter and histogram: Prometheus does not
# need them (it detects resets itself), and they double the page. A process-wide setting: each server is a
# process of its own.
disable_created_metrics()

# Seconds. gRPC calls and payments take ~1–10 ms here; the upper buckets catch deadlines (payments: 5 s).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The metrics HTTP endpoint listens on every interface, like the gRPC port: Prometheus scrapes from its own
# host. It shows counts and timings only: no user, account, key or amount of any one payment.
METRICS_HOST = "0.0.0.0"


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port number (1–65535), not {value!r}")
    return port


def add_metrics_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=_port, default=None, metavar="PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")


class ServerMetrics:
    """The gRPC request metrics every server has, in a registry of the server's own rather than
    prometheus_client's global one: the page shows what this server registered and nothing a library adds, and
    several servers' metrics can live in one process (tests). `serve` opens the HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory, open fds: read at scrape
        self._requests = Counter("strife_grpc_server_requests", "gRPC calls handled, by method and final status",
                                 ["method", "code"], registry=self.registry)
        self._durations = Histogram("strife_grpc_server_request_duration_seconds",
                                    "time from a gRPC call's arrival to its final status, by method", ["method"],
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        # A label lookup costs several µs (a lock, a tuple key), more than the update itself: the labelled
        # children are kept per (method, code). Only registered methods reach the interceptor: this stays small.
        self._children: dict[tuple[str, grpc.StatusCode], tuple[Callable[[], None], Callable[[float], None]]] = {}
        self._http: object | None = None

    def call_ended(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        children = self._children.get((method, code))
        if children is None:
            children = self._children[(method, code)] = (self._requests.labels(method, code.name).inc,
                                                         self._durations.labels(method).observe)
        children[0]()
        children[1](seconds)

    def serve(self, port: int) -> None:
        """Serve the registry at http://HOST:port/metrics from a daemon thread, a thread per scrape (scrapes are
        rare; in between the thread only wakes twice a second to see whether to stop). A port that cannot be had
        stops the server's start with one line."""
        try:
            self._http, _ = start_http_server(port, addr=METRICS_HOST, registry=self.registry)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on port {port}: {exc.strerror or exc}") from exc
        log.info("Prometheus metrics at http://%s:%d/metrics", METRICS_HOST, port)

    def close(self) -> None:
        if self._http is not None:  # shutdown() waits for the thread's next wake-up: at most half a second
            self._http.shutdown()  # type: ignore[attr-defined]
            self._http.server_close()  # type: ignore[attr-defined]
            self._http = None


class Off:
    """Mixed in first by a role's `…MetricsOff`: metrics are off, so the shared events do nothing (the role's
    class does the same for its own events) and nothing is served."""

    def __init__(self) -> None:
        pass  # no registry, no metric objects

    def call_ended(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        pass

    def serve(self, port: int) -> None:
        raise AssertionError("metrics are off: nothing to serve")

    def close(self) -> None:
        pass
