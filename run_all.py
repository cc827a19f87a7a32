"""Start Strife: certificates if missing, every bank of banks.json, the gateway, then the wallet.

    python run_all.py                  # servers in the background, the wallet in the foreground
    python run_all.py --servers-only   # servers only, until Ctrl+C / SIGTERM
    python run_all.py --gateways 3 --store postgresql://postgres@127.0.0.1/strife   # three gateway replicas

With `--gateways N` (CONTRACT §9), N gateway replicas share one PostgreSQL store and listen on consecutive
ports from --gateway-port; the wallet is given all of them.

Every server serves Prometheus metrics: the gateway at http://localhost:9460/metrics, the banks from port 9470
up in name order (`--metrics-base-port`, `--no-metrics`); where they are is printed with --servers-only and
always written to run_all's log.
Server logs go to <data-dir>/logs/<name>.log, never over the wallet's screen. Quitting the wallet (or
Ctrl+C / SIGTERM) stops every server this script started. A server that exits on its own meanwhile is
restarted with backoff, and given up on if it keeps exiting (servers/supervisor.py); run_all's own log of
that is <data-dir>/logs/run_all.log (and its output too, with --servers-only).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers import certs
from servers.config import ConfigError, load_banks
from servers.gateway.store.spec import SQLITE, store_argument, store_or_environment
from servers.gateway.store.url import mask_url
from servers.supervisor import RESTART_HELP, Supervisor, add_restart_arguments, open_log, restart_policy

HERE = Path(__file__).resolve().parent
# Prometheus metrics ports: the gateway at the base, the banks from base + 10 (room for gateway replicas).
# 9460–9479: clear of Prometheus itself (9090), its usual exporters (91xx) and this machine's other services.
METRICS_BASE_PORT = 9460
BANK_METRICS_OFFSET = 10
MAX_REPLICAS = BANK_METRICS_OFFSET  # one metrics port each below the banks'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Start the Strife banks, gateway and wallet.",
                                     epilog=RESTART_HELP)
    parser.add_argument("--config-dir", type=Path, default=Path("config"))
    parser.add_argument("--certs-dir", type=Path, default=Path("certificates"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--gateway-port", type=int, default=50053,
                        help="the gateway's port; replicas take the ports after it (default 50053)")
    parser.add_argument("--gateways", type=_replicas, default=1, metavar="N",
                        help="gateway replicas to start on consecutive ports (default 1; N > 1 needs a"
                             " PostgreSQL --store)")
    parser.add_argument("--store", type=store_argument, default=None, metavar="sqlite|postgresql://USER@HOST[:PORT]/DB",
                        help="the gateway's store (default $STRIFE_STORE, else sqlite: a file in --data-dir)")
    parser.add_argument("--txn-timeout", type=float, default=None, help="passed to the gateway")
    parser.add_argument("--poll-interval", type=float, default=None, help="passed to the wallet")
    parser.add_argument("--servers-only", action="store_true", help="run the servers until Ctrl+C / SIGTERM")
    parser.add_argument("--startup-timeout", type=float, default=30.0)
    parser.add_argument("--metrics-base-port", type=int, default=METRICS_BASE_PORT, metavar="PORT",
                        help=f"Prometheus metrics: the gateway's at PORT, the banks' from PORT+{BANK_METRICS_OFFSET}"
                             f" in name order (default {METRICS_BASE_PORT})")
    parser.add_argument("--no-metrics", action="store_true", help="start the servers without metrics")
    add_restart_arguments(parser)
    args = parser.parse_args(argv)
    args.store = store_or_environment(args.store, parser)
    if args.gateways > 1 and args.store == SQLITE:
        parser.error(f"--gateways {args.gateways}: replicas share a PostgreSQL store; add --store"
                     " postgresql://USER@HOST[:PORT]/DB (see docs/operations.md)")
    if not 1 <= args.gateway_port <= 65536 - args.gateways:
        parser.error(f"--gateway-port {args.gateway_port} with --gateways {args.gateways}: ports out of range")
    return args


def _replicas(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_REPLICAS:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_REPLICAS}, not {value!r}")
    return number


def gateway_ports(args: argparse.Namespace) -> list[int]:
    return [args.gateway_port + i for i in range(args.gateways)]


def gateway_name(i: int) -> str:
    return "gateway" if i == 0 else f"gateway {i + 1}"


def _find_prctl() -> Callable[..., int] | None:
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - not Linux: Ctrl+C / SIGTERM still stop them
        return None


# Looked up here, not in the child: a restart forks while other threads run, and a child of a threaded
# process must not import or load a library before exec (a lock held by another thread stays held in it).
_PRCTL = _find_prctl()


def _die_with_parent() -> None:
    """In the child: get SIGTERM if run_all itself dies (even by SIGKILL), so no server is left orphaned."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)


class Server:
    def __init__(self, name: str, args: list[str], log_path: Path, metrics_port: int | None = None) -> None:
        self.name = name
        self.args = [*args, "--metrics-port", str(metrics_port)] if metrics_port else args
        self.metrics_port = metrics_port
        self.log_path = log_path
        self.health_check: Callable[[], bool] | None = None  # set once its address and credentials are known
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.start()

    def start(self) -> None:
        """Start (or, for the supervisor, start again) the process; its output is appended to its log."""
        with open(self.log_path, "ab") as log:
            self.log_start = log.tell()  # what this run writes starts here: earlier runs' lines are not its story
            # A session of its own: Ctrl+C typed in the wallet must not reach the servers; we stop them.
            self.proc = subprocess.Popen([sys.executable, "-m", *self.args], cwd=HERE, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def last_lines(self, n: int = 5) -> str:
        """The last lines this process (since its latest start) wrote to its log."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_start)
                return "\n".join(log.read().decode(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def healthy(address: str, credentials: grpc.ChannelCredentials) -> bool:
    with grpc.secure_channel(address, credentials) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_healthy(servers: list[tuple[Server, str]], credentials: grpc.ChannelCredentials, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(servers)
    while waiting:
        for server, address in list(waiting):
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited with code {server.proc.returncode}:\n"
                                   f"{server.last_lines()}\n(full log: {server.log_path})")
            if healthy(address, credentials):
                waiting.remove((server, address))
        if waiting and time.monotonic() > deadline:
            names = ", ".join(s.name for s, _ in waiting)
            raise RuntimeError(f"{names} did not become healthy within {timeout:g} s (logs in {server.log_path.parent})")
        if waiting:
            time.sleep(0.1)


def metrics_ports(args: argparse.Namespace, banks: list[str]) -> dict[str, int]:
    """Each server's metrics port by its name ("gateway", "bank SBI"); empty with --no-metrics."""
    if args.no_metrics:
        return {}
    base = args.metrics_base_port
    ports = {gateway_name(i): base + i for i in range(args.gateways)}
    for i, bank in enumerate(sorted(banks)):
        ports[f"bank {bank}"] = base + BANK_METRICS_OFFSET + i
    if not all(1 <= port <= 65535 for port in ports.values()):
        raise RuntimeError(f"--metrics-base-port {args.metrics_base_port}: the servers' metrics ports would run"
                           f" from {min(ports.values())} to {max(ports.values())}, outside 1–65535")
    return ports


def metrics_where(servers: list[Server]) -> str:
    return "metrics: " + ", ".join(f"{s.name} http://localhost:{s.metrics_port}/metrics" for s in servers
                                   if s.metrics_port)


def start_servers(args: argparse.Namespace) -> list[Server]:
    banks = load_banks(args.config_dir)
    metrics = metrics_ports(args, list(banks))
    if certs.ensure(args.certs_dir, sorted(banks)):
        print(f"created certificates in {args.certs_dir}")
    # Certificates that exist but that peers would refuse (made before names were pinned, or mixed from two
    # runs) are reported, not replaced: a new CA would silently invalidate every ca.crt handed out to
    # wallets and bundles, and the CA key may be the operator's own.
    problem = certs.dir_problem(args.certs_dir, sorted(banks))
    if problem:
        raise RuntimeError(problem)
    common = ["--config-dir", str(args.config_dir.resolve()), "--certs-dir", str(args.certs_dir.resolve()),
              "--data-dir", str(args.data_dir.resolve())]
    logs = args.data_dir / "logs"
    started: list[Server] = []
    to_check: list[tuple[Server, str]] = []
    try:
        for bank, address in sorted(banks.items()):
            port = address.rsplit(":", 1)[1]
            server = Server(f"bank {bank}", ["servers.bank_server", "--bank", bank, "--port", port, *common],
                            logs / f"bank_{bank}.log", metrics.get(f"bank {bank}"))
            started.append(server)
            to_check.append((server, f"localhost:{port}"))
        options = ["--store", args.store] if args.store != SQLITE else []
        if args.txn_timeout is not None:
            options += ["--txn-timeout", str(args.txn_timeout)]
        # Replicas start at once: on an empty database the first to take the migration lock creates the
        # schema and the others wait for it (CONTRACT §9).
        for i, port in enumerate(gateway_ports(args)):
            name = gateway_name(i)
            gateway = Server(name, ["servers.gateway_server", "--port", str(port), *options, *common],
                             logs / f"{name.replace(' ', '_')}.log", metrics.get(name))
            started.append(gateway)
            to_check.append((gateway, f"localhost:{port}"))
        # Banks demand a client certificate even for health checks: check as the gateway does.
        credentials = grpc.ssl_channel_credentials(
            (args.certs_dir / "ca.crt").read_bytes(), (args.certs_dir / "gateway.key").read_bytes(),
            (args.certs_dir / "gateway.crt").read_bytes())
        wait_healthy(to_check, credentials, args.startup_timeout)
        for server, address in to_check:  # the supervisor checks a restarted server the same way
            server.health_check = functools.partial(healthy, address, credentials)
        for server in started:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited with code {server.proc.returncode}:\n"
                                   f"{server.last_lines()}\n(full log: {server.log_path})")
    except BaseException:
        stop_all(started)
        raise
    return started


def gateways_where(args: argparse.Namespace) -> str:
    ports = gateway_ports(args)
    if args.gateways == 1:
        where = f"the gateway on localhost:{ports[0]}"
    else:
        where = f"{args.gateways} gateway replicas on localhost:{ports[0]}–{ports[-1]}"
    return where + ("" if args.store == SQLITE else f", store {mask_url(args.store)}")


def stop_all(servers: list[Server]) -> None:
    for server in reversed(servers):  # the gateway first, so no payment starts against a stopping bank
        server.stop()


def wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def run_wallet(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "wallet_tui", "--gateway", ",".join(f"localhost:{p}" for p in gateway_ports(args)),
               "--certs-dir", str(args.certs_dir), "--data-dir", str(args.data_dir)]
    if args.poll_interval is not None:
        command += ["--poll-interval", str(args.poll_interval)]
    # The wallet owns the terminal; this process only waits, and ignores the Ctrl+C meant for the wallet.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    wallet = subprocess.Popen(command, cwd=Path.cwd())
    # SIGTERM, or the terminal going away (SIGHUP): end the wallet, then (finally, in main) the servers.
    terminate = signal.signal(signal.SIGTERM, lambda *_: wallet.terminate())
    hangup = signal.signal(signal.SIGHUP, lambda *_: wallet.terminate())
    try:
        return wallet.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, terminate)
        signal.signal(signal.SIGHUP, hangup)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wallet_available = importlib.util.find_spec("wallet_tui") is not None
    if not args.servers_only and not wallet_available:
        print("run_all: the wallet is not installed in this checkout; use --servers-only", file=sys.stderr)
        return 2
    try:
        servers = start_servers(args)
    except (ConfigError, RuntimeError, OSError) as exc:
        print(f"run_all: cannot start: {exc}", file=sys.stderr)
        return 1
    # Never on the wallet's screen: with the wallet in the foreground, only in the file.
    log = open_log(args.data_dir / "logs" / "run_all.log", sys.stdout if args.servers_only else None)
    log.info("started %s", ", ".join(f"{s.name} (pid {s.proc.pid})" for s in servers))
    if not args.no_metrics:
        log.info("%s", metrics_where(servers))
    supervisor = Supervisor(servers, restart_policy(args), log, health_timeout=args.startup_timeout)
    supervisor.start()
    code = 0
    try:
        if args.servers_only:
            print(f"Strife is running: {len(servers) - args.gateways} banks and {gateways_where(args)}"
                  f" (logs in {args.data_dir / 'logs'}). Ctrl+C stops everything.", flush=True)
            wait_for_signal()
        else:
            code = run_wallet(args)
    finally:
        supervisor.halt()  # first: no restart after this, so stop_all reaches every server ever started
        log.info("stopping all servers")
        stop_all(servers)
        supervisor.join()
        print("run_all: all servers stopped", flush=True)
    if supervisor.given_up:
        if not args.servers_only:  # the wallet's screen is gone: now say what was only in the log
            for line in supervisor.given_up:
                print(f"run_all: {line}", file=sys.stderr)
        return code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
