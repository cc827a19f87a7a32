"""The chaos run's servers: two banks and N gateway replicas on one store (tests.harness.Cluster underneath), with
every link the run cuts going through a TcpProxy: each gateway → each bank, and each replica → the store
(PostgreSQL; bench/chaos_store.py). The wallets' links are the run's own (bench/chaos.py).
"""
from __future__ import annotations

from pathlib import Path

from bench.chaos_config import ChaosConfig
from bench.chaos_store import ChaosStore
from tests.harness import OPENING, Cluster, Proc, free_port
from tests.tcpproxy import TcpProxy


class ChaosCluster:
    def __init__(self, root: Path, certs_dir: Path, config: ChaosConfig, store: ChaosStore) -> None:
        self.store = store
        bank_ports = {bank: free_port() for bank in OPENING}
        self.bank_proxies = {bank: TcpProxy(port) for bank, port in bank_ports.items()}
        # The cluster reads the store directly (store.url): the run's checks must not depend on a proxy it cuts.
        self.cluster = Cluster(root=root, certs_dir=certs_dir, txn_timeout=config.txn_timeout,
                               bank_ports=dict(bank_ports), store=store.url,
                               bank_addresses={bank: p.address for bank, p in self.bank_proxies.items()})
        # Replica 0 is the cluster's own "gateway" (its port, its log); the others are gateway-2, gateway-3, ….
        names = ["gateway", *(f"gateway-{i + 1}" for i in range(1, config.gateways))]
        self.replicas = {name: (self.cluster.gateway_port if i == 0 else free_port()) for i, name in enumerate(names)}
        self._index = {name: i for i, name in enumerate(names)}

    @property
    def procs(self) -> dict[str, Proc]:
        return self.cluster.procs

    def start(self) -> None:
        for bank in OPENING:
            self.procs[bank] = self.cluster.bank_proc(bank).start()
        for name in self.replicas:
            self.procs[name] = self._replica_proc(name).start()
        for bank in OPENING:
            self.cluster.wait_bank(bank)
        for name, port in self.replicas.items():
            self.cluster.wait_gateway(port=port, name=name)

    def _replica_proc(self, name: str) -> Proc:
        proc = self.cluster.gateway_proc(port=self.replicas[name], name=name)
        if self.store.postgres:  # this replica's own way to the store, through its proxy
            at = proc.args.index("--store")
            proc.args[at:at + 2] = ["--store", self.store.replica_url(self.index(name))]
        return proc

    def restart(self, name: str) -> None:
        """SIGKILL (if still running) and start again on the same store, port and log; wait until it serves."""
        if name not in self.replicas:
            self.cluster.restart(name)
            return
        self.procs[name].kill()
        self.procs[name] = self._replica_proc(name).start()
        self.cluster.wait_gateway(port=self.replicas[name], name=name)

    def index(self, name: str) -> int:
        return self._index[name]

    def owner_of(self, name: str) -> str | None:
        """The owner id replica `name` runs as now, as its log says (None if it has logged none yet)."""
        return self.cluster.logged_owner(name)

    def gateway_log(self) -> str:
        """Every replica's log (one file per replica across its restarts)."""
        return "".join(self.procs[name].log() for name in self.replicas)

    def close_proxies(self) -> None:
        for proxy in self.bank_proxies.values():
            proxy.close()

    def stop(self) -> None:
        self.cluster.stop()
