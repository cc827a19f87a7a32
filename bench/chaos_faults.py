"""The chaos run's faults, and the seeded driver that injects them one after another (see bench/chaos.py).

Each fault is a real one: SIGKILL of a process (then a restart, which recovers what the dead one left), SIGSTOP
and SIGCONT (a process that holds its connections but answers nothing, like a long GC pause), a cut link (a
TcpProxy closing every connection and refusing new ones), or lost replies (requests arrive, responses do not).
"""
from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from bench.chaos_config import ChaosConfig
from tests.harness import Cluster
from tests.tcpproxy import TcpProxy

FAULTS = ("kill_gateway", "kill_gateway_mid_payment", "kill_bank", "stall_bank", "stall_gateway",
          "cut_wallet_link", "cut_bank_link", "drop_wallet_replies", "drop_bank_replies")
# Reply chunks shorter than these pass while dropping is armed: HTTP/2 PINGs and WINDOW_UPDATEs (about 40 bytes
# in a TLS record) get through and what is lost is an RPC's response (see TcpProxy.drop_replies). A bank's
# Prepare or Commit reply is about 90-100 bytes on the wire, a gateway's PaymentResponse about 200.
DROP_MIN_BYTES = {"wallet": 100, "bank": 60}


@dataclass
class Faults:
    gateway_kills: int = 0
    gateway_kills_mid_payment: int = 0    # while a stalled bank held payments in Prepare
    payments_cut_off: int = 0             # undecided payments at the gateway when it was killed
    bank_kills: Counter = field(default_factory=Counter)
    gateway_stalls: int = 0
    bank_stalls: Counter = field(default_factory=Counter)
    wallet_link_cuts: int = 0
    bank_link_cuts: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)  # how often each of FAULTS was injected


class Driver:
    def __init__(self, cluster: Cluster, wallet_proxies: list[TcpProxy], bank_proxies: dict[str, TcpProxy],
                 config: ChaosConfig) -> None:
        self.cluster, self.wallet_proxies, self.bank_proxies = cluster, wallet_proxies, bank_proxies
        self.config = config
        self.rng = random.Random(config.seed)
        self.faults = Faults()
        self.errors: list[str] = []

    def run(self, keep_going: Callable[[], bool], deadline: float) -> None:
        """Faults one after another until `keep_going()` is false and every kind has happened once."""
        plan = list(FAULTS)
        self.rng.shuffle(plan)
        try:
            while time.monotonic() < deadline and (plan or keep_going()):
                self.inject(plan.pop() if plan else self.rng.choice(FAULTS))
                time.sleep(self.rng.uniform(*self.config.fault_gap))  # chaos timing, not synchronisation
        except BaseException as exc:  # noqa: BLE001 - reported as a failure of the run
            self.errors.append(f"driver: {type(exc).__name__}: {exc}")

    def _started(self) -> int:
        """Payments the gateway has claimed but not decided (approximately in flight right now)."""
        with self.cluster.gateway_db() as db:
            return db.execute("SELECT count(*) FROM idempotency_keys WHERE recovery_point = 'started'").fetchone()[0]

    def _outage(self) -> None:
        time.sleep(self.rng.uniform(*self.config.outage))  # how long the fault lasts

    def inject(self, kind: str) -> None:
        bank = self.rng.choice(sorted(self.bank_proxies))
        f = self.faults
        f.by_kind[kind] += 1
        if kind in ("kill_gateway", "kill_gateway_mid_payment"):
            if kind == "kill_gateway_mid_payment":
                # A stalled bank keeps payments waiting in Prepare, so the kill lands in the middle of them.
                self.cluster.procs[bank].pause()
                f.bank_stalls[bank] += 1
                stalled_until = time.monotonic() + 0.9 * self.config.txn_timeout
                time.sleep(self.rng.uniform(0.1, 0.3))
                while self._started() == 0 and time.monotonic() < stalled_until:
                    time.sleep(0.02)  # until a payment waits in Prepare (or the vote is about to time out)
                f.gateway_kills_mid_payment += 1
            in_flight = self._started()
            self.cluster.procs["gateway"].kill()
            f.gateway_kills += 1
            f.payments_cut_off += in_flight
            if kind == "kill_gateway_mid_payment":
                self.cluster.procs[bank].resume()
            self._outage()
            self.cluster.restart("gateway")   # recovers what the dead one left
        elif kind == "kill_bank":
            self.cluster.procs[bank].kill()
            f.bank_kills[bank] += 1
            self._outage()
            self.cluster.restart(bank)
        elif kind in ("stall_bank", "stall_gateway"):
            # SIGSTOP: the process holds its connections but answers nothing (a long GC pause, a swapped VM).
            name = bank if kind == "stall_bank" else "gateway"
            self.cluster.procs[name].pause()
            if kind == "stall_bank":
                f.bank_stalls[bank] += 1
            else:
                f.gateway_stalls += 1
            limit = 2 * self.config.txn_timeout if kind == "stall_bank" else self.config.pay_timeout + 1
            time.sleep(self.rng.uniform(0.3, limit))  # long enough for deadlines to pass
            self.cluster.procs[name].resume()
        elif kind in ("cut_wallet_link", "drop_wallet_replies"):
            proxy = self.rng.choice(self.wallet_proxies)
            if kind == "cut_wallet_link":
                proxy.cut()
                f.wallet_link_cuts += 1
            else:
                proxy.drop_replies(self.rng.randint(1, 3), min_bytes=DROP_MIN_BYTES["wallet"])
            self._outage()
            proxy.restore()
        else:
            proxy = self.bank_proxies[bank]
            if kind == "cut_bank_link":
                proxy.cut()
                f.bank_link_cuts[bank] += 1
            else:
                proxy.drop_replies(self.rng.randint(1, 3), min_bytes=DROP_MIN_BYTES["bank"])
            self._outage()
            proxy.restore()
