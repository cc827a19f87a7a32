"""Chaos run: wallets keep paying while a driver kills processes, cuts links and loses replies; then every
invariant of the money is checked against the ledgers on disk.

    python -m bench.chaos [--payments 300] [--wallets 4] [--seed 1] [--gateways 1] [--store sqlite|URL]
                          [--seconds-budget 600] [--keep DIR]

Real processes over real TLS: two banks and N gateway replicas on one store (bench/chaos_cluster.py). Every
link goes through a TcpProxy: each wallet → each replica, each replica → each bank, and (PostgreSQL) each
replica → the store. Each wallet is the wallet's headless core (`WalletCore`, its own data dir and TinyDB
outbox) for a demo user, given every replica as `--gateway a,b,…` is (it balances over those that answer and
fails over with the same key), with two threads as in the TUI: one submits payments to random accounts (random
small amounts; some are declined for insufficient funds) and sends each at once, the other polls (health check,
then a drain of the queue with the same keys).

The store: `sqlite` (the default) is the cluster's data dir, shared by every replica, as two gateways on one
--data-dir share it (CONTRACT §5). A PostgreSQL URL is an admin URL: the run creates a database of its own on
that server, `strife_chaos_<random>`, and drops it afterwards, or keeps it and prints where (password masked)
when an invariant fails or --keep is given (bench/chaos_store.py).

A seeded driver thread (bench/chaos_faults.py) does, while payments are submitted, one fault at a time:
SIGKILL and restart a gateway replica (sometimes while a stalled bank holds payments in Prepare) or a bank,
SIGSTOP and SIGCONT one of them, cut and restore a link, or lose replies on a link; on PostgreSQL also a store
restart, a cut store link or lost store replies. The shared PostgreSQL server is never restarted: a restart is
approximated by what its clients see — every replica's store connections cut at once by their proxies and new
ones refused for a while (the server down), and every session of the run's database ended with
pg_terminate_backend (the fast shutdown's "terminating connection due to administrator command", which rolls
back whatever transaction was running). Every kind happens at least once. Then everything is restored, the
wallets resend until each key has a final answer, the gateways' completers finish what is left, and the checks
run (bench/chaos_invariants.py), reading the store directly (not through a proxy). Exits 1 if any invariant
fails.
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.chaos_cluster import ChaosCluster
from bench.chaos_config import ChaosConfig
from bench.chaos_faults import Driver, chosen_faults
from bench.chaos_invariants import Check, check_invariants
from bench.chaos_store import ChaosStore
from tests.harness import OPENING, PASSWORDS, USER_ACCOUNTS, make_certs, wait_until
from tests.tcpproxy import TcpProxy
from servers.gateway.store.spec import SQLITE
from wallet_tui.core import WalletCore
from wallet_tui.gateway import GatewayError, GrpcGateway
from wallet_tui.outbox import FINISHED_KEPT, Outbox
from wallet_tui.settings import WalletSettings
from wallet_tui.sync import Finished

ALL_ACCOUNTS = sorted(a for accounts in OPENING.values() for a in accounts)


@dataclass
class ChaosReport:
    config: ChaosConfig
    store: str                         # the store as shown (a PostgreSQL URL with its password masked)
    figures: dict[str, object]
    checks: list[Check]
    errors: list[str]                  # things that went wrong outside the checks (a thread died, a timeout)
    notes: list[str] = field(default_factory=list)  # e.g. where a kept database is

    @property
    def ok(self) -> bool:
        return not self.errors and all(c.ok for c in self.checks)

    def text(self) -> str:
        f, c = self.figures, self.config
        gateways = "a gateway" if c.gateways == 1 else f"{c.gateways} gateway replicas"
        lines = [f"Strife chaos run: seed {c.seed}, {c.wallets} wallets, banks {', '.join(OPENING)} + {gateways} on "
                 f"{self.store}, every link through a TCP proxy",
                 f"payments      {f['submitted']} submitted: {f['succeeded']} succeeded, {f['declined']} declined, "
                 f"{f['failed']} failed",
                 f"sends         {f['sends']} ({f['resends']} resends with the same key, "
                 f"{f['replayed']} answered by replay, {f['from_queue']} finished by a drain of the queue, "
                 f"{f['relogins']} logins again)",
                 f"kills         gateway {f['gateway_kills']} ({f['gateway_kills_mid_payment']} with payments held "
                 f"in Prepare; {f['payments_cut_off']} undecided payments cut off"
                 + (f"; {f['gateway_kills_by_replica']}" if c.gateways > 1 else "") + f"), banks {f['bank_kills']} "
                 f"({f['bank_kills_by_bank']})",
                 f"stalls        gateway {f['gateway_stalls']}, banks {f['bank_stalls']} (SIGSTOP … SIGCONT)",
                 f"link cuts     {f['cuts']} (wallet↔gateway {f['wallet_link_cuts']}, gateway↔bank "
                 f"{f['bank_link_cuts']}, gateway↔store {f['store_link_cuts']})",
                 f"lost replies  {f['dropped_replies']} (wallet↔gateway {f['dropped_wallet']}, gateway↔bank "
                 f"{f['dropped_bank']}, gateway↔store {f['dropped_store']})"]
        if "store_restarts" in f and self.store.startswith("PostgreSQL"):
            lines.append(f"store         {f['store_restarts']} restarts ({f['store_sessions_terminated']} sessions "
                         f"terminated), {f['owner_changes']} new owner identities after a lost store session")
        lines += [f"recovery      {f['recovered_by_gateway']} payments finished by the gateways' completers "
                  f"(owner killed, or a bank away), {f['resumed_by_retry']} resumed by a retry with the same key",
                  f"duration      {f['duration_s']:.1f} s (chaos {f['chaos_s']:.1f} s, convergence "
                  f"{f['convergence_s']:.1f} s)",
                  "invariants"]
        lines += [f"  [{'ok' if ch.ok else 'FAIL'}] {ch.name}: {ch.detail}" for ch in self.checks]
        lines += [f"  [ERROR] {e}" for e in self.errors]
        lines += self.notes
        lines.append("RESULT: " + ("every invariant holds" if self.ok else "INVARIANTS VIOLATED"))
        return "\n".join(lines)


# ---- a wallet ------------------------------------------------------------------------------------------------
class ChaosWallet:
    """One user's headless wallet: a submitting thread and a polling thread over one WalletCore."""

    def __init__(self, index: int, user: str, address: str, certs_dir: Path, data_dir: Path, config: ChaosConfig,
                 quota: int, stop: threading.Event, converging: threading.Event) -> None:
        self.user, self.quota, self.config = user, quota, config
        self.rng = random.Random(config.seed * 1009 + index)
        settings = WalletSettings(gateway=address, certs_dir=certs_dir, data_dir=data_dir,
                                  poll_interval=config.poll_interval, pay_timeout=config.pay_timeout)
        self.core = WalletCore(settings, GrpcGateway(address, settings.ca_path, pay_timeout=config.pay_timeout))
        self.keys: list[str] = []
        self.replayed = 0
        self.from_queue = 0
        self.relogins = 0
        self.submitted_all = threading.Event()
        self.errors: list[str] = []
        self._stop, self._converging = stop, converging
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._guard(self._submit), name=f"submit-{user}-{index}"),
                         threading.Thread(target=self._guard(self._poll), name=f"poll-{user}-{index}")]

    def login(self, deadline: float) -> None:
        wait_until(self._try_login, max(0.1, deadline - time.monotonic()), 0.1, f"{self.user} to log in")

    def _try_login(self) -> bool:
        try:
            self.core.login(self.user, PASSWORDS[self.user])
        except GatewayError:
            return False
        return True

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    @property
    def outbox(self) -> Outbox:
        assert self.core.outbox is not None, "logged in before the run"
        return self.core.outbox

    def settled(self) -> bool:
        return self.submitted_all.is_set() and not self.outbox.pending()

    def _guard(self, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except BaseException as exc:  # noqa: BLE001 - reported as a failure of the run
                self.errors.append(f"{threading.current_thread().name}: {type(exc).__name__}: {exc}")
                self.submitted_all.set()
        return run

    def _count(self, events: list) -> None:
        with self._lock:
            self.replayed += sum(1 for e in events if isinstance(e, Finished) and e.replayed)
            self.from_queue += sum(1 for e in events if isinstance(e, Finished) and e.queued)

    def _submit(self) -> None:
        accounts = USER_ACCOUNTS[self.user]
        start, spacing = time.monotonic(), self.config.chaos_seconds / max(1, self.quota)
        for i in range(self.quota):
            # The i-th payment at a random moment of the i-th slot of the chaos window.
            if self._stop.wait(max(0.0, start + (i + self.rng.random()) * spacing - time.monotonic())):
                break
            src = self.rng.choice(accounts)
            dst = self.rng.choice([a for a in ALL_ACCOUNTS if a != src])
            entry = self.core.submit(src, dst, self.rng.randint(100, self.config.max_amount_paise))
            self.keys.append(entry.key)
            self._count(self.core.send_now(entry.key))  # queued instead if the wallet believes it is offline
        self.submitted_all.set()

    def _poll(self) -> None:
        # Like the TUI: a poll finishes, then the next is scheduled. Once the chaos is over the driver asks for
        # forced drains (as when the gateway comes back), so a long backoff does not stretch the convergence.
        while not self._stop.is_set():
            if self.core.connectivity == "login-required" and self._try_login():
                self.relogins += 1
            self._count(self.core.poll().events)
            if self._converging.is_set():
                self._count(self.core.drain(force=True).events)
            self._stop.wait(self.config.poll_interval)


# ---- the run -------------------------------------------------------------------------------------------------
def run_chaos(root: Path, certs_dir: Path, config: ChaosConfig, *, keep_store: bool = False) -> ChaosReport:
    """One run in `root`. A PostgreSQL database the run made is dropped afterwards unless `keep_store` or an
    invariant failed (then the report says where it is)."""
    started = time.monotonic()
    budget_end = started + config.seconds_budget
    store = ChaosStore(config.store)
    chosen_faults(config, store.postgres)  # refused before anything is made
    wallet_links: list[list[TcpProxy]] = []
    wallets: list[ChaosWallet] = []
    stop, converging = threading.Event(), threading.Event()
    errors: list[str] = []
    notes: list[str] = []
    figures: dict[str, object] = {}
    checks: list[Check] = []
    chaos_s = convergence_s = 0.0
    chaos: ChaosCluster | None = None
    completed = False
    try:
        store.create(config.gateways)
        chaos = ChaosCluster(root / "cluster", certs_dir, config, store)
        driver = Driver(chaos, wallet_links, config)
        chaos.start()
        users = list(USER_ACCOUNTS)
        for i in range(config.wallets):
            links = [TcpProxy(port) for port in chaos.replicas.values()]  # wallet i's link to each replica
            wallet_links.append(links)
            quota = config.payments // config.wallets + (1 if i < config.payments % config.wallets else 0)
            wallets.append(ChaosWallet(i, users[i % len(users)], ",".join(p.address for p in links), certs_dir,
                                       root / f"wallet{i}", config, quota, stop, converging))
        for w in wallets:
            w.login(budget_end)
            w.start()

        chaos_start = time.monotonic()
        driver_thread = threading.Thread(
            target=driver.run, args=(lambda: not all(w.submitted_all.is_set() for w in wallets), budget_end),
            name="chaos-driver")
        driver_thread.start()
        driver_thread.join(max(0.0, budget_end - time.monotonic()) + 30)
        errors += driver.errors
        if driver_thread.is_alive():
            errors.append("the driver did not stop within the budget")
        chaos_s = time.monotonic() - chaos_start

        # Everything back: links restored, every process up (a process that died by itself is an error).
        for proxy in [*(p for links in wallet_links for p in links), *chaos.bank_proxies.values()]:
            proxy.restore()
        store.restore()
        for name, proc in list(chaos.procs.items()):
            if proc.alive:
                proc.resume()  # in case the driver stopped half-way through a stall
            else:
                errors.append(f"{name} was not running after the chaos (exit {proc.popen.returncode})")
                chaos.restart(name)
        converge_start = time.monotonic()
        converging.set()
        cluster = chaos.cluster
        try:
            remaining = max(5.0, budget_end - time.monotonic())
            wait_until(lambda: all(w.settled() for w in wallets), remaining, 0.1,
                       "every wallet's keys to have a final answer")
            wait_until(lambda: cluster.unfinished_payments() == 0 and cluster.holds() == 0,
                       max(5.0, budget_end - time.monotonic()), 0.1, "the gateways to finish every payment")
        except AssertionError as exc:
            errors.append(str(exc))
        convergence_s = time.monotonic() - converge_start
        stop.set()
        for w in wallets:
            if not w.join(15):
                errors.append(f"{w.user}'s wallet threads did not stop")
            errors += w.errors
        checks = check_invariants(cluster, wallets)
        figures = _figures(chaos, wallets, driver, wallet_links)
        completed = True
    finally:
        stop.set()
        for w in wallets:
            w.join(15)
            w.core.close()
        for proxy in (p for links in wallet_links for p in links):
            proxy.close()
        if chaos is not None:
            chaos.close_proxies()
            chaos.stop()
        failed = not completed or bool(errors) or not all(c.ok for c in checks)
        kept = store.close(keep=keep_store or failed)
        if kept:
            notes.append(kept)
            if not completed:  # the run ends in an exception, with no report to carry the note: say it now
                print(kept, file=sys.stderr)
    figures.update(duration_s=time.monotonic() - started, chaos_s=chaos_s, convergence_s=convergence_s)
    return ChaosReport(config, store.shown, figures, checks, errors, notes)


def _figures(chaos: ChaosCluster, wallets: list[ChaosWallet], driver: Driver, wallet_links: list[list[TcpProxy]]
             ) -> dict[str, object]:
    statuses: Counter = Counter()
    sends = 0
    for w in wallets:
        for e in w.outbox.finished(10_000):
            statuses[e.status] += 1
            sends += e.attempts
    submitted = sum(len(w.keys) for w in wallets)
    f = driver.faults
    dropped_wallet = sum(p.dropped_replies for links in wallet_links for p in links)
    dropped_bank = sum(p.dropped_replies for p in chaos.bank_proxies.values())
    dropped_store = chaos.store.dropped_replies
    log = chaos.gateway_log()
    recovered = sum(log.count(s) for s in ("aborted undecided payment", "finished commit_decided payment",
                                           "finished abort_decided payment"))
    store = chaos.store
    return {"submitted": submitted, "succeeded": statuses["succeeded"], "declined": statuses["declined"],
            "failed": statuses["failed"], "sends": sends, "resends": sends - submitted,
            "replayed": sum(w.replayed for w in wallets), "from_queue": sum(w.from_queue for w in wallets),
            "relogins": sum(w.relogins for w in wallets),
            "gateway_kills": f.gateway_kills, "gateway_kills_mid_payment": f.gateway_kills_mid_payment,
            "gateway_kills_by_replica": ", ".join(f"{r} {f.replica_kills[r]}" for r in chaos.replicas),
            "payments_cut_off": f.payments_cut_off, "gateway_stalls": f.gateway_stalls,
            "bank_stalls": sum(f.bank_stalls.values()), "bank_kills": sum(f.bank_kills.values()),
            "bank_kills_by_bank": ", ".join(f"{b} {f.bank_kills[b]}" for b in OPENING),
            "cuts": f.wallet_link_cuts + sum(f.bank_link_cuts.values()) + store.link_cuts,
            "wallet_link_cuts": f.wallet_link_cuts, "bank_link_cuts": sum(f.bank_link_cuts.values()),
            "store_link_cuts": store.link_cuts, "store_restarts": store.restarts,
            "store_sessions_terminated": store.terminated,
            "dropped_replies": dropped_wallet + dropped_bank + dropped_store, "dropped_wallet": dropped_wallet,
            "dropped_bank": dropped_bank, "dropped_store": dropped_store, "recovered_by_gateway": recovered,
            "owner_changes": log.count("is now owner"), "resumed_by_retry": log.count("retry=resumed"),
            "store_database": store.database,
            "faults_by_kind": dict(f.by_kind)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--payments", type=int, default=300)
    parser.add_argument("--wallets", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gateways", type=int, default=1,
                        help="gateway replicas on one store; replica faults strike one at random (default 1)")
    parser.add_argument("--store", default=SQLITE,
                        metavar="sqlite|postgresql://USER@HOST[:PORT]/DB",
                        help="sqlite (the cluster's data dir, shared by the replicas) or a PostgreSQL admin URL: "
                             "the run creates a database of its own there and drops it afterwards, or keeps it "
                             "(and says where) when an invariant fails (default sqlite)")
    parser.add_argument("--chaos-seconds", type=float, default=None,
                        help="spread the submissions (and the faults) over this long (default: 0.2 s per payment)")
    parser.add_argument("--seconds-budget", type=float, default=600.0,
                        help="hard limit for the whole run, convergence included (default 600)")
    parser.add_argument("--txn-timeout", type=float, default=ChaosConfig.txn_timeout)
    parser.add_argument("--keep", type=Path, default=None,
                        help="run in this directory and keep it (logs, ledgers, outboxes, and the PostgreSQL "
                             "database) instead of a temp dir")
    a = parser.parse_args(argv)
    if a.payments < 1 or a.wallets < 1 or a.gateways < 1 or a.seconds_budget <= 0:
        parser.error("--payments, --wallets, --gateways and --seconds-budget must be positive")
    if a.payments > a.wallets * FINISHED_KEPT:
        parser.error(f"at most {FINISHED_KEPT} payments per wallet (an outbox keeps that many finished ones)")
    try:
        ChaosStore(a.store)
    except ValueError as exc:
        parser.error(f"--store: {exc}")
    chaos_seconds = a.chaos_seconds if a.chaos_seconds is not None else 0.2 * a.payments
    config = ChaosConfig(payments=a.payments, wallets=a.wallets, seed=a.seed, gateways=a.gateways, store=a.store,
                         seconds_budget=a.seconds_budget, txn_timeout=a.txn_timeout, chaos_seconds=chaos_seconds)
    root = a.keep or Path(tempfile.mkdtemp(prefix="strife-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        report = run_chaos(root, make_certs(root / "certs"), config, keep_store=a.keep is not None)
    finally:
        if a.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
