"""The chaos run's faults, and the seeded driver that injects them one after another (see bench/chaos.py).

Each fault is a real one: SIGKILL of a process (then a restart, which recovers what the dead one left), SIGSTOP
and SIGCONT (a process that holds its connections but answers nothing, like a long GC pause), a cut link (a
TcpProxy closing every connection and refusing new ones), or lost replies (requests arrive, responses do not).
With several gateway replicas, a gateway fault strikes one replica, chosen at random (a kill mid-payment: the
one holding the most undecided payments). On a PostgreSQL store there are three more: the store "restarts" (every
replica's store connections cut at once and its sessions terminated, see ChaosStore.restart), one replica's
store link is cut, or one replica's store replies are lost.
"""
from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from bench.chaos_cluster import ChaosCluster
from bench.chaos_config import ChaosConfig
from tests.tcpproxy import TcpProxy

FAULTS = ("kill_gateway", "kill_gateway_mid_payment", "kill_bank", "stall_bank", "stall_gateway",
          "cut_wallet_link", "cut_bank_link", "drop_wallet_replies", "drop_bank_replies")
STORE_FAULTS = ("restart_store", "cut_store_link", "drop_store_replies")  # PostgreSQL only
# Reply chunks shorter than these pass while dropping is armed: HTTP/2 PINGs and WINDOW_UPDATEs (about 40 bytes
# in a TLS record) get through and what is lost is an RPC's response (see TcpProxy.drop_replies). A bank's
# Prepare or Commit reply is about 90-100 bytes on the wire, a gateway's PaymentResponse about 200.
DROP_MIN_BYTES = {"wallet": 100, "bank": 60}


def fault_kinds(postgres: bool) -> tuple[str, ...]:
    return FAULTS + STORE_FAULTS if postgres else FAULTS


def chosen_faults(config: ChaosConfig, postgres: bool) -> tuple[str, ...]:
    """The kinds `config.faults` names (every kind that applies to the store if none); ValueError for others."""
    known = fault_kinds(postgres)
    unknown = sorted(set(config.faults) - set(known))
    if unknown:
        raise ValueError(f"no such fault{' on SQLite' if not postgres else ''}: {', '.join(unknown)} "
                         f"(known: {', '.join(known)})")
    return config.faults or known


@dataclass
class Faults:
    gateway_kills: int = 0                # of any replica
    gateway_kills_mid_payment: int = 0    # while a stalled bank held payments in Prepare
    payments_cut_off: int = 0             # undecided payments the killed replica held
    replica_kills: Counter = field(default_factory=Counter)  # by replica name
    bank_kills: Counter = field(default_factory=Counter)
    gateway_stalls: int = 0
    bank_stalls: Counter = field(default_factory=Counter)
    wallet_link_cuts: int = 0
    bank_link_cuts: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)  # how often each kind of fault was injected


class Driver:
    def __init__(self, chaos: ChaosCluster, wallet_links: list[list[TcpProxy]], config: ChaosConfig) -> None:
        """`wallet_links[w][r]`: wallet w's link to replica r."""
        self.chaos, self.wallet_links, self.config = chaos, wallet_links, config
        self.kinds = chosen_faults(config, chaos.store.postgres)
        self.rng = random.Random(config.seed)
        self.faults = Faults()
        self.errors: list[str] = []

    def run(self, keep_going: Callable[[], bool], deadline: float) -> None:
        """Faults one after another until `keep_going()` is false and every kind has happened once."""
        plan = list(self.kinds)
        self.rng.shuffle(plan)
        try:
            while time.monotonic() < deadline and (plan or keep_going()):
                self.inject(plan.pop() if plan else self.rng.choice(self.kinds))
                time.sleep(self.rng.uniform(*self.config.fault_gap))  # chaos timing, not synchronisation
        except BaseException as exc:  # noqa: BLE001 - reported as a failure of the run
            self.errors.append(f"driver: {type(exc).__name__}: {exc}")

    def _undecided(self) -> dict[str, int]:
        """Replica → payments it has claimed but not decided (approximately its payments in flight right now)."""
        by_owner = self.chaos.cluster.view.undecided_by_owner()
        return {name: by_owner.get(self.chaos.owner_of(name) or "", 0) for name in self.chaos.replicas}

    def _outage(self) -> None:
        time.sleep(self.rng.uniform(*self.config.outage))  # how long the fault lasts

    def inject(self, kind: str) -> None:
        bank = self.rng.choice(sorted(self.chaos.bank_proxies))
        replica = self.rng.choice(sorted(self.chaos.replicas))
        procs, f = self.chaos.procs, self.faults
        f.by_kind[kind] += 1
        if kind in ("kill_gateway", "kill_gateway_mid_payment"):
            if kind == "kill_gateway_mid_payment":
                # A stalled bank keeps payments waiting in Prepare, so the kill lands in the middle of them.
                procs[bank].pause()
                f.bank_stalls[bank] += 1
                stalled_until = time.monotonic() + 0.9 * self.config.txn_timeout
                time.sleep(self.rng.uniform(0.1, 0.3))
                while not any(self._undecided().values()) and time.monotonic() < stalled_until:
                    time.sleep(0.02)  # until a payment waits in Prepare (or the vote is about to time out)
                undecided = self._undecided()
                if any(undecided.values()):
                    replica = max(sorted(undecided), key=undecided.__getitem__)
                f.gateway_kills_mid_payment += 1
            in_flight = self._undecided()[replica]
            procs[replica].kill()
            f.gateway_kills += 1
            f.replica_kills[replica] += 1
            f.payments_cut_off += in_flight
            if kind == "kill_gateway_mid_payment":
                procs[bank].resume()
            self._outage()
            self.chaos.restart(replica)   # recovers what the dead one left (so may the other replicas)
        elif kind == "kill_bank":
            procs[bank].kill()
            f.bank_kills[bank] += 1
            self._outage()
            self.chaos.restart(bank)
        elif kind in ("stall_bank", "stall_gateway"):
            # SIGSTOP: the process holds its connections but answers nothing (a long GC pause, a swapped VM).
            name = bank if kind == "stall_bank" else replica
            procs[name].pause()
            if kind == "stall_bank":
                f.bank_stalls[bank] += 1
            else:
                f.gateway_stalls += 1
            limit = 2 * self.config.txn_timeout if kind == "stall_bank" else self.config.pay_timeout + 1
            time.sleep(self.rng.uniform(0.3, limit))  # long enough for deadlines to pass
            procs[name].resume()
        elif kind in ("cut_wallet_link", "drop_wallet_replies"):
            links = self.rng.choice(self.wallet_links)
            if kind == "cut_wallet_link":
                # One replica out of the wallet's reach, or (as often) the wallet cut off from all of them.
                cut = links if len(links) == 1 or self.rng.random() < 0.5 else [self.rng.choice(links)]
                for proxy in cut:
                    proxy.cut()
                f.wallet_link_cuts += 1
            else:
                cut = [self.rng.choice(links)]
                cut[0].drop_replies(self.rng.randint(1, 3), min_bytes=DROP_MIN_BYTES["wallet"])
            self._outage()
            for proxy in cut:
                proxy.restore()
        elif kind in ("cut_bank_link", "drop_bank_replies"):
            proxy = self.chaos.bank_proxies[bank]
            if kind == "cut_bank_link":
                proxy.cut()
                f.bank_link_cuts[bank] += 1
            else:
                proxy.drop_replies(self.rng.randint(1, 3), min_bytes=DROP_MIN_BYTES["bank"])
            self._outage()
            proxy.restore()
        else:
            store, index = self.chaos.store, self.chaos.index(replica)
            if kind == "restart_store":
                store.restart(self.rng.uniform(*self.config.store_outage))
            elif kind == "cut_store_link":
                store.cut_link(index, self.rng.uniform(*self.config.outage))
            else:
                store.drop_replies(index, self.rng.randint(1, 3), self.rng.uniform(*self.config.outage))
