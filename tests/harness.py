"""Real Strife processes for tests: certificates in a temp dir, banks and a gateway on ephemeral loopback
ports, SQLite ledgers read straight from disk, and helpers to pay, kill and wait on conditions."""
from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protofiles import payment_pb2 as pb
from protofiles import payment_pb2_grpc as pbg
from servers import certs as certs_module
from tests.store_view import StoreView

REPO = Path(__file__).resolve().parent.parent
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw", "dave": "dave-pw"}
USER_ACCOUNTS = {"alice": ["SBI-1001", "HDFC-2002"], "bob": ["HDFC-2001"], "carol": ["SBI-1002", "HDFC-2003"],
                 "dave": ["SBI-1004"]}
OPENING = {"SBI": {"SBI-1001": 5000.0, "SBI-1002": 2500.0, "SBI-1003": 1000.0, "SBI-1004": 100.0},
           "HDFC": {"HDFC-2001": 3000.0, "HDFC-2002": 1500.0, "HDFC-2003": 500.0}}
_HASHES: dict[str, str] = {}


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (Linux; the IANA range elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


def _listen_candidates() -> range:
    """Ports outside the ephemeral range: a port there can only be taken by another listener. When the suite
    runs in several pytest-xdist workers, each draws from a block of its own: a port is checked free and handed
    out once per process, so two workers drawing from one pool could both hand out a port before either bound."""
    low, high = _ephemeral_range()
    if low - 10_000 >= 2_000:  # Linux default 32768-60999 -> 10000-32767
        ports = range(10_000, low)
    else:
        ports = range(max(high + 1, 2_000), 65_536)  # may be empty: free_port() then falls back to bind(0)
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and workers.isdigit() and int(workers) > 1:
        block = len(ports) // int(workers)
        start = ports.start + int(worker[2:]) * block
        ports = range(start, start + block)
    return ports


def _bindable(port: int) -> bool:
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no conflict
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue  # no IPv6 on this machine: nothing can hold the port there
            return False
    return True


def _any_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HANDED_OUT: set[int] = set()
_PORT_LOCK = threading.Lock()


def free_port() -> int:
    """A TCP port for a server a test starts a moment later.

    Not bind(0): that returns a port from the kernel's ephemeral range, and in the moment between closing the
    probe and the server's bind, any outgoing connection (a health check, the gateway dialling a bank) may be
    given the same port as its local end — "Address already in use", seen once in CI. Ports below the
    ephemeral range are never handed to outgoing connections; each is checked free on every address the
    servers bind, and never handed out twice by this process (a handed-out port is free until its server binds).
    On a machine whose ephemeral range leaves too few ports outside it, bind(0) is all there is.
    """
    candidates = _listen_candidates()
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    with _PORT_LOCK:
        for _ in range(500):
            if len(candidates) >= 1000:
                port = rng.choice(candidates)
                if not _bindable(port):
                    continue
            else:
                port = _any_port()
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    raise RuntimeError(f"no free TCP port found in 500 tries (outside the ephemeral range: {candidates})")


def free_port_base(offsets: list[int]) -> int:
    """A port B such that B + each offset is free (and handed out): for a program that counts the ports of the
    servers it starts from one base, as run_all does for metrics."""
    for _ in range(200):
        base = free_port()
        others = [base + offset for offset in offsets if offset]
        with _PORT_LOCK:
            if all(port < 65536 and port not in _HANDED_OUT and _bindable(port) for port in others):
                _HANDED_OUT.update(others)
                return base
    raise RuntimeError(f"no free ports at offsets {offsets} from one base in 200 tries")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)


def write_config(config_dir: Path, bank_addresses: dict[str, str], *, plain_password_users: Iterable[str] = ()
                 ) -> None:
    from servers.config import hash_password
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "banks.json").write_text(json.dumps({b: {"address": a} for b, a in bank_addresses.items()}))
    users = {}
    for name, accounts in USER_ACCOUNTS.items():
        if name in plain_password_users:
            users[name] = {"password": PASSWORDS[name], "accounts": accounts}
        else:
            if name not in _HASHES:
                _HASHES[name] = hash_password(PASSWORDS[name])
            users[name] = {"password_hash": _HASHES[name], "accounts": accounts}
    (config_dir / "users.json").write_text(json.dumps(users))
    for bank, accounts in OPENING.items():
        (config_dir / f"{bank}_accounts.json").write_text(json.dumps(accounts))


@dataclass
class Proc:
    name: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen | None = None

    env: dict[str, str] = field(default_factory=dict)  # extra environment, e.g. {"STRIFE_CRASH_AT": ...}

    def start(self) -> "Proc":
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen([sys.executable, "-m", *self.args], cwd=REPO, stdout=log,
                                      stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        log.close()
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        if self.alive:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout: float = 15) -> int | None:
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return None if self.popen is None else self.popen.returncode

    def pause(self) -> None:
        self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.popen.send_signal(signal.SIGCONT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def health_ok(address: str, credentials: grpc.ChannelCredentials, timeout: float = 1.0) -> bool:
    with grpc.secure_channel(address, credentials) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def run_all_servers(*args: str) -> tuple[subprocess.Popen, str]:
    """`run_all.py --servers-only ARGS` as a real process, once it says every server answers its health check:
    (the process, what it printed until then). Fails the test if it exits first."""
    proc = subprocess.Popen([sys.executable, "run_all.py", "--servers-only", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = ""
    while "Strife is running" not in banner:  # readline blocks until run_all reports every server healthy
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            raise AssertionError(f"run_all exited early ({proc.returncode}): {banner}")
        banner += line
    return proc, banner


def server_processes(text: str) -> dict[int, str]:
    """Every live Strife server process whose command line mentions `text` (e.g. a test's data dir): pid →
    command line. Finds servers a test did not start itself (run_all's); a zombie has no command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and "servers." in cmdline:
            found[int(entry.name)] = cmdline
    return found


@dataclass
class Cluster:
    """Two banks (SBI, HDFC) and a gateway, each a real process, in `root` (config, certs, data, logs)."""
    root: Path
    certs_dir: Path
    txn_timeout: float = 2.0
    gateway_args: list[str] = field(default_factory=list)
    bank_ports: dict[str, int] = field(default_factory=dict)
    bank_addresses: dict[str, str] = field(default_factory=dict)  # what the gateway dials (maybe a proxy)
    gateway_port: int = 0
    gateway_ports: dict[str, int] = field(default_factory=dict)  # every gateway process's port, by name
    store: str = "sqlite"  # or a PostgreSQL URL: every gateway of the cluster runs on it (--store)
    # A process's own --certs-dir (e.g. its bundle), by process name ("SBI", "gateway"); others use certs_dir.
    process_certs: dict[str, Path] = field(default_factory=dict)
    # Prometheus metrics on (--metrics-port), each process on a port of its own, by process name.
    metrics: bool = False
    metrics_ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    _channels: list[grpc.Channel] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.config_dir = self.root / "config"
        self.data_dir = self.root / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for bank in OPENING:
            self.bank_ports.setdefault(bank, free_port())
            self.bank_addresses.setdefault(bank, f"localhost:{self.bank_ports[bank]}")
        self.gateway_port = self.gateway_port or free_port()
        write_config(self.config_dir, self.bank_addresses)

    # ---- processes -----------------------------------------------------------------------------------------
    def _common(self, name: str = "") -> list[str]:
        certs_dir = self.process_certs.get(name, self.certs_dir)
        metrics = ["--metrics-port", str(self.metrics_ports.setdefault(name, free_port()))] if self.metrics else []
        return ["--config-dir", str(self.config_dir), "--certs-dir", str(certs_dir), "--data-dir", str(self.data_dir),
                *metrics]

    def bank_proc(self, bank: str) -> Proc:
        return Proc(bank, ["servers.bank_server", "--bank", bank, "--port", str(self.bank_ports[bank]),
                           *self._common(bank)], self.root / f"{bank}.log")

    def gateway_proc(self, port: int | None = None, name: str = "gateway") -> Proc:
        store = [] if self.store == "sqlite" else ["--store", self.store]
        self.gateway_ports[name] = port or self.gateway_port
        return Proc(name, ["servers.gateway_server", "--port", str(port or self.gateway_port),
                           "--txn-timeout", str(self.txn_timeout), "--completer-interval", "0.2", *store,
                           *self.gateway_args, *self._common(name)], self.root / f"{name}.log")

    def start(self) -> "Cluster":
        for bank in OPENING:
            self.procs[bank] = self.bank_proc(bank).start()
        self.procs["gateway"] = self.gateway_proc().start()
        for bank in OPENING:
            self.wait_bank(bank)
        self.wait_gateway()
        return self

    def restart(self, name: str, extra_args: Iterable[str] = ()) -> Proc:
        """SIGKILL a server and start it again on its data, re-reading its config files. `extra_args` are added
        to its command line (of a flag given twice, the last wins)."""
        proc = self.procs[name]
        proc.kill()
        self.procs[name] = Proc(proc.name, [*proc.args, *extra_args], proc.log_path).start()  # without crash points
        if name == "gateway":
            self.wait_gateway()
        else:
            self.wait_bank(name)
        return self.procs[name]

    def wait_bank(self, bank: str, timeout: float = 20) -> None:
        creds = certs_module_client_credentials(self.certs_dir, "gateway")
        wait_until(lambda: self._check_alive(bank) and health_ok(f"localhost:{self.bank_ports[bank]}", creds),
                   timeout, 0.05, f"bank {bank} health")

    def wait_gateway(self, port: int | None = None, name: str = "gateway", timeout: float = 20) -> None:
        wait_until(lambda: self._check_alive(name) and self.serving(port=port), timeout, 0.05, f"{name} health")

    def serving(self, name: str = "gateway", port: int | None = None) -> bool:
        """Whether gateway `name` (or the one at `port`) answers its health check SERVING."""
        address = f"localhost:{port}" if port else self.gateway_address(name)
        return health_ok(address, grpc.ssl_channel_credentials((self.certs_dir / "ca.crt").read_bytes()))

    def _check_alive(self, name: str) -> bool:
        proc = self.procs[name]
        if not proc.alive:
            raise AssertionError(f"{name} exited with {proc.popen.returncode}:\n{proc.log()[-3000:]}")
        return True

    def stop(self) -> None:
        for channel in self._channels:
            channel.close()
        for proc in self.procs.values():
            if proc.alive:
                try:
                    proc.resume()
                except (ProcessLookupError, AttributeError):
                    pass
            proc.stop()

    # ---- clients -------------------------------------------------------------------------------------------
    def channel(self, address: str | None = None) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials((self.certs_dir / "ca.crt").read_bytes())
        channel = grpc.secure_channel(address or f"localhost:{self.gateway_port}", creds,
                                      options=[("grpc.initial_reconnect_backoff_ms", 100),
                                               ("grpc.max_reconnect_backoff_ms", 500)])
        self._channels.append(channel)
        return channel

    def gateway_address(self, name: str = "gateway") -> str:
        """Where gateway process `name` (the cluster's own, or a replica started with gateway_proc) listens."""
        return f"localhost:{self.gateway_ports.get(name, self.gateway_port)}"

    def client(self, user: str = "alice", address: str | None = None) -> "Client":
        stub = pbg.PaymentGatewayStub(self.channel(address))
        token = stub.Login(pb.LoginRequest(username=user, password=PASSWORDS[user]), timeout=10).token
        return Client(stub, user, token)

    def bank_stub(self, bank: str, cert_name: str | None = "gateway", certs_dir: Path | None = None
                  ) -> pbg.BankStub:
        creds = certs_module_client_credentials(certs_dir or self.certs_dir, cert_name)
        channel = grpc.secure_channel(f"localhost:{self.bank_ports[bank]}", creds)
        self._channels.append(channel)
        return pbg.BankStub(channel)

    # ---- reading the truth from disk -------------------------------------------------------------------------
    def ledger(self, bank: str) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.data_dir / f'bank_{bank}.sqlite3'}?mode=ro", uri=True, timeout=30)

    def accounts(self) -> dict[str, tuple[int, int]]:
        """Every account of every bank → (balance, held), in paise, from the ledgers on disk."""
        out: dict[str, tuple[int, int]] = {}
        for bank in OPENING:
            with self.ledger(bank) as db:
                out.update({a: (b, h) for a, b, h in db.execute("SELECT account, balance, held FROM accounts")})
        return out

    def balance(self, account: str) -> int:
        return self.accounts()[account][0]

    def total(self) -> int:
        return sum(b for b, _ in self.accounts().values())

    def holds(self) -> int:
        return sum(h for _, h in self.accounts().values())

    def txn_states(self, bank: str) -> dict[str, str]:
        with self.ledger(bank) as db:
            return dict(db.execute("SELECT txn_id, state FROM transactions"))

    def gateway_db(self) -> sqlite3.Connection:
        """The SQLite store's file, read-only (SQLite clusters only; `view` reads either backend)."""
        assert self.store == "sqlite", "gateway_db() reads the SQLite store; use cluster.view"
        return sqlite3.connect(f"file:{self.data_dir / 'gateway.sqlite3'}?mode=ro", uri=True, timeout=30)

    @property
    def view(self) -> StoreView:
        return StoreView(self.store, self.data_dir)

    def scrape(self, name: str) -> dict[str, float]:
        """The metrics process `name` serves right now (see `scrape`)."""
        return scrape(f"http://localhost:{self.metrics_ports[name]}/metrics")

    def unfinished_payments(self) -> int:
        return self.view.unfinished()

    def owner_of(self, name: str = "gateway") -> str:
        """The owner id a gateway process logged at start (the latest, if it took a new one since: a replica
        whose PostgreSQL session was lost logs "this replica is now owner N (was M)" once it is back)."""
        owner = self.logged_owner(name)
        assert owner is not None, f"{name} logged no owner id"
        return owner

    def logged_owner(self, name: str) -> str | None:
        """`owner_of`, or None while the process has logged none yet."""
        ids = re.findall(r"\(owner (\S+), store|is now owner (\d+) \(was", self.procs[name].log())
        return next(i for i in ids[-1] if i) if ids else None


OPENING_TOTAL = sum(int(round(v * 100)) for accounts in OPENING.values() for v in accounts.values())
# Every account → (balance, held) in paise, as Cluster.accounts() reports a cluster nobody has paid through.
OPENING_ACCOUNTS = {a: (int(round(v * 100)), 0) for accounts in OPENING.values() for a, v in accounts.items()}


def scrape(url: str) -> dict[str, float]:
    """GET a Prometheus page over HTTP: every sample as `name{label="value",…}` (labels sorted) → value."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def certs_module_client_credentials(certs_dir: Path, name: str | None) -> grpc.ChannelCredentials:
    ca = (certs_dir / "ca.crt").read_bytes()
    if name is None:
        return grpc.ssl_channel_credentials(ca)
    return grpc.ssl_channel_credentials(ca, (certs_dir / f"{name}.key").read_bytes(),
                                        (certs_dir / f"{name}.crt").read_bytes())


@dataclass
class Client:
    stub: pbg.PaymentGatewayStub
    user: str
    token: str

    def md(self, key: str | None = None) -> list[tuple[str, str]]:
        md = [("authorization", f"Bearer {self.token}")]
        if key is not None:
            md.append(("idempotency-key", key))
        return md

    def pay(self, key: str | None, from_account: str, to_account: str, amount: float, *,
            timeout: float = 15, transaction_id: str = "") -> pb.PaymentResponse:
        return self.stub.ProcessPayment(pb.PaymentRequest(transaction_id=transaction_id, from_account=from_account,
                                                          to_account=to_account, amount=amount),
                                        metadata=self.md(key), timeout=timeout)

    def pay_with_call(self, key: str, from_account: str, to_account: str, amount: float, timeout: float = 15
                      ) -> tuple[pb.PaymentResponse, dict[str, str]]:
        response, call = self.stub.ProcessPayment.with_call(
            pb.PaymentRequest(from_account=from_account, to_account=to_account, amount=amount),
            metadata=self.md(key), timeout=timeout)
        return response, dict(call.initial_metadata())

    def pay_until_final(self, key: str, from_account: str, to_account: str, amount: float,
                        deadline: float = 60, per_call_timeout: float = 5) -> pb.PaymentResponse:
        """Retry with the same key, as a wallet would, until the gateway gives a final answer."""
        end = time.monotonic() + deadline
        while True:
            try:
                return self.pay(key, from_account, to_account, amount, timeout=per_call_timeout)
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED,
                                      grpc.StatusCode.UNAUTHENTICATED):
                    raise
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise
                if time.monotonic() > end:
                    raise AssertionError(f"no final answer for key {key} within {deadline} s: {exc.code()}")
                time.sleep(0.05)

    def balances(self) -> pb.GatewayBalanceResponse:
        return self.stub.GetBalance(pb.GatewayBalanceRequest(), metadata=self.md(), timeout=10)

    def history(self, limit: int = 0) -> list[pb.PaymentRecord]:
        return list(self.stub.ListPayments(pb.ListPaymentsRequest(limit=limit), metadata=self.md(),
                                           timeout=10).payments)


def send_duplicates(clients: list["Client"], key: str, from_account: str, to_account: str, amount: float,
                    count: int = 20) -> tuple[list[pb.PaymentResponse], list[object]]:
    """`count` identical requests released at once (round-robin over `clients`): (responses, error codes)."""
    start = threading.Barrier(count)
    results: list[object] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        start.wait()
        try:
            outcome: object = clients[i % len(clients)].pay(key, from_account, to_account, amount)
        except grpc.RpcError as exc:
            outcome = exc.code()
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == count
    responses = [r for r in results if isinstance(r, pb.PaymentResponse)]
    return responses, [r for r in results if not isinstance(r, pb.PaymentResponse)]


def make_certs(directory: Path) -> Path:
    certs_module.generate(directory, sorted(OPENING))
    return directory
