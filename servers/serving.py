"""What every Strife server shares: TLS material, binding a port, the health service, signals, start-up errors."""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable, NoReturn, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from servers import certs
from servers.logfmt import escape

log = logging.getLogger("strife")


class StartupError(Exception):
    """A server cannot start; the message is the one line the user sees."""


def read_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise StartupError(f"missing {what} {path} (run `python -m servers.certs` to create certificates)") from exc
    except OSError as exc:
        raise StartupError(f"cannot read {what} {path}: {exc.strerror}") from exc


def server_credentials(certs_dir: Path, name: str, *, require_client_auth: bool) -> grpc.ServerCredentials:
    """The server's own key and certificate; `name` is its role (`gateway` or a bank), which peers pin.

    A certificate that does not carry that name (e.g. one made before names were pinned) would fail every
    peer's handshake with an obscure error: refuse to start instead, with one line saying what to do."""
    key = read_file(certs_dir / f"{name}.key", "private key")
    cert = read_file(certs_dir / f"{name}.crt", "certificate")
    ca = read_file(certs_dir / "ca.crt", "CA certificate")
    problem = certs.identity_problem(certs_dir / f"{name}.crt", cert, ca, name)
    if problem:
        raise StartupError(problem)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=require_client_auth)


def client_credentials(certs_dir: Path, name: str | None = None) -> grpc.ChannelCredentials:
    """TLS verifying peers with `ca.crt`; with `name`, also present that certificate (mutual TLS)."""
    ca = read_file(certs_dir / "ca.crt", "CA certificate")
    if name is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(root_certificates=ca,
                                        private_key=read_file(certs_dir / f"{name}.key", "private key"),
                                        certificate_chain=read_file(certs_dir / f"{name}.crt", "certificate"))


# How often a long-lived channel pings its peer, and how long it waits for the answer: a connection that died
# silently (a lost route or NAT entry: no FIN, no RST, writes still "succeed") is given up within about
# KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS, and every call on it fails as UNAVAILABLE instead of waiting on it
# until TCP gives up (many minutes). A ping is a few bytes every two seconds per bank.
KEEPALIVE_TIME_MS = 2000
KEEPALIVE_TIMEOUT_MS = 2000

# Channel options for long-lived channels: reconnect quickly after a peer restarts instead of backing off for
# up to two minutes (gRPC's default), so a bank that comes back is used again within a second; and keepalive.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # gRPC 1.85 waits for a keepalive ping's answer for ping_timeout_ms (a minute by default), whatever
    # keepalive_timeout_ms says (seen in its http_keepalive trace): set both.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),  # an idle link is checked too, before a payment needs it
    ("grpc.http2.max_pings_without_data", 0),    # else pings stop after two while the 2PC stream is quiet
]

# For a server whose clients keep their channels alive with pings (a bank: the gateway's link, CHANNEL_OPTIONS;
# the gateway: wallets, every few seconds). By default a server accepts a ping without data only every five
# minutes, and answers more with GOAWAY "too_many_pings", dropping the connection and every call on it.
KEEPALIVE_SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
]


def pinned(peer_name: str, options: Sequence[tuple[str, int | str]] = CHANNEL_OPTIONS
           ) -> list[tuple[str, int | str]]:
    """Channel options that verify the server as `peer_name` (its role's DNS name in its certificate), not as
    the host dialled: any CA-signed certificate is valid for `localhost`, only the right peer's names it."""
    return [*options, ("grpc.ssl_target_name_override", peer_name)]


def make_server(interceptors: Sequence[grpc.aio.ServerInterceptor],
                options: Sequence[tuple[str, int]] = ()) -> grpc.aio.Server:
    # An asyncio server: one event loop serves every call, with no thread hand-off per call.
    # Without so_reuseport=0, a second server on the same port starts silently and shares it.
    return grpc.aio.server(interceptors=list(interceptors), options=[("grpc.so_reuseport", 0), *options])


def _check_port_free(host: str, port: int) -> None:
    """Fail with one clear line before gRPC tries (and logs its own multi-line error)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StartupError(f"cannot listen on port {port}: {exc.strerror or exc}") from exc


def bind(server: grpc.aio.Server, port: int, credentials: grpc.ServerCredentials, *, host: str = "0.0.0.0") -> int:
    _check_port_free(host, port)
    try:
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on port {port}: it is already in use or not allowed") from exc
    if not bound:
        raise StartupError(f"cannot listen on port {port}: it is already in use or not allowed")
    return bound


async def add_health(server: grpc.aio.Server) -> health.aio.HealthServicer:
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


async def run_until_signalled(server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, *,
                              grace: float, on_stop: Callable[[], Awaitable[None]] | None = None,
                              before_stop: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; then refuse new calls, let in-flight ones finish within `grace`, clean up.

    `before_stop` runs first: it lets long-lived streams end cleanly so they do not hold the grace period."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (log.info("received %s, shutting down", s.name), stop.set()))
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    if before_stop is not None:
        before_stop()
    await server.stop(grace)
    if on_stop is not None:
        await on_stop()
    log.info("stopped")


class _Formatter(logging.Formatter):
    """`asctime` as logging's default shows it, with the date-and-second part made once per second; a record's
    message never spans lines (a traceback, added after it, still does)."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
        return f"{self._stamp},{int(record.msecs):03d}"

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        # The call lines quote every value themselves (logfmt); this guards every other line, whose arguments
        # may carry a caller's or a bank's text (an error's details): a line break there would start a line
        # that looks like a log line of its own.
        line = super().formatMessage(record)
        return line if line.isprintable() else escape(line)


class LoopBufferedHandler(logging.StreamHandler):
    """Lines logged on the event loop's thread are written together once per loop turn, in one write: a call
    line costs the server no system call of its own. A line logged elsewhere (another thread, no loop) flushes
    at once. At worst a `kill -9` loses the lines of the loop turn it interrupted; state never lives here."""

    def __init__(self, stream: object) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._owner: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self.lock:  # type: ignore[union-attr]
            self._lines.append(line)
            if loop is not None and self._owner is None:
                self._owner = loop
                loop.call_soon(self.flush)
                return
            if loop is not None and self._owner is loop:
                return
        self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._owner = None
            if not self._lines:
                return
            text, self._lines = "\n".join(self._lines) + "\n", []
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # the log's pipe or file is gone: the server goes on regardless
                pass


def configure_logging(name: str) -> None:
    handler = LoopBufferedHandler(sys.stderr)
    handler.setFormatter(_Formatter(f"%(asctime)s {name} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def exit_on_startup_error(name: str, exc: Exception) -> NoReturn:
    print(f"{name}: cannot start: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)
